"""`ratchet run` end to end: fake LLM servers (tests/fakellm.py) propose edits to the stand-in trainer of
tests/fakerepo.py; real git, runner, evaluator and judge.

The OpenAI wire format runs the whole story in tool mode (accept, a stale proposal rebased, a no-op, a tool error
sent back); Anthropic runs plain-text mode and a proposer failure. Budgets, duplicates, the offline catalog and how
the loop meets a failing proposer (a refused key, failures in a row, an unpriced model, stale and just-in-time
proposals) run in process; kill -9, `ratchet stop`, SIGTERM and Ctrl-C run `ratchet run` as a subprocess against a fake server in
this process. Every repo starts as a copy of one template whose baseline is already measured, to keep this fast.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import git
import pytest

from agent.ui import cli

from agent import settings
from agent.harness import Harness
from agent.records.experiments import order_seed
from agent.verdict.judge import Judge, JudgeParams
from agent import loop as loop_module
from agent.loop import Budgets, Loop, Pacing
from agent.propose.base import Proposal
from agent.edit.workspace import trailers
from tests.fakellm import FakeLLM, Step, call, error, reply
from tests.fakerepo import NO_WIN, QUALITY, REPO, edit, ledger, make_repo, ratchet

SECRET = "sk-test-SECRET-1234567890"  # the fake API key: it must reach the server and nothing Ratchet writes
TRAINER = "nanomodel/fake_train.py"
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


def block(old: str, new: str) -> str:
    return f"{TRAINER}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"


def submit(old: str, new: str, hypothesis: str, notes: str = "", **kw) -> Step:
    """A tool-mode reply that hands in one SEARCH/REPLACE edit of the stand-in trainer."""
    arguments = {"hypothesis": hypothesis, "rationale": "a scripted test edit", "edit": block(old, new)}
    return call("submit_edit", {**arguments, "notes": notes} if notes else arguments, **kw)


def plain(old: str, new: str, hypothesis: str) -> Step:
    """A plain-text-mode reply: the edit in prose and a fence, as chat models write it."""
    return reply(f"Here is my proposal.\n\nHYPOTHESIS: {hypothesis}\nRATIONALE: a scripted test edit\n\n```\n"
                 f"{block(old, new)}```\n")


# scripted edits (SEARCH, REPLACE, hypothesis); SLEEP = 0.1 and STEPS = 8 make an incumbent run of about 0.8 s
FASTER = ("SLEEP = 0.1", "SLEEP = 0.01", "sleep a tenth as long per step")    # accepted after 8 timed runs
NOOP = ("LOSS = 5.0", "LOSS = 5.0  # the same value, a new comment", "a comment that changes nothing")
SLOWER = ("SLEEP = 0.1", "SLEEP = 0.3", "sleep three times as long per step")  # aborted in its first timed run
# rejected by the smoke run, before any timed run: cheap experiments for the budget tests
NAN = ("LOSS = 5.0", 'LOSS = float("nan")', "a loss that is not a number")
INF = ("LOSS = 5.0", 'LOSS = float("inf")', "a loss that is infinite")
CRASH = ("SLEEP = 0.1", "SLEEP = -1.0", "a negative sleep, which raises")
MILLION_INPUT_TOKENS = (1_000_000, 0, 0, 0)  # fake usage: $0.25 per reply at gpt-5-mini's list price


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


def copy_of(template: Path, root: Path) -> Path:
    shutil.copytree(template, root, symlinks=True)
    return root


@pytest.fixture
def repo(template, tmp_path, monkeypatch) -> Path:
    """A copy of the template, the current directory, with no API key or endpoint in the environment."""
    root = copy_of(template, tmp_path / "target")
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


@pytest.fixture
def start():
    """start(root, server, *args): `ratchet run --proposer openai` in `root` as a subprocess, its output in files
    beside the repo. Any still running when the test ends (it failed) is killed."""
    started = []

    def start(root: Path, server: FakeLLM, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": SECRET}
        paths = [root.parent / f"{root.name}-{len(started)}.{ext}" for ext in ("out", "err")]
        with open(paths[0], "w") as out, open(paths[1], "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "agent.ui.cli", "run", "--proposer", "openai", "--base-url",
                                     server.url + "/v1", *args, "--json"], cwd=root, env=env, stdout=out, stderr=err)
        proc.output_paths, proc.started = paths, time.time()
        started.append(proc)
        return proc
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict | None, str]:
    """(exit code, the JSON line or None, stderr) of a started run."""
    code = proc.wait(timeout)
    out, err = (path.read_text() for path in proc.output_paths)
    lines = out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None, err


def wait_for(predicate, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def fresh(path: Path, proc: subprocess.Popen) -> bool:
    """path exists and was written by `proc` (an interrupted run's folder stays until the next resume)."""
    try:
        return path.stat().st_mtime > proc.started
    except FileNotFoundError:
        return False


def state(root: Path) -> dict:
    return json.loads((root / "runs" / "default" / "state.json").read_text())


def loop_state(root: Path) -> dict:
    return json.loads((root / "runs" / "default" / "loop.json").read_text())


def branch_diff(root: Path) -> str:
    r = git.Repo(root)
    return r.git.diff(r.git.rev_parse("HEAD"), "ratchet/default")


# ---------------------------------------------------------------------------------------------------------------
# end to end, in process

def test_openai_tool_mode_end_to_end(repo, capsys, monkeypatch):
    """Three experiments: a genuine speedup (accepted) with the model's notes; one made against the old head while
    the speedup was judged (the loop prefetches) that no longer applies, so the model is asked to rebase it (its
    rebase is a comment, judged a no-op); and a NaN loss whose first submission had a SEARCH text that is not in the
    file (the proposer sends the error back; the model fixes it)."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    base = git.Repo(repo).git.rev_parse("ratchet/default")
    script = [submit(*FASTER, notes="the sleep is the whole step: try the loss next"),
              submit("SLEEP = 0.1", "SLEEP = 0.05", "sleep half as long per step"),
              submit("SLEEP = 0.01", "SLEEP = 0.01  # already below half", "sleep half as long per step"),
              submit("LOSS = 5.00", 'LOSS = float("nan")', NAN[2]),
              submit(*NAN)]
    with FakeLLM(script) as server:
        out = ratchet(capsys, "run", "--proposer", "openai", "--base-url", server.url + "/v1", "--max-experiments", "3")
    assert out["decision"] == "stopped" and out["reason"] == "max experiments reached (3)"
    assert not server.overrun and server.remaining == 0 and len(server.probes) == 1
    assert all(r.path == "/v1/chat/completions" and r.headers["authorization"] == f"Bearer {SECRET}"
               for r in server.requests + server.probes)
    # the stale edit went back with the error on the new head; the SEARCH text not in the file went back as a tool error
    rebase = json.dumps(server.requests[2].body["messages"])
    assert "no longer passes the check" in rebase and "SEARCH text not found" in rebase and "SLEEP = 0.05" in rebase
    answer = server.requests[4].body["messages"][-1]
    assert answer["role"] == "tool" and "SEARCH text not found" in answer["content"]

    rows = experiments(repo)
    assert [(r["id"], r["decision"], r["hypothesis"]) for r in rows] == [
        ("0002", "accepted", FASTER[2]), ("0003", "rejected", "sleep half as long per step"),
        ("0004", "rejected", NAN[2])]
    fast, rebased, nan = rows
    assert all(r["proposer"] == "openai:gpt-5-mini" and r["kind"] == "run" for r in rows)
    assert fast["notes"] == "the sleep is the whole step: try the loss next" and rebased["notes"] == ""
    assert rebased["proposed_on"] == rebased["parent"] == fast["commit"] != base
    assert "+SLEEP = 0.01  # already below half" in rebased["diff"]
    assert rebased["reason"].startswith(NO_WIN), rebased["reason"]
    assert nan["reason"] == "loss is nan at step 1"
    assert fast["usage"]["calls"] == 1 and rebased["usage"]["calls"] == 2 and nan["usage"]["calls"] == 2

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
    # an LLM reads the incumbent's profile: made at the start (the baseline's head) and after the accept, once each
    profiles = repo / "runs" / "default" / "profiles"
    assert sorted(p.name for p in profiles.iterdir()) == sorted([base[:12], head[:12]])
    assert all((p / "summary.txt").read_text().startswith("no profile:") for p in profiles.iterdir())  # a stand-in


def test_anthropic_plain_text_mode_and_a_proposer_failure(repo, capsys, monkeypatch):
    """--no-tools: each reply is the edit. A NaN loss (rejected by the smoke run, before any timed run), then two
    replies whose SEARCH text is not in the file: the corrective follow-up fails too, and the loop records the
    proposer's failure without running anything, waits the back-off and asks again; the failure is no experiment."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    waits = []
    monkeypatch.setattr(loop_module, "_wait", lambda seconds, should_stop: waits.append(seconds))
    absent = ("SLEEP = 0.5", "SLEEP = 0.05", "sleep less than a value the file does not have")
    with FakeLLM([plain(*NAN), plain(*absent), plain(*absent), plain(*INF)]) as server:
        out = ratchet(capsys, "run", "--proposer", "anthropic", "--base-url", server.url, "--no-tools",
                      "--max-experiments", "2")
    assert out["reason"] == "max experiments reached (2)" and waits == [Pacing().backoff_s]
    assert not server.overrun and server.remaining == 0
    for request in server.requests:
        assert request.path == "/v1/messages" and "tools" not in request.body
        assert SECRET in request.headers.get("x-api-key", "") + request.headers.get("authorization", "")
    assert "could not be used as an edit" in json.dumps(server.requests[2].body["messages"][-1])

    nan, failed, inf = experiments(repo)
    assert nan["proposer"] == failed["proposer"] == "anthropic:claude-sonnet-5-5"
    assert (nan["decision"], nan["reason"]) == ("rejected", "loss is nan at step 1") and nan["runs"] == []
    assert nan["hypothesis"] == NAN[2] and inf["hypothesis"] == INF[2]
    assert failed["decision"] == "failed" and failed["reason"].startswith("proposer failed: no valid edit")
    assert "SEARCH text not found" in failed["reason"] and failed["usage"]["calls"] == 2
    assert git.Repo(repo).git.rev_parse("ratchet/default") == nan["parent"] == failed["parent"]
    assert loop_state(repo)["experiments"] == 2
    assert files_holding(repo, SECRET) == [] and SECRET not in git.Repo(repo).git.log("--all", "-p")


# ---------------------------------------------------------------------------------------------------------------
# budgets (in process)

def run_openai(capsys, server, *args) -> dict:
    return ratchet(capsys, "run", "--proposer", "openai", "--base-url", server.url + "/v1", *args)


def test_max_experiments_stops_after_n(repo, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeLLM([submit(*NAN), submit(*INF), submit(*CRASH)]) as server:
        out = run_openai(capsys, server, "--max-experiments", "2")
    assert out["reason"] == "max experiments reached (2)"
    assert [r["hypothesis"] for r in experiments(repo)] == [NAN[2], INF[2]]
    assert len(server.requests) == 2  # nothing was asked ahead for an experiment that the budget rules out


def test_budget_usd_stops_when_the_spend_reaches_it(repo, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    script = [submit(*edit, usage=MILLION_INPUT_TOKENS) for edit in (NAN, INF, CRASH)]
    with FakeLLM(script) as server:
        out = run_openai(capsys, server, "--budget-usd", "0.5")
    assert out["reason"] == "spend budget reached ($0.50)"
    rows = experiments(repo)
    assert [r["hypothesis"] for r in rows] == [NAN[2], INF[2]] and len(server.requests) == 2
    assert [r["usage"]["cost_usd"] for r in rows] == [pytest.approx(0.25)] * 2
    loop = loop_state(repo)
    assert loop["spent_usd"] == pytest.approx(0.5) and loop["queue"] == []


def test_hours_budget_stops_and_keeps_the_proposal_made_ahead(repo, capsys, monkeypatch):
    """The time budget ends the loop after its first experiment. The proposal asked for while it ran is paid
    for: it is saved, and the next `ratchet run` runs it without asking the LLM again."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeLLM([submit(*NAN), submit(*INF)]) as server:
        out = run_openai(capsys, server, "--hours", "0.0001")
        assert out["reason"].startswith("time budget reached")
        assert [r["hypothesis"] for r in experiments(repo)] == [NAN[2]]
        loop = loop_state(repo)
        assert [q["proposal"]["hypothesis"] for q in loop["queue"]] == [INF[2]]
        assert loop["active_s"] >= 0.36

        out = run_openai(capsys, server, "--max-experiments", "2")
        assert out["reason"] == "max experiments reached (2)"
    assert [r["hypothesis"] for r in experiments(repo)] == [NAN[2], INF[2]]
    assert len(server.requests) == 2 and not server.overrun


def test_stop_while_waiting_for_the_llm_keeps_the_proposal(repo, capsys, monkeypatch):
    """A stop asked for while the LLM thinks ends the loop when the proposal arrives, before any run; the
    proposal is saved and the next `ratchet run` runs it without asking again."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeLLM([submit(*NAN, delay_s=1.0)]) as server:
        stopper = threading.Thread(target=lambda: wait_for(lambda: server.requests) and cli.main(["stop"]))
        stopper.start()
        out = run_openai(capsys, server, "--max-experiments", "1")
        stopper.join()
        assert out["reason"] == "stop requested"
        assert [r["kind"] for r in ledger(repo)] == ["baseline"] and not (repo / "runs" / "default" / "exp-0002").exists()
        out = run_openai(capsys, server, "--max-experiments", "1")
    assert out["reason"] == "max experiments reached (1)"
    assert [r["hypothesis"] for r in experiments(repo)] == [NAN[2]] and len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------------------
# a failing proposer

@pytest.mark.parametrize("status, named", [(401, "the key in OPENAI_API_KEY was refused"),
                                           (404, "model 'gpt-nope' not found")])
def test_a_refused_key_or_an_unknown_model_stops_ratchet_run_at_once(repo, capsys, monkeypatch, status, named):
    """The pre-flight request meets the error: `ratchet run` exits 2 naming what to fix, before any experiment."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeLLM([error(status, message=f"denied {SECRET}")] * 10, answer_probes=False) as server:
        code = cli.main(["run", "--proposer", "openai", "--model", "gpt-nope", "--base-url", server.url + "/v1",
                         "--json"])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # the console wraps long lines
    assert code == 2 and named in err and captured.out == ""
    assert len(server.requests) <= 3 and experiments(repo) == []
    assert SECRET not in captured.err and files_holding(repo, SECRET) == []


class Scripted:
    """An LLM-like proposer (no catalog keys): `proposals` in order, then nothing; a rebase answers `rebased`."""
    name = "scripted"

    def __init__(self, proposals: list[Proposal], rebased: Proposal | None = None):
        self.proposals, self.rebased = list(proposals), rebased
        self.seen: list[list[str]] = []   # the ids in each context's history
        self.problems: list[str] = []     # why each rebase was asked for

    def propose(self, context):
        self.seen.append([row["id"] for row in context.history])
        return self.proposals.pop(0) if self.proposals else None

    def rebase(self, proposal, context, problem):
        self.problems.append(problem)
        return self.rebased


def proposed(old: str, new: str, hypothesis: str) -> Proposal:
    return Proposal(text=edit(old, new, hypothesis), proposer=Scripted.name, hypothesis=hypothesis)


def failure(n: int) -> Proposal:
    return Proposal(text="", proposer=Scripted.name, error=f"API error 500: down ({n})")


def test_failed_proposals_back_off_stop_the_loop_and_are_not_experiments(repo):
    """Failures in a row wait longer each time (capped) and stop the loop at the bound; a proposal in between
    starts the count again; none of them is an experiment, though each has its ledger row."""
    waits = []
    proposer = Scripted([failure(1), failure(2), proposed(*NAN), failure(3), failure(4), failure(5), proposed(*INF)])
    loop = Loop(Harness(repo, settings.load(repo), "default"), proposer, Budgets(max_experiments=3),
                pacing=Pacing(backoff_s=10, max_backoff_s=15, max_failures=3),
                wait=lambda seconds, should_stop: waits.append(seconds))
    assert loop.run() == "the proposer failed 3 times in a row (the last: API error 500: down (5))"
    assert waits == [10, 15, 10, 15]
    assert [(r["decision"], r["hypothesis"]) for r in experiments(repo)] == \
        [("failed", "")] * 2 + [("rejected", NAN[2])] + [("failed", "")] * 3
    assert experiments(repo)[0]["reason"] == "proposer failed: API error 500: down (1)"
    assert loop_state(repo)["experiments"] == 1 and loop_state(repo)["queue"] == []


def test_pacing_asks_ahead_unless_experiments_are_long_and_proposals_short():
    pacing = Pacing()
    assert [pacing.backoff(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert pacing.ask_ahead([30.0], 3600.0) is False                              # 2 min idle in an hour: wait
    assert pacing.ask_ahead([300.0], 3600.0) is True                              # a proposal is a twelfth of it
    assert pacing.ask_ahead([1.0], 300.0) is True                                 # short experiments: overlap
    assert pacing.ask_ahead([], 3600.0) is pacing.ask_ahead([30.0], None) is True  # not known yet


@pytest.mark.parametrize("pacing, seen", [(Pacing(), [[], []]),
                                          (Pacing(long_experiment_s=0, just_in_time_ratio=0), [[], ["0002"]])])
def test_just_in_time_proposals_see_the_latest_result(repo, pacing, seen):
    """Asked ahead, the second proposal is made while the first experiment runs; just in time, after its result."""
    proposer = Scripted([proposed(*NAN), proposed(*INF)])
    loop = Loop(Harness(repo, settings.load(repo), "default"), proposer, Budgets(max_experiments=2), pacing=pacing)
    assert loop.run() == "max experiments reached (2)"
    assert proposer.seen == seen


@pytest.mark.parametrize("rebased", [proposed(*NAN), failure(9)])
def test_a_stale_proposal_is_rebased_before_it_runs(repo, rebased):
    """Made while the speedup was judged, against the old head, the next edit no longer applies after the accept:
    its proposer is asked to rebase it, and the rebase runs in its place (or is recorded as the failure it is)."""
    stale = proposed("SLEEP = 0.1", "SLEEP = 0.05", "sleep half as long per step")
    proposer = Scripted([proposed(*FASTER), stale], rebased)
    loop = Loop(Harness(repo, settings.load(repo), "default"), proposer, Budgets(max_experiments=2),
                wait=lambda seconds, should_stop: None)
    loop.run()
    [problem] = proposer.problems
    assert "SEARCH text not found" in problem
    fast, second = experiments(repo)[:2]
    assert fast["decision"] == "accepted" and second["proposed_on"] == second["parent"] == fast["commit"]
    if rebased.error:
        assert second["decision"] == "failed"
        assert second["reason"].startswith("proposer failed: no rebase after an accept (nanomodel/fake_train.py: "
                                           "block #1: SEARCH text not found")
    else:
        assert (second["hypothesis"], second["reason"]) == (NAN[2], "loss is nan at step 1")


def test_an_unpriced_model_refuses_a_spend_budget_unless_priced(repo, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeLLM([]) as server:
        args = ["run", "--proposer", "openai", "--model", "qwen3-coder", "--base-url", server.url + "/v1",
                "--budget-usd", "1", "--max-experiments", "0", "--json"]
        code = cli.main(args)
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "model 'qwen3-coder' has no price" in err and "--price INPUT,OUTPUT" in err
        assert server.probes == [] and not (repo / "runs" / "default" / "loop.json").exists()
        assert ratchet(capsys, *args[:-1], "--price", "0.5,1.5")["reason"] == "max experiments reached (0)"
    assert len(server.probes) == 1


# ---------------------------------------------------------------------------------------------------------------
# duplicates, the offline catalog

def test_near_duplicate_proposal_is_not_run(repo, capsys, monkeypatch):
    """The same change again, with trailing spaces and a blank line (so other hunk line numbers): same
    normalized diff, rejected as a duplicate before any run of the loop's."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    again = (NAN[0], NAN[1] + "   \n", "the same NaN edit, worded differently")
    with FakeLLM([submit(*NAN), submit(*again)]) as server:
        run_openai(capsys, server, "--max-experiments", "2")
    first, second = experiments(repo)
    assert first["diff"] != second["diff"]
    assert second["decision"] == "rejected" and second["reason"] == f"duplicate of experiment {first['id']}"
    assert second["runs"] == [] and "smoke" not in second
    assert not [p for p in (repo / "runs" / "default" / f"exp-{second['id']}").iterdir() if p.is_dir()]


class KeyedScript:
    """A catalog-like proposer: keyed edits in order, skipping those tried or pending (as CatalogProposer does)."""
    name = "catalog"

    def __init__(self, edits):
        self.edits = edits

    def propose(self, context):
        seen = {row.get("key") for row in context.history + context.pending}
        return next((Proposal(text=edit(old, new, hypothesis), proposer=self.name, hypothesis=hypothesis, key=key)
                     for key, (old, new, hypothesis) in self.edits if key not in seen), None)


def test_an_entry_prepared_before_an_accept_is_proposed_again_on_the_new_head(repo):
    """While the speedup trains, the next entry is prepared against the old head; after the accept it is dropped
    and made again against the new head, then runs there; then the proposer has nothing left."""
    loop = Loop(Harness(repo, settings.load(repo), "default"), KeyedScript([("fast", FASTER), ("nan", NAN)]),
                Budgets(max_experiments=5))
    assert loop.run() == "the proposer has nothing left"
    fast, nan = experiments(repo)
    assert (fast["key"], fast["decision"], nan["key"], nan["decision"]) == ("fast", "accepted", "nan", "rejected")
    assert nan["parent"] == nan["proposed_on"] == fast["commit"]
    assert loop_state(repo)["queue"] == [] and loop_state(repo)["experiments"] == 2


def test_catalog_is_the_offline_default_and_says_so(tmp_path, dataset, capsys, monkeypatch):
    """No API key in the environment: `ratchet run` picks the catalog and says why; on a tag without a baseline
    it measures one first."""
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    root = make_repo(tmp_path / "target", dataset)
    monkeypatch.chdir(root)
    code = cli.main(["run", "--max-experiments", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    err = " ".join(captured.err.split())  # the console wraps long lines
    assert "proposer: catalog (offline, built-in speedrun ideas; no ANTHROPIC_API_KEY or OPENAI_API_KEY set)" in err
    assert "no baseline for this tag yet: measuring it first" in err
    assert json.loads(captured.out.splitlines()[-1])["reason"] == "max experiments reached (0)"
    assert [r["kind"] for r in ledger(root)] == ["baseline"]
    assert not (root / "runs" / "default" / "profiles").exists()  # the catalog reads no profile: none is made


# ---------------------------------------------------------------------------------------------------------------
# kill -9, stop, SIGTERM, Ctrl-C: `ratchet run` as a subprocess, the fake server in this process

def kill_9_then_resume(template, tmp_path, start, script: list) -> tuple[Path, Path, dict]:
    """`ratchet run --max-experiments 2` with `script` on two copies of the template: one uninterrupted, one
    killed -9 once experiment 0003 has a timed run going, then run again with the same command.
    -> (killed, whole, what the killed one had left: its state, loop, ledger ids and LLM requests)."""
    killed, whole = copy_of(template, tmp_path / "killed"), copy_of(template, tmp_path / "whole")
    args = ("--max-experiments", "2")
    with FakeLLM(list(script)) as server, FakeLLM(list(script)) as reference:
        uninterrupted = start(whole, reference, *args)
        proc = start(killed, server, *args)
        exp3 = killed / "runs" / "default" / "exp-0003"
        assert wait_for(lambda: any(exp3.glob("run-*/train.log")) or proc.poll() is not None, timeout=300)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = {"state": state(killed), "loop": loop_state(killed), "ids": [r["id"] for r in ledger(killed)],
                   "requests": len(server.requests)}
        for proc in (start(killed, server, *args), uninterrupted):
            code, out, err = finish(proc)
            assert code == 0 and out["reason"] == "max experiments reached (2)", err[-2000:]
        assert len(server.requests) == len(reference.requests) and not server.overrun  # nothing asked twice
    for root in (killed, whole):
        assert git.Repo(root).git.worktree("list").count("\n") == 0  # the user's checkout only
        assert not any((root / "runs" / "default" / "worktrees").iterdir())
        assert leftover_processes(root) == []
        assert files_holding(root, SECRET) == []
    return killed, whole, at_kill


def test_kill_9_mid_experiment_then_resume_matches_an_uninterrupted_run(template, tmp_path, start):
    """kill -9 while experiment 2 (a speedup) trains; the same command again finishes it without asking the LLM
    again (the proposal was saved), and the outcome equals that of an uninterrupted run of the same script."""
    killed, whole, at_kill = kill_9_then_resume(template, tmp_path, start, [submit(*NAN), submit(*FASTER)])
    assert at_kill["state"]["inflight"]["id"] == "0003" and at_kill["ids"] == ["0001", "0002"]
    assert [q["proposal"]["hypothesis"] for q in at_kill["loop"]["queue"]] == [FASTER[2]] and at_kill["requests"] == 2

    def outcome(root):
        return [(r["id"], r["kind"], r["decision"], r["hypothesis"], r.get("diff"),
                 r["reason"] if r["decision"] != "accepted" else "") for r in ledger(root)]
    assert outcome(killed) == outcome(whole)
    assert [r["decision"] for r in ledger(killed)] == ["baseline", "rejected", "accepted"]
    assert branch_diff(killed) == branch_diff(whole) and "+SLEEP = 0.01" in branch_diff(killed)


def test_kill_9_during_calibration_then_resume_finishes_it_once(template, tmp_path, start):
    """kill -9 while the calibrated variant of an edit trains: the resume reuses the parent's verdict from the
    ledger and runs only the variant (re-running the parent would reject it as a duplicate of itself); branch,
    ledger and experiment count equal an uninterrupted run's. The next proposal, asked for while the edit
    trained, was saved when it arrived: the kill did not lose it."""
    killed, whole, at_kill = kill_9_then_resume(template, tmp_path, start, [submit(*QUALITY), submit(*NAN)])
    assert at_kill["state"]["inflight"]["id"] == "0003" and at_kill["ids"] == ["0001", "0002"]
    assert [q["proposal"]["hypothesis"] for q in at_kill["loop"]["queue"]] == [QUALITY[2], NAN[2]]

    def outcome(root):
        return [(r["id"], r["kind"], r["decision"], r.get("calibrates"), r.get("steps_after")) for r in ledger(root)]
    assert outcome(killed) == outcome(whole) == [("0001", "baseline", "baseline", None, None),
                                                 ("0002", "run", "rejected", None, None),
                                                 ("0003", "calibrate", "accepted", "0002", 3)]
    assert branch_diff(killed) == branch_diff(whole) and "+STEPS = 3" in branch_diff(killed)
    assert [q["proposal"]["hypothesis"] for q in loop_state(killed)["queue"]] == [NAN[2]]


def test_stop_sigterm_and_ctrl_c_then_resume(repo, start):
    """`ratchet stop` and SIGTERM let the training run in progress finish, then stop; a second Ctrl-C kills it
    at once, even with a proposal still being made (the LLM does not answer). Each resume keeps the runs that
    finished (exp-<id>/runs.jsonl) and goes on with the next one, and the LLM is asked for the experiment once in
    all. The edit is a no-op, so that every timed run takes the full length whichever arm it is."""
    exp = repo / "runs" / "default" / "exp-0002"
    order = Judge(JudgeParams(), 0.0, order_seed("default", "0002")).order
    log = [exp / f"run-{i:02d}-{order[i]}" / "train.log" for i in range(3)]
    with FakeLLM([submit(*NOOP), Step(text="never sent in time", delay_s=600)]) as server:
        for index, interrupt in enumerate(("ratchet stop", "SIGTERM")):
            proc = start(repo, server, "--max-experiments", "1")
            assert wait_for(lambda proc=proc: fresh(log[index], proc) or proc.poll() is not None)
            if interrupt == "SIGTERM":
                proc.send_signal(signal.SIGTERM)
            else:
                assert cli.main(["stop"]) == 0
            code, out, err = finish(proc)
            assert code == 0 and out["reason"] == "stop requested (the same command resumes the interrupted experiment)", err
            assert "step 8/8" in log[index].read_text()  # the run in progress was finished ...
            assert not log[index + 1].parent.exists()    # ... and no other started
            assert state(repo)["inflight"]["id"] == "0002" and [r["id"] for r in ledger(repo)] == ["0001"]
            finished = [json.loads(line) for line in (exp / "runs.jsonl").read_text().splitlines()]
            assert len(finished) == 1 + index + 1  # the smoke run and every timed run so far: none measured twice
            assert leftover_processes(repo) == []
            assert len(server.requests) == 1  # the resume ran the saved proposal

        # two experiments allowed this time: the next proposal is asked for while this one trains
        proc = start(repo, server, "--max-experiments", "2")
        assert wait_for(lambda: fresh(log[2], proc) and len(server.requests) == 2 or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        code, out, err = finish(proc, timeout=60)  # not held up by the proposal in flight
        assert code == 130 and "interrupted" in err and out is None
        assert "step 8/8" not in log[2].read_text()
        assert leftover_processes(repo) == []
        assert state(repo)["inflight"]["id"] == "0002"

        code, out, err = finish(start(repo, server, "--max-experiments", "1"))
        assert code == 0 and out["reason"] == "max experiments reached (1)", err[-2000:]
    rows = ledger(repo)
    assert [(r["id"], r["decision"], r["hypothesis"]) for r in rows] == [
        ("0001", "baseline", "baseline"), ("0002", "rejected", NOOP[2])]
    assert rows[1]["reason"].startswith(("slower", "speedup", "not significant", "screen")), rows[1]["reason"]
    assert rows[1]["runs"][:2] == finished[1:]  # the two runs finished before the stops, as measured then
    assert len(server.requests) == 2  # the no-op once; the proposal cut short by Ctrl-C once
