"""The harness on real cpu-test training (slow: `make test-slow`): issue #3's verdicts that need a real model.

A scratch repo holds the real nanomodel + kernels and the cpu-test preset; its baseline (3 runs) is measured once.
(a) a no-op, (b) a sleep per step, (c) a protected file and NaNs at evaluation run against the same kind of repo
in tests/test_redteam.py (its real-training tier is in `make test`); here: (d) an exception, (e) a NaN training
loss, and (f) a genuine speedup, the catalog's `no-dynamo-cpu` entry (torch.optim and DDP import torch._dynamo,
~1 s of a ~7 s run; the update is the same math), accepted as one commit with trailers and reproduced by
`ratchet replay`.
Issue #6 on real training: a tuned learning rate, rejected as it stands and accepted once its length is calibrated.
Issue #14: a no-op decided after one block (the judge's noise prior), an edit twice as slow stopped by the screen.
"""
import re

import git
import pytest

from agent.propose.catalog import render
from agent.propose.catalog_entries import ENTRIES
from agent.edit.workspace import trailers
from tests.fakerepo import edit, ledger, make_real_repo, ratchet

pytestmark = pytest.mark.slow

LOOP = "    for step in range(cfg.steps):"
LOSS_LINE = "                loss = kernels.cross_entropy(logits.flatten(0, 1), y.flatten()) / grad_accum"


@pytest.fixture(scope="module")
def target(tmp_path_factory, dataset):
    root = make_real_repo(tmp_path_factory.mktemp("e2e") / "target", dataset, baseline_runs=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield root


def try_edit(capsys, tmp_path, text: str) -> dict:
    patch = tmp_path / "edit.txt"
    patch.write_text(text)
    return ratchet(capsys, "try", str(patch), "--no-calibrate")


def test_baseline(target, capsys):
    out = ratchet(capsys, "baseline")
    assert len(out["seconds"]) == 3 and out["target"] > max(out["val_losses"])


def test_an_exception_is_rejected_with_its_last_line(target, capsys, tmp_path):
    out = try_edit(capsys, tmp_path, edit(LOOP, LOOP + "\n        if step == 2:\n            raise RuntimeError('boom at step 2')",
                                          "raise at step 2", path="nanomodel/train.py"))
    assert out["decision"] == "rejected" and "RuntimeError: boom at step 2" in out["reason"]


def test_a_nan_loss_is_rejected(target, capsys, tmp_path):
    out = try_edit(capsys, tmp_path, edit(LOSS_LINE, LOSS_LINE + " * float('nan')", "nan loss", path="nanomodel/train.py"))
    assert out["decision"] == "rejected" and "loss is nan" in out["reason"]


def test_a_noop_is_rejected_after_one_block(target, capsys, tmp_path):
    """With the noise prior (every earlier experiment's pairs) the judge looks after one block; with the judge's
    own code on simulated pairs, a null edit stops there about 97 times in 100 at cpu-test's noise. Two no-ops:
    the first gives the second its prior."""
    try_edit(capsys, tmp_path, edit(LOOP, LOOP + "  # the same loop, comment one", "a no-op", path="nanomodel/train.py"))
    out = try_edit(capsys, tmp_path, edit(LOOP, LOOP + "  # the same loop, comment two", "another no-op",
                                          path="nanomodel/train.py"))
    row = ledger(target)[-1]
    assert row["prior"] is not None or ledger(target)[-2]["stage"] == "screen"
    assert out["decision"] == "rejected" and out["stage"] in ("judge", "screen") and out["runs"] <= 4, out


def test_an_edit_twice_as_slow_is_stopped_in_its_first_run(target, capsys, tmp_path):
    """By the screen when the first block opens with the incumbent (its reference). Else the pace rule, which
    compares with the baseline's mean: a cold first baseline run (34 s against 15 s, seen here) can let the
    first candidate run finish, and the second is stopped."""
    incumbent_s = ledger(target)[0]["incumbent_s"]
    out = try_edit(capsys, tmp_path, edit(LOOP, LOOP + "\n        time.sleep(0.25)", "sleep in every step",
                                          path="nanomodel/train.py"))
    row = ledger(target)[-1]
    candidate = [r for r in row["runs"] if r["arm"] == "candidate"]
    assert out["decision"] == "rejected" and candidate[-1]["status"] == "aborted"
    if row["runs"][0]["arm"] == "incumbent":
        assert len(candidate) == 1 and candidate[0]["seconds"] < 1.5 * incumbent_s  # well before its ~2x end
        assert out["stage"] == "screen" and out["reason"].startswith("screen: projected"), out
        screen = row["screen"]
        assert screen["reject"] and screen["optimistic_s"] > screen["needed_s"] and screen["step"] < screen["total"]
    else:
        assert out["stage"] == "run" and out["reason"].startswith("slower"), out


def test_a_genuine_speedup_is_accepted_and_replays(target, capsys, tmp_path):
    entry = next(e for e in ENTRIES if e.key == "no-dynamo-cpu")
    out = try_edit(capsys, tmp_path, render(entry, {}))
    assert out["decision"] == "accepted", out
    assert out["speedup"] > 0.05 and out["p_value"] <= 0.01
    rows = ledger(target)
    assert out["val_loss"] <= rows[0]["target"]
    r = git.Repo(target)
    head = r.git.rev_parse("ratchet/default")
    assert head == out["commit"]
    t = trailers(r.git.log("-1", "--format=%B", head))
    assert t["Ratchet-Experiment"] == f"default/{out['id']}" and "Ratchet-Val-Loss" in t and "p=" in t["Ratchet-Wall-Clock"]
    assert "class PlainAdamW" in r.git.show(head)

    replayed = ratchet(capsys, "replay", head)
    assert replayed["decision"] == "reproduced", replayed
    assert replayed["commits"][0]["speedup"] > 0.05


# Issue #6's learning-rate test needs an edit that clearly learns better at equal length. The cpu-test preset's
# learning rate is tuned (3e-3; 1e-2 and 2e-2 end within the seed noise), so these repos start from a preset that
# trains 3x longer at a tenth of it: the tuned rate is then a large quality win, worth a much shorter run.
MISTUNED = ("steps=40, lr=3e-3,", "steps=120, lr=3e-4,")
PRESET_LINE = "                       steps=120, lr={lr}, log_every=5, peak_flops=1.1e11),"
TUNED_LR = edit(PRESET_LINE.format(lr="3e-4"), PRESET_LINE.format(lr="3e-3"), "the tuned learning rate",
                path="nanomodel/config.py")


def test_a_tuned_learning_rate_is_rejected_as_it_stands_and_accepted_at_a_calibrated_length(
        dataset, capsys, tmp_path, monkeypatch):
    patch = tmp_path / "lr.txt"
    patch.write_text(TUNED_LR)
    repos = {name: make_real_repo(tmp_path / name, dataset, baseline_runs=3, config_change=MISTUNED)
             for name in ("as-is", "calibrated")}
    settings = repos["as-is"] / "ratchet.toml"  # without calibration one look (4 pairs) decides
    settings.write_text(settings.read_text().replace("max_pairs = 8", "max_pairs = 4"))
    for root in repos.values():
        monkeypatch.chdir(root)
        ratchet(capsys, "baseline")

    monkeypatch.chdir(repos["as-is"])
    out = ratchet(capsys, "try", str(patch), "--no-calibrate")
    baseline = ledger(repos["as-is"])[0]
    assert out["decision"] == "rejected" and len(out["experiments"]) == 1
    assert out["val_loss"] < baseline["target"] - 0.2  # it learns far better...
    assert out["reason"].startswith(("speedup", "not significant", "slower")), out  # ...and is no faster

    monkeypatch.chdir(repos["calibrated"])
    out = ratchet(capsys, "try", str(patch))
    rows = ledger(repos["calibrated"])
    parent, derived = rows[1], rows[-1]
    assert parent["decision"] == "rejected" and derived["kind"] == "calibrate" and derived["calibrates"] == parent["id"]
    assert out["decision"] == "accepted", [(r["id"], r["reason"], r.get("steps_after")) for r in rows]
    assert out["id"] == derived["id"] and out["speedup"] > 0.1 and out["val_loss"] <= derived["target"]
    steps = derived["steps_after"]
    assert derived["steps_before"] == 120 and 36 <= steps < 120  # [length] min_fraction 0.3
    r = git.Repo(repos["calibrated"])
    head = r.git.rev_parse("ratchet/default")
    assert head == out["commit"] and r.git.rev_parse(f"{head}^") == parent["parent"]
    assert re.search(rf"^\+\s+steps={steps}, lr=3e-3,", r.git.show(head), re.M)  # one commit: the edit and its length
    assert trailers(r.git.log("-1", "--format=%B", head))["Ratchet-Calibrated"] == \
        f"steps 120 -> {steps} (from default/{parent['id']})"

    replayed = ratchet(capsys, "replay", head)
    assert replayed["decision"] == "reproduced", replayed
