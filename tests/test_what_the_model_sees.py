"""What the model sees, captured from the real anthropic and openai SDKs against the fake servers: the first
request of a night (the baseline alone) and one after 30 experiments (a fixture ledger written here), each
checked for the evidence of issue #13 items 1-8 with the numbers of that ledger and state."""
import json
import math
import shutil

import numpy as np
import pytest

from agent import settings
from agent.evidence import Night
from agent.harness import Harness
from agent.measure.profile import PROFILE_FILE, read_profile, summarize
from agent.propose.anthropic_proposer import AnthropicProposer
from agent.propose.openai_proposer import OpenAIProposer
from agent.records.types import Arm
from agent.ui import cli
from agent.verdict import history
from agent.verdict.detectable import detectable
from agent.verdict.judge import CANDIDATE, INCUMBENT
from tests.fakellm import FakeLLM, call
from tests.fakerepo import make_repo
from tests.test_profile import HAND_MADE, write_profile

KEY = "sk-test-what-the-model-sees-0123456789"
EDIT = ("nanomodel/fake_train.py\n<<<<<<< SEARCH\nSLEEP = 0.1\n=======\nSLEEP = 0.05\n>>>>>>> REPLACE\n")
SUBMIT = call("submit_edit", {"hypothesis": "sleep less", "rationale": "r", "edit": EDIT, "notes": "n"})
DIFF = ("diff --git a/nanomodel/fake_train.py b/nanomodel/fake_train.py\n--- a/nanomodel/fake_train.py\n"
        "+++ b/nanomodel/fake_train.py\n@@ -1 +1 @@\n-SLEEP = 0.1\n+SLEEP = 0.09\n")
INCUMBENT_COMMIT = "c0ffee" * 6 + "abcd"
TOKENS_PER_SEC = 54321
NIGHT = Night(hours=12.0, active_s=3 * 3600.0, max_experiments=100, experiments=30)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, dataset):
    """The fake repo with its baseline measured (real runs of the stand-in trainer)."""
    root = make_repo(tmp_path_factory.mktemp("seen") / "target", dataset)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert cli.main(["baseline"]) == 0
    return root


@pytest.fixture
def repo(measured, tmp_path, monkeypatch):
    root = tmp_path / "target"
    shutil.copytree(measured, root, symlinks=True)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for name in ("ANTHROPIC_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return root


def summary_log(path, tokens_per_sec: int) -> str:
    path.write_text("step 8/8 loss 4.9200 elapsed 0.80s\n---\nfinal_train_loss: 4.9200\nval_loss:         n/a\n"
                    f"steps:            8\ntokens:           65536\ntrain_seconds:    0.80\n"
                    f"tokens_per_sec:   {tokens_per_sec}\npeak_memory_mb:   321.0\nmfu_percent:      1.23\n"
                    "world_size:       1\n")
    return str(path)


def curve(seconds: float, start: float = 5.0) -> list[dict]:
    return [{"step": s, "total": 8, "loss": start - 0.01 * s, "elapsed": 0.1 * s, "wall": seconds - 0.9 + 0.1 * s}
            for s in range(1, 9)]


def judged_runs(tmp, exp_id: str, inc: float, cand: float, rng, logs: bool = False) -> list[dict]:
    """Two blocks, I C C I then C I I C, with a little noise; the candidate's runs with summary-block logs."""
    runs = []
    for arm in (INCUMBENT, CANDIDATE, CANDIDATE, INCUMBENT, CANDIDATE, INCUMBENT, INCUMBENT, CANDIDATE):
        seconds = (cand if arm == CANDIDATE else inc) * math.exp(rng.normal(0, 0.01))
        log = summary_log(tmp / f"{exp_id}-{len(runs)}.log", TOKENS_PER_SEC) if logs and arm == CANDIDATE else ""
        runs.append({"arm": arm, "seed": 100 + len(runs) // 2, "status": "ok", "seconds": seconds, "reason": "",
                     "val_loss": 5.05 if arm == CANDIDATE else 5.1, "bits_per_byte": None, "log": log,
                     "curve": curve(seconds, 5.0 if arm == CANDIDATE else 5.05)})
    return runs


def verdict(runs: list[dict], target: float, speedup: float, p: float) -> dict:
    inc = [r["seconds"] for r in runs if r["arm"] == INCUMBENT]
    cand = [r["seconds"] for r in runs if r["arm"] == CANDIDATE]
    return {"state": "rejected", "reason": "", "cause": "", "n_pairs": len(runs) // 2, "n_runs": len(runs),
            "p_value": p, "speedup": speedup, "speedup_lower": speedup - 0.03, "speedup_upper": speedup + 0.03,
            "incumbent_mean": float(np.mean(inc)), "candidate_mean": float(np.mean(cand)),
            "val_loss_mean": float(np.mean([r["val_loss"] for r in runs if r["arm"] == CANDIDATE])),
            "target_val_loss": target}


def write_night(root, tmp) -> dict:
    """30 experiments after the baseline: accepts, judge and screen rejections, a smoke crash with its log, a
    calibrated variant, three failed proposals in a row, notes. The last accept is the incumbent."""
    h = Harness(root, settings.load(root), "default")
    state = h.ledger.load_state()
    target, parent = state["baseline"]["target"], state["baseline"]["commit"]
    rng = np.random.default_rng(0)
    rows = []

    def add(decision, stage, hypothesis, reason, **extra):
        row = {"id": f"{len(rows) + 2:04d}", "kind": "run", "parent": parent, "proposer": "anthropic:m",
               "hypothesis": hypothesis, "decision": decision, "stage": stage, "reason": reason, "runs": [],
               "time": 1e9 + len(rows), **extra}
        rows.append(row)
        return row

    for i in range(30):
        n = len(rows) + 2
        if n == 5:
            add("rejected", "screen", "Twice the layers", "screen: projected 44.8s (optimistic 40.1s) vs incumbent "
                "23.8s, a win needs < 23.3s (step 4/8)", runs=[{**judged_runs(tmp, "s", 1, 2, rng)[1],
                                                                "status": "aborted"}])
        elif n == 6:
            log = tmp / "0006-smoke.log"
            log.write_text("step 1/3 loss 5.0 elapsed 0.1s\nTraceback (most recent call last):\n"
                           "RuntimeError: the kernel needs a GPU (0006)\n")
            add("rejected", "smoke", "A Triton kernel for the MLP", "crashed (exit 1)",
                smoke={"arm": CANDIDATE, "status": "crashed", "seconds": 2.0, "log": str(log), "curve": []})
        elif n == 7:
            runs = judged_runs(tmp, "0007", 1.0, 1.01, rng)
            add("rejected", "judge", "Tuned learning rate", "slower", runs=runs,
                verdict=verdict(runs, target, -0.01, 0.9))
        elif n == 8:
            runs = judged_runs(tmp, "0008", 1.0, 0.9, rng)
            add("rejected", "judge", "Tuned learning rate", "not significant after 4 pairs", runs=runs,
                kind="calibrate", calibrates="0007", steps_before=8, steps_after=6,
                verdict=verdict(runs, target, 0.1, 0.04))
        elif n in (9, 10, 11):
            add("failed", None, "", f"proposer failed: API error 529: overloaded ({n})")
        elif n == 30:
            runs = judged_runs(tmp, "0030", 1.0, 0.93, rng, logs=True)
            add("accepted", "judge", "Fewer data-loader copies", "accepted", runs=runs, commit=INCUMBENT_COMMIT,
                diff=DIFF, verdict=verdict(runs, target, 0.07, 0.0021))
        else:
            runs = judged_runs(tmp, f"{n:04d}", 1.0, 0.995, rng)
            notes = {"notes": f"note {n}: the data loader is not the bottleneck"} if n in (20, 29) else {}
            add("rejected", "judge", f"idea number {n}", "not significant after 4 pairs", runs=runs,
                verdict=verdict(runs, target, 0.005, 0.3), **notes)
    for row in rows:
        h.ledger.append(row)
    accepted = [r for r in next(r for r in rows if r["id"] == "0030")["runs"] if r["arm"] == CANDIDATE]
    state["incumbent"] = Arm(INCUMBENT_COMMIT, [r["seconds"] for r in accepted], [r["val_loss"] for r in accepted],
                             accepted[-1]["curve"]).to_state()
    h.ledger.save_state(state)
    return state


def incumbent_profile(root, head: str) -> str:
    """A profile of the incumbent where the loop keeps it (it made one after the accept)."""
    run_dir = root / "runs" / "default" / "profiles" / head[:12]
    run_dir.mkdir(parents=True)
    text = summarize(read_profile(write_profile(run_dir / PROFILE_FILE, HAND_MADE)))
    (run_dir / "summary.txt").write_text(text)
    return text


def first_request(root, provider) -> tuple[str, list[str], dict]:
    """The proposer's first request for one proposal: (system text, user text, the body as the SDK sent it)."""
    h = Harness(root, settings.load(root), "default")
    context = h.context(h.ws.head(), night=NIGHT)
    context.smoke = None  # no smoke run: the request is what this test reads
    with FakeLLM([SUBMIT]) as server:
        proposal = provider(base_url=server.url if provider is AnthropicProposer else server.url + "/v1")
        assert proposal.propose(context).error == ""
    body = server.requests[0].body
    if provider is AnthropicProposer:
        system = body["system"][0]["text"]
        user = body["messages"][0]["content"][0]["text"]
        tools = [t["name"] for t in body["tools"]]
    else:
        system = body["messages"][0]["content"]
        user = body["messages"][1]["content"]
        tools = [t["function"]["name"] for t in body["tools"]]
    return system, user, {"tools": tools, "context": context}


PROVIDERS = [AnthropicProposer, OpenAIProposer]


@pytest.mark.parametrize("provider", PROVIDERS, ids=["anthropic", "openai"])
def test_the_first_request_of_a_night_shows_the_baseline_measured(repo, provider):
    state = Harness(repo, settings.load(repo), "default").ledger.load_state()
    system, user, extra = first_request(repo, provider)
    base = Arm.from_state(state["baseline"])
    sd = float(np.std(base.seconds, ddof=1))
    assert "# Where the time goes" in user and f"CV {sd / base.mean_seconds:.2%}" in user       # item 1
    assert f"target {state['baseline']['target']:.4f}" in user
    assert "# Loss curves" in user
    assert "# What the judge can detect" in user and "Time left: 9.0 of 12.0 h" in user      # item 3
    assert "# Experiments so far\nNone yet." in user                                          # item 4
    assert "# Known ideas" in user and "- sdpa-attention: " in user and "[tried" not in user  # item 5
    assert "# Hardware facts" in user and "do not run here" in user                          # item 6
    assert {"show_experiment", "profile", "submit_edit"} <= set(extra["tools"])              # items 2, 4, 8


@pytest.mark.parametrize("provider", PROVIDERS, ids=["anthropic", "openai"])
def test_after_30_experiments_each_item_is_there_with_the_ledgers_numbers(repo, tmp_path, provider):
    state = write_night(repo, tmp_path)
    head = Harness(repo, settings.load(repo), "default").ws.head()
    profile = incumbent_profile(repo, head)
    system, user, extra = first_request(repo, provider)
    rows = Harness(repo, settings.load(repo), "default").ledger.rows()
    sections = dict(part.split("\n", 1) for part in user.split("\n\n# ") if "\n" in part)

    # 1. measurements: the incumbent's runs (our clock), its summary block (self-reported), the loss curves
    inc = Arm.from_state(state["incumbent"])
    assert f"seconds: {inc.mean_seconds:.5g}\nruns: 4" in user
    assert f"CV {np.std(inc.seconds, ddof=1) / inc.mean_seconds:.2%}" in sections["Where the time goes"]
    assert f"tokens_per_sec {TOKENS_PER_SEC}" in user and "self-reported" in sections["Where the time goes"]
    margin = state["baseline"]["target"] - inc.mean_val_loss
    assert f"margin {margin:+.4f}" in user
    assert "incumbent" in sections["Loss curves"] and "baseline" in sections["Loss curves"]
    # 2. the incumbent's profile, as the loop kept it
    assert sections["Profile of the incumbent"].strip() == profile.strip()
    # 3. what the judge can detect at the noise of these 30 experiments, and what is left of the night
    prior = history.noise_prior(rows)
    params = settings.judge_params(settings.load(repo))
    first, last = detectable(params, math.sqrt(prior.var), prior)
    assert f"first look, {first.pairs} pairs ({2 * first.pairs} timed runs): {first.half:.1%} / {first.most:.1%}" \
        in sections["What the judge can detect"]
    assert f"{prior.df} df" in sections["What the judge can detect"]
    assert "Experiments left: 70 of 100." in user
    # 4. history with evidence: numbers, stages, the variant under its parent, the crash log, failures as one line
    history_text = sections["Experiments so far, oldest first"]
    accepted = rows[-2]
    assert (f"- 0030 accepted at judge: Fewer data-loader copies | time x{1 - 0.07:.3f} (speedup +7.0%, interval "
            f"[+4.0%, +10.0%]) over 4 pairs, p 0.0021 | val loss {accepted['verdict']['val_loss_mean']:.4f} vs "
            f"target {state['baseline']['target']:.4f} (meets it)") in history_text
    assert "changed nanomodel/fake_train.py (+1 -1)" in history_text and "+SLEEP = 0.09" not in user
    assert "- 0005 rejected at screen: Twice the layers | screen: projected 44.8s" in history_text
    assert "> RuntimeError: the kernel needs a GPU (0006)" in history_text
    assert "\n  - 0008 rejected at judge (variant of 0007: steps 8 -> 6)" in history_text
    assert "- 0009..0011: 3 failed proposals (nothing ran; last: proposer failed: API error 529: overloaded (11))" \
        in history_text
    assert "show_experiment" in extra["tools"]
    # 5. known ideas, marked tried where the ledger has them (none of the fixture's are catalog entries)
    assert "- sdpa-attention: " in sections[next(t for t in sections if t.startswith("Known ideas"))]
    # 6. hardware facts
    assert "Compile caches" in sections["Hardware facts"] and "torch" in sections["Hardware facts"]
    # 8. the model's latest notes
    notes = sections["Your notes from earlier proposals, oldest first"]
    assert notes.split("\n\n")[0].splitlines() == [f"- note {n}: the data loader is not the bottleneck" for n in (20, 29)]
    assert KEY not in json.dumps(extra["context"].history) and KEY not in system + user


def test_show_experiment_gives_a_rejected_edit_whole(repo, tmp_path):
    write_night(repo, tmp_path)
    h = Harness(repo, settings.load(repo), "default")
    context = h.context(h.ws.head(), night=NIGHT)
    text = context.show_experiment("0007")
    assert text.startswith("- 0007 rejected at judge: Tuned learning rate")
    runs = h.ledger.row("0007")["runs"]
    assert f"{runs[0]['seconds']:8.2f}s" in text and "candidate's training loss (self-reported)" in text
    assert "no diff recorded" in text
    assert "0006" in context.show_experiment("6") and "RuntimeError: the kernel needs a GPU" in context.show_experiment("6")
    with pytest.raises(ValueError, match="no experiment '0099'"):
        context.show_experiment("0099")


def test_the_incumbent_profile_is_made_once_and_the_profile_tool_checks_its_edit(repo, monkeypatch):
    h = Harness(repo, settings.load(repo), "default")
    head = h.ws.head()
    made = []
    real = h.devices.profile
    monkeypatch.setattr(h.devices, "profile", lambda tree, run_dir, incumbent=None: made.append(tree) or
                        real(tree, run_dir, incumbent))
    first = h.profile_incumbent()
    assert len(made) == 1 and not first.ok and first.text.startswith("no profile:")  # the stand-in trains nothing
    assert h.profile_incumbent().text == first.text and len(made) == 1                # kept, not made again
    context = h.context(head, night=NIGHT)
    assert context.evidence["Profile of the incumbent"] == first.text
    assert context.profile("") == first.text and len(made) == 1
    with pytest.raises(ValueError, match="edit does not apply"):
        context.profile(EDIT.replace("SLEEP = 0.1", "SLEEP = 7"))
    assert context.profile(EDIT).startswith("no profile:") and len(made) == 2          # the edit's own run
