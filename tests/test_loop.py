"""`ratchet run` end to end: fake LLM servers (tests/fakellm.py) propose edits to the stand-in trainer of
tests/fakerepo.py; real git, runner, evaluator and judge. Subprocess tests kill, stop and resume the loop.

Every repo starts as a copy of one template whose baseline is already measured (2 runs), to keep the file fast.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pytest

from agent import cli
from agent.workspace import trailers
from tests.fakellm import FakeLLM, Step, call, reply
from tests.fakerepo import REPO, ledger, make_repo, ratchet

SECRET = "sk-test-SECRET-1234567890"  # the fake API key: it must reach the server and nothing Ratchet writes
TRAINER = "nanomodel/fake_train.py"
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


def block(old: str, new: str) -> str:
    return f"{TRAINER}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"


def submit(old: str, new: str, hypothesis: str, **kw) -> Step:
    """A tool-mode reply that hands in one SEARCH/REPLACE edit of the stand-in trainer."""
    return call("submit_edit", {"hypothesis": hypothesis, "rationale": "a scripted test edit", "edit": block(old, new)},
                **kw)


def plain(old: str, new: str, hypothesis: str) -> Step:
    """A plain-text-mode reply: the edit in prose and a fence, as chat models write it."""
    return reply(f"Here is my proposal.\n\nHYPOTHESIS: {hypothesis}\nRATIONALE: a scripted test edit\n\n```\n"
                 f"{block(old, new)}```\n")


# the scripted edits; SLEEP = 0.1 and STEPS = 8 make an incumbent run of about 0.8 s
FASTER = ("SLEEP = 0.1", "SLEEP = 0.01", "sleep a tenth as long per step")
NOOP = ("LOSS = 5.0", "LOSS = 5.0  # the same value, a new comment", "a comment that changes nothing")
NAN = ("LOSS = 5.0", 'LOSS = float("nan")', "a loss that is not a number")


@pytest.fixture(scope="module")
def template(tmp_path_factory, dataset) -> Path:
    """The fake repo with its baseline measured. One look after 4 pairs (8 timed runs) decides every edit."""
    root = make_repo(tmp_path_factory.mktemp("template") / "target", dataset)
    settings = root / "ratchet.toml"
    settings.write_text(settings.read_text().replace("max_pairs = 6", "max_pairs = 4"))
    repo = git.Repo(root)
    repo.git.commit("-a", "--amend", "--no-edit")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert cli.main(["baseline"]) == 0
    return root


@pytest.fixture
def repo(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "target"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_BASE_URL",
                 "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return root


def experiments(root: Path) -> list[dict]:
    return [r for r in ledger(root) if r["kind"] != "baseline"]


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in (root / "runs").rglob("*") if p.is_file() and not p.is_symlink()
            and secret.encode() in p.read_bytes()]


def leftover_processes(root: Path) -> list[str]:
    """Live processes (not this one) that work for this repo: a cwd, an argument or an environment value in it."""
    found, needle = [], str(root).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            if stat[stat.rindex(b")") + 2:].split()[0] in (b"Z", b"X"):
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
            if needle in cmdline or needle in Path(f"/proc/{pid}/environ").read_bytes() or cwd.startswith(needle):
                found.append(pid + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
        except OSError:
            continue  # exited meanwhile
    return found


# ---------------------------------------------------------------------------------------------------------------
# end to end, in process

def test_openai_tool_mode_end_to_end(repo, capsys, monkeypatch):
    """Three proposals: a genuine speedup (accepted), one made against the old head while the speedup was judged
    (the loop prefetches) that no longer applies, and a no-op whose first submission had a SEARCH text that is not
    in the file (the proposer sends the error back; the model fixes it)."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    base = git.Repo(repo).git.rev_parse("ratchet/default")
    script = [submit(*FASTER),
              submit("SLEEP = 0.1", "SLEEP = 0.05", "sleep half as long per step"),
              submit("LOSS = 5.00", "LOSS = 5.00  # a comment", "a comment that changes nothing"),
              submit(*NOOP)]
    with FakeLLM(script) as server:
        out = ratchet(capsys, "run", "--proposer", "openai", "--base-url", server.url + "/v1", "--max-experiments", "3")
    assert out["decision"] == "stopped" and out["reason"] == "max experiments reached (3)"
    assert not server.overrun and server.remaining == 0
    assert all(r.path == "/v1/chat/completions" and r.headers["authorization"] == f"Bearer {SECRET}"
               for r in server.requests)
    # the SEARCH text that is not in the file went back to the model as a tool error
    assert "SEARCH" in json.dumps(server.requests[3].body["messages"][-1]) and \
        "error" in server.requests[3].body["messages"][-1]["content"]

    rows = experiments(repo)
    assert [(r["id"], r["decision"], r["hypothesis"]) for r in rows] == [
        ("0002", "accepted", FASTER[2]), ("0003", "rejected", "sleep half as long per step"),
        ("0004", "rejected", NOOP[2])]
    fast, stale, noop = rows
    assert all(r["proposer"] == "openai:gpt-5-mini" and r["kind"] == "run" for r in rows)
    assert stale["reason"].startswith("edit does not apply") and stale["runs"] == []
    assert stale["proposed_on"] == base != stale["parent"]
    assert noop["reason"].startswith(("not significant", "slower", "speedup")), noop["reason"]
    assert fast["usage"]["calls"] == 1 and noop["usage"]["calls"] == 2

    r = git.Repo(repo)
    head = r.git.rev_parse("ratchet/default")
    assert r.git.rev_list(f"{base}..{head}").split() == [head] == [fast["commit"]]
    t = trailers(r.git.log("-1", "--format=%B", head))
    assert t["Ratchet-Experiment"] == "default/0002" and t["Ratchet-Proposer"] == "openai:gpt-5-mini"
    assert t["Ratchet-Wall-Clock"].startswith(f"{fast['candidate_s']:.2f}s vs {fast['incumbent_s']:.2f}s (-")
    assert t["Ratchet-Val-Loss"].startswith(f"{fast['val_loss']:.4f} (target ")
    assert "SLEEP = 0.01" in r.git.show(f"{head}:{TRAINER}")

    assert files_holding(repo, SECRET) == []
    assert SECRET not in r.git.log("--all", "-p")
    assert not any((repo / "runs" / "default" / "worktrees").iterdir())
