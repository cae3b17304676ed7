"""A runs/<tag>/ written by an earlier version (e346c42, before the stage layout, typed decisions and verdict
causes) still loads: `ratchet log`, `report` and `replay` work on it, and the tag goes on with a new experiment.

The fixture (tests/fixtures/e346c42/) holds that version's ledger.jsonl, state.json and results.tsv, and its repo as
a git bundle; it was written by e346c42's own harness on the fake trainer of tests/fakerepo.py: a baseline, a
protected-path rejection, a NaN rejection and an accepted speedup ("sleep less").
"""
import json
import shutil
import subprocess
from pathlib import Path

import git
import pytest

from agent.guard.integrity import data_fingerprint
from tests.fakerepo import SETTINGS, edit, ratchet

FIXTURE = Path(__file__).parent / "fixtures" / "e346c42"


@pytest.fixture
def old_tag(tmp_path, dataset, monkeypatch) -> Path:
    """The old repo cloned from its bundle, with the old runs/default/ beside it. The dataset path baked into the
    committed ratchet.toml is the generating machine's: the checkout's copy points at this session's dataset (the
    committed one, protected and hashed, stays as it was)."""
    root = tmp_path / "target"
    subprocess.run(["git", "clone", "-q", str(FIXTURE / "repo.bundle"), str(root)], check=True)
    repo = git.Repo(root)
    repo.git.branch("ratchet/default", "origin/ratchet/default")
    for ref in repo.git.ls_remote(str(FIXTURE / "repo.bundle"), "refs/ratchet/*").splitlines():
        sha, name = ref.split()
        repo.git.update_ref(name, sha)
    shutil.copytree(FIXTURE / "runs", root / "runs")
    # the dataset is this session's (the same corpus, built again: its manifest records the build): its fingerprint
    # replaces the generating machine's in the old state, whose format stays as it was
    state = root / "runs" / "default" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "data_fingerprint": data_fingerprint(dataset)}))
    (root / "ratchet.toml").write_text(SETTINGS.format(dataset=dataset))
    repo.git.update_index("--assume-unchanged", "ratchet.toml")  # the checkout's own settings, as a user might
    monkeypatch.chdir(root)
    return root


def old_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "runs" / "default" / "ledger.jsonl").read_text().splitlines()]


def test_log_and_report_read_the_old_ledger(old_tag, capsys):
    from agent.ui import cli

    rows = old_rows()
    assert cli.main(["log", "--tag", "default"]) == 0
    table = capsys.readouterr().out
    assert [line.split("│")[1].strip() for line in table.splitlines() if line.count("│") > 3] == [
        r["id"] for r in rows]
    assert cli.main(["status", "--tag", "default"]) == 0
    assert f"experiments  {len(rows) - 1}: 1 accepted, {len(rows) - 2} rejected" in capsys.readouterr().out
    assert cli.main(["report", "--tag", "default"]) == 0
    assert (old_tag / "runs" / "default" / "report.html").stat().st_size > 0


def test_replay_of_the_old_accepted_commit(old_tag, capsys):
    accepted = next(r for r in old_rows() if r["decision"] == "accepted")
    out = ratchet(capsys, "replay", accepted["commit"])
    assert out["decision"] == "reproduced", out
    assert out["commits"][0]["speedup"] > 0.2


def test_the_old_tag_goes_on(old_tag, capsys, tmp_path):
    """A new experiment on the old baseline and incumbent: ids continue after the old ones, and the new row sits
    beside the old rows in one ledger."""
    rows = old_rows()
    slow = tmp_path / "slow.txt"
    slow.write_text(edit("SLEEP = 0.01", "SLEEP = 0.05", "sleep more again"))
    out = ratchet(capsys, "try", str(slow), "--no-calibrate")
    assert out["decision"] == "rejected" and int(out["id"]) > max(int(r["id"]) for r in rows)
    ledger = [json.loads(line) for line in (old_tag / "runs" / "default" / "ledger.jsonl").read_text().splitlines()]
    assert ledger[:len(rows)] == rows and ledger[-1]["id"] == out["id"]


def test_old_rows_survive_a_round_trip_through_the_typed_record():
    """Every row the old version wrote reads into an Experiment and writes back with the same values: the typed
    fields, the keys it does not know (kept in `extra`), and the headline numbers, derived again from the verdict
    (a baseline: from its runs) rather than copied."""
    from agent.records.types import HEADLINE, Decision, Experiment
    rows = [json.loads(line) for line in (FIXTURE / "runs" / "default" / "ledger.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"baseline", "try"} and any(r.get("verdict") for r in rows)
    for row in rows:
        exp = Experiment.from_row({**row, "an_unknown_key": [1, 2]})
        assert isinstance(exp.decision, Decision) and exp.extra == {"an_unknown_key": [1, 2]}
        again = exp.to_row()
        assert {k: again[k] for k in row} == row, row["id"]
        for key in HEADLINE:  # computed, not stored: a row without them (a rejection before any run) has None
            assert again[key] == row.get(key), (row["id"], key)
