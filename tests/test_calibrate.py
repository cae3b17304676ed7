"""Step calibration's pure parts: the length knob, the first guesses, the bisection, the decision to calibrate."""

import pytest

from agent.verdict import calibrate
from agent.verdict.calibrate import Bracket, LengthError, plan, read_length, set_length, shorter_guess
from agent.settings import preset
from nanomodel.config import CONFIGS


def curve_run(arm, losses, seconds=10.0, val=None, every=5, pace=0.1):
    curve = [{"step": (i + 1) * every, "total": every * len(losses), "loss": x, "elapsed": 0.0,
              "wall": 2.0 + (i + 1) * every * pace} for i, x in enumerate(losses)]
    return {"arm": arm, "status": "ok", "seconds": seconds, "val_loss": val, "curve": curve}


def test_each_preset_pattern_finds_its_configs_steps(tmp_path):
    source = (calibrate.Path(__file__).resolve().parents[1] / "nanomodel" / "config.py").read_text()
    for name in ("cpu-test", "cpu-tiny", "gpt2-124m"):
        assert read_length(source, preset(name).length.pattern) == CONFIGS[name].steps


def test_set_length_rewrites_only_the_knob(tmp_path):
    (tmp_path / "cfg.py").write_text('A = dict(steps=40, lr=3)\nB = dict(steps=99)\n')
    assert set_length(tmp_path, "cfg.py", r"A = dict\(steps=(\d+)", 28) == 40
    assert (tmp_path / "cfg.py").read_text() == 'A = dict(steps=28, lr=3)\nB = dict(steps=99)\n'
    with pytest.raises(LengthError, match="matches nothing"):
        set_length(tmp_path, "cfg.py", r"C = dict\(steps=(\d+)", 5)


def test_shorter_guess_is_where_the_candidate_reaches_the_incumbents_final_loss():
    inc = [curve_run("incumbent", [6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.8, 3.7])]
    cand = [curve_run("candidate", [5.0, 4.2, 3.9, 3.7, 3.6, 3.5, 3.4, 3.3])]
    # smoothed candidate curve reaches 3.7 (+ margin 0) around step 25 of 40
    assert shorter_guess(cand, inc, 40, margin=0.0) in (20, 25)
    assert shorter_guess(inc, inc, 40, margin=0.0) is None  # the incumbent itself has no shortcut


def test_plan_shorter_when_the_loss_beats_the_target_and_time_did_not():
    inc = [curve_run("incumbent", [6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.8, 3.7], val=3.75)]
    cand = [curve_run("candidate", [5.0, 4.2, 3.9, 3.7, 3.6, 3.5, 3.4, 3.3], val=3.40)]
    row = {"decision": "rejected", "reason": "not significant after 6 pairs", "runs": inc + cand,
           "verdict": {"val_loss_mean": 3.40, "candidate_mean": 10.0, "incumbent_mean": 10.0}}
    p, why = plan(row, 40, target=3.78, noise=0.01, min_speedup=0.01, min_fraction=0.3, max_fraction=1.5)
    assert p.direction == "shorter" and 12 <= p.first < 40 and "beats target" in why
    # within noise of the target: nothing to gain
    row["verdict"]["val_loss_mean"] = 3.775
    assert plan(row, 40, 3.78, 0.01, 0.01, 0.3, 1.5)[0] is None


def test_plan_longer_for_a_faster_run_that_just_misses_the_target():
    cand = [curve_run("candidate", [6.0, 5.0, 4.6, 4.4, 4.3, 4.2, 4.1, 4.0], seconds=6.0, val=3.82, pace=0.05)]
    inc = [curve_run("incumbent", [6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.8, 3.7], seconds=10.0, val=3.75)]
    row = {"decision": "rejected", "reason": "val loss 3.8200 > target 3.7800", "runs": inc + cand,
           "verdict": {"val_loss_mean": 3.82, "candidate_mean": 6.0, "incumbent_mean": 10.0}}
    p, why = plan(row, 40, target=3.78, noise=0.01, min_speedup=0.01, min_fraction=0.3, max_fraction=1.5)
    assert p.direction == "longer" and 40 < p.first <= 60 and "misses target" in why
    # the predicted time of a longer run must stay a win: a candidate as slow as the incumbent gets no plan
    row["verdict"]["candidate_mean"] = 10.0
    cand[0]["seconds"] = 10.0
    assert plan(row, 40, 3.78, 0.01, 0.01, 0.3, 1.5)[0] is None


def test_bracket_bisects_toward_the_shortest_length_that_meets_the_target():
    b = Bracket(lo=None, hi=40, floor=12, ceiling=40)
    b.record(28, met_target=True)          # met the target, was not faster: go shorter
    nxt = b.next(28)
    assert 12 <= nxt < 28
    b.record(nxt, met_target=False)        # too short: between the two
    assert b.next(nxt) == (nxt + 28) // 2
    b = Bracket(lo=40, hi=None, floor=41, ceiling=60)
    b.record(50, met_target=False)
    assert 50 < b.next(50) <= 60


def test_no_plan_without_a_verdict():
    assert plan({"decision": "rejected", "reason": "crashed", "runs": []}, 40, 3.0, 0.01, 0.01, 0.3, 1.5)[0] is None


def test_the_next_length_follows_from_the_variants_in_the_ledger():
    """The plan's first guess, then the bisection on each variant's outcome as recorded, until a variant wins, the
    lengths run out, or max_attempts variants were made: the same answer however often it is asked (a resume)."""
    inc = [curve_run("incumbent", [6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.8, 3.7], val=3.75)]
    cand = [curve_run("candidate", [5.0, 4.2, 3.9, 3.7, 3.6, 3.5, 3.4, 3.3], val=3.40)]
    first = {"id": "0002", "decision": "rejected", "reason": "not significant after 6 pairs", "runs": inc + cand,
             "verdict": {"val_loss_mean": 3.40, "candidate_mean": 10.0, "incumbent_mean": 10.0}}
    args = (40, 3.78, 0.01, 0.01, 0.3, 1.5)

    def variant(steps, val, decision="rejected"):
        return {"id": f"v{steps}", "steps_after": steps, "decision": decision, "verdict": {"val_loss_mean": val}}

    guess, p, _ = calibrate.next_length(first, [], *args, max_attempts=3)
    assert guess == p.first and p.direction == "shorter"
    # met the target, not faster: shorter still, as the bracket says
    b = Bracket(lo=None, hi=40, floor=12, ceiling=40)
    b.record(guess, met_target=True)
    assert calibrate.next_length(first, [variant(guess, 3.70)], *args, max_attempts=3)[0] == b.next(guess)
    # too short next: between the two
    second = b.next(guess)
    b.record(second, met_target=False)
    ran = [variant(guess, 3.70), variant(second, 3.90)]
    assert calibrate.next_length(first, ran, *args, max_attempts=3)[0] == b.next(second) == (second + guess) // 2
    assert calibrate.next_length(first, ran, *args, max_attempts=2)[0] is None  # the attempts are spent
    # over at a win, or at a variant without a val loss (it crashed)
    assert calibrate.next_length(first, [variant(guess, 3.70, "accepted")], *args, max_attempts=3)[0] is None
    assert calibrate.next_length(first, [variant(guess, None)], *args, max_attempts=3)[0] is None
    # no plan, no variant
    assert calibrate.next_length({**first, "decision": "accepted"}, [], *args, max_attempts=3)[0] is None
