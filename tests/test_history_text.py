"""The history as the model reads it: the evidence behind each decision, variants under their parent, failures
collapsed, known ideas marked tried."""
from agent.propose.catalog import hints
from agent.propose.history_text import diffstat, experiment_detail, history_lines

DIFF = ("diff --git a/nanomodel/model.py b/nanomodel/model.py\n--- a/nanomodel/model.py\n+++ b/nanomodel/model.py\n"
        "@@ -1,3 +1,3 @@\n-old = 1\n+new = 2\n+more = 3\n")
JUDGED = {"speedup": 0.05, "speedup_lower": 0.012, "speedup_upper": 0.081, "n_pairs": 4, "p_value": 0.0031,
          "val_loss_mean": 3.412, "target_val_loss": 3.42}


def rows():
    return [
        {"id": "0001", "decision": "accepted", "stage": "judge", "hypothesis": "Fused attention", "verdict": JUDGED,
         "reason": "accepted", "diff": DIFF},
        {"id": "0002", "decision": "rejected", "stage": "judge", "hypothesis": "Tuned LR",
         "verdict": {**JUDGED, "speedup": -0.01, "val_loss_mean": 3.30}, "reason": "slower"},
        {"id": "0003", "decision": "accepted", "stage": "judge", "calibrates": "0002", "steps_before": 120,
         "steps_after": 84, "hypothesis": "Tuned LR", "verdict": JUDGED, "reason": "accepted", "diff": DIFF},
        {"id": "0004", "decision": "failed", "reason": "proposer failed: API error 500: boom"},
        {"id": "0005", "decision": "failed", "reason": "proposer failed: API error 529: overloaded"},
        {"id": "0006", "decision": "rejected", "stage": "smoke", "hypothesis": "Compile the model",
         "reason": "crashed (exit 1)", "log_tail": ["Traceback", "  File x", "RuntimeError: no compiler"]},
    ]


def test_each_line_carries_the_numbers_behind_its_decision():
    text = "\n".join(history_lines(rows()))
    assert "- 0001 accepted at judge: Fused attention | time x0.950 (speedup +5.0%, interval [+1.2%, +8.1%]) " \
           "over 4 pairs, p 0.0031 | val loss 3.4120 vs target 3.4200 (meets it)" in text
    assert "changed nanomodel/model.py (+2 -1)" in text and "+new = 2" not in text  # condensed, not the diff
    assert "val loss 3.3000 vs target 3.4200 (meets it) | slower" in text


def test_a_variant_sits_under_its_parent_and_failures_are_one_line():
    lines = history_lines(rows())
    assert lines[1].startswith("- 0002 rejected at judge: Tuned LR")
    assert lines[2].startswith("  - 0003 accepted at judge (variant of 0002: steps 120 -> 84)")
    assert lines[3] == "- 0004..0005: 2 failed proposals (nothing ran; last: proposer failed: API error 529: overloaded)"
    assert lines[4].endswith("    > RuntimeError: no compiler") and "    > Traceback" in lines[4]
    assert len(lines) == 5


def test_a_single_failure_and_an_orphan_variant_are_still_shown():
    lines = history_lines([rows()[2], rows()[3]])
    assert lines[0].startswith("- 0003 accepted at judge (variant of 0002")
    assert lines[1].startswith("- 0004 failed: ")


def test_rows_without_a_verdict_show_their_top_level_numbers():
    line = history_lines([{"id": "0001", "decision": "accepted", "hypothesis": "h", "speedup": 0.042,
                           "val_loss": 4.11}])[0]
    assert "speedup +4.2%" in line and "val loss 4.1100" in line


def test_detail_has_the_diff_the_runs_the_curve_and_the_log():
    row = {**rows()[1], "diff": DIFF, "runs": [{"arm": "incumbent", "seconds": 80.5, "val_loss": 3.41, "status": "ok"},
                                               {"arm": "candidate", "seconds": 81.25, "val_loss": 3.3, "status": "ok"}],
           "curve": [(10, 5.5), (20, 4.25)], "log_tail": ["last line"], "notes": "LR is saturated"}
    text = experiment_detail(row)
    for expected in ("+new = 2", "80.50s", "81.25s  val 3.3000", "10: 5.500, 20: 4.250", "  last line",
                     "notes: LR is saturated"):
        assert expected in text, expected


def test_diffstat_counts_lines_per_file():
    assert diffstat(DIFF + DIFF.replace("model.py", "train.py")) == \
        "nanomodel/model.py (+2 -1), nanomodel/train.py (+2 -1)"
    assert diffstat("") == "no files"


def test_known_ideas_follow_the_hardware_and_say_what_was_tried():
    history = [{"id": "0007", "key": "sdpa-attention", "decision": "accepted", "speedup": 0.081}]
    cpu = hints(history, "CPU: 2 cores, no GPU")
    gpu = hints([], "GPU: 8x NVIDIA H100 80GB HBM3")
    sdpa = next(h for h in cpu if h["name"] == "sdpa-attention")
    assert sdpa["tried"] == "0007 accepted +8.1%" and "Measured 3.4x faster attention" in sdpa["effect"]
    assert all(h["tried"] == "" for h in cpu if h["name"] != "sdpa-attention")
    assert {h["name"] for h in cpu} != {h["name"] for h in gpu}  # GPU-only entries (bf16, compile) only on GPU
