"""The harness on real cpu-test training (slow: `make test-slow`): issue #3's verdicts that need a real model.

A scratch repo holds the real nanomodel + kernels and the cpu-test preset; its baseline (3 runs) is measured once.
(a) a no-op, (b) a sleep per step, (c) a protected file and NaNs at evaluation run against the same kind of repo
in tests/test_redteam.py (slow tier); here: (d) an exception, (e) a NaN training loss, and (f) a genuine speedup,
the catalog's `no-dynamo-cpu` entry (torch.optim and DDP import torch._dynamo, ~1 s of a ~7 s run; the update is
the same math), accepted as one commit with trailers and reproduced by `ratchet replay`.
"""
import git
import pytest

from agent.propose.catalog import render
from agent.propose.catalog_entries import ENTRIES
from agent.workspace import trailers
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
