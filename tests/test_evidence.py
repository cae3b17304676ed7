"""The evidence sections (agent/evidence.py) from hand-built ledger rows, state and run logs: the ledger's numbers
appear in the text, the incumbent's own numbers are marked self-reported, and missing pieces are said, not raised."""
import numpy as np
import pytest

from agent import evidence as ev
from agent.measure.hardware import gpu_spec
from agent.verdict.detectable import detectable
from agent.verdict.judge import JudgeParams, NoisePrior

BASE, INC, REJ = "b" * 40, "c" * 40, "d" * 40
TARGET = 3.32
SUMMARY = """---
final_train_loss: 3.9000
val_loss:         n/a
steps:            100
tokens:           409600
train_seconds:    75.00
tokens_per_sec:   5461
peak_memory_mb:   512.0
mfu_percent:      1.23
world_size:       1
"""


def curve(first_wall: float, first_elapsed: float = 12.0, pace: float = 0.7, loss0: float = 8.0) -> list[dict]:
    """Progress lines every 10 of 100 steps: the first at `first_wall` (our clock), then `pace` s/step."""
    return [{"step": s, "total": 100, "loss": loss0 - s / 50, "elapsed": first_elapsed + (s - 10) * pace,
             "wall": first_wall + (s - 10) * pace} for s in range(10, 101, 10)]


def run(arm: str, seconds: float, val_loss: float, log: str = "", lines: list | None = None) -> dict:
    return {"arm": arm, "seed": 100, "status": "ok", "seconds": seconds, "reason": "", "val_loss": val_loss,
            "bits_per_byte": None, "log": log, "curve": lines if lines is not None else curve(20.0)}


@pytest.fixture
def ledger(tmp_path):
    """A baseline of 3 runs, an accepted experiment (commit c) and a rejected one whose incumbent runs are c's; the
    latest of c's runs has a log with a summary block. -> (rows, state, that log's path)"""
    log = tmp_path / "exp-0003" / "run-03-incumbent" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("nanomodel: 0.83M params\nstep 100/100 loss 6.0000 elapsed 75.00s\n" + SUMMARY)
    rows = [
        {"id": "0001", "kind": "baseline", "parent": BASE, "decision": "baseline",
         "runs": [run("incumbent", s, v) for s, v in ((100, 3.30), (102, 3.31), (98, 3.29))]},
        {"id": "0002", "kind": "run", "parent": BASE, "commit": INC, "decision": "accepted", "smoke": {"seconds": 5.0},
         "runs": [run("incumbent", 100, 3.30), run("candidate", 90, 3.305), run("candidate", 92, 3.300),
                  run("incumbent", 101, 3.31)]},
        {"id": "0003", "kind": "run", "parent": INC, "commit": REJ, "decision": "rejected", "smoke": {"seconds": 5.0},
         "runs": [run("candidate", 95, 3.40), run("incumbent", 91, 3.302), run("candidate", 96, 3.41),
                  run("incumbent", 93, 3.298, str(log))]},
        {"id": "0004", "kind": "run", "parent": INC, "decision": "rejected", "runs": []},  # malformed: ran nothing
    ]
    state = {"baseline": {"commit": BASE, "seconds": [100, 102, 98], "val_losses": [3.30, 3.31, 3.29],
                          "curve": curve(22.0, loss0=8.2), "target": TARGET, "id": "0001"},
             "incumbent": {"commit": INC, "seconds": [90, 92], "val_losses": [3.305, 3.300], "curve": curve(20.0)}}
    return rows, state, log


def test_where_the_time_goes(ledger):
    rows, state, log = ledger
    text = ev.run_summary(rows, state, memory_mb=8192.0)
    seconds = [90, 92, 91, 93]  # c's runs: accepted as the candidate, then the incumbent of experiment 0003
    cv = np.std(seconds, ddof=1) / np.mean(seconds)
    assert f"CV {cv:.2%}" in text and "4 finished runs" in text and str(log) in text
    # the latest run (93 s): start-up 20 - 12 = 8 s, steady 63 s from step 10 to 100 at 0.7 s/step, after 93 - 83 = 10 s
    assert "93.0 s launch to exit" in text
    assert "start-up" in text and "8.0 s" in text and "0.7000 s/step" in text and "63.0 s" in text
    assert "10.0 s" in text  # after the last progress line
    # the summary block: self-reported, with our whole run beside it
    assert "Self-reported" in text and "tokens_per_sec 5461" in text and "train_seconds 75.0 (81% of our whole run)" in text
    assert "peak_memory_mb 512 (rank 0's resident set; 6% of 8192 MB RAM)" in text
    assert "mfu_percent 1.23" in text and f"tokens over our whole run: {409600 / 93:.0f}/s" in text
    assert "peak_memory_mb 512 (per GPU; 6% of 8192 MB)" in ev.run_summary(rows, state, 8192.0, gpu=True)
    # val loss: c's four evaluated runs against the baseline's target and seed sd (0.01)
    margin = TARGET - np.mean([3.305, 3.300, 3.302, 3.298])
    assert f"margin {margin:+.4f} = {margin / 0.01:.1f} seed sd" in text and "sd 0.0100 over 3 runs" in text


def test_missing_pieces_are_said(ledger, tmp_path):
    rows, state, log = ledger
    log.unlink()
    assert "Summary block: missing" in ev.run_summary(rows, state)
    rows[2]["runs"][-1]["curve"] = []
    assert "no progress lines" in ev.run_summary(rows, state)
    # no ledger rows at all: state.json's arm stands in, without logs
    text = ev.run_summary([], state)
    assert "2 finished runs" in text and "Summary block: missing" in text
    assert ev.run_summary([], {}).startswith("No incumbent yet")
    assert ev.loss_curves({}).startswith("No curves yet")
    state["baseline"]["curve"] = []
    assert "No progress lines recorded for the baseline" in ev.loss_curves(state)
    (tmp_path / "odd.log").write_text("step 1/1 loss 1.0 elapsed 1.0s\nno block here\n")
    assert ev.read_summary(str(tmp_path / "odd.log")) == {}


def test_a_summary_block_is_read_for_its_known_keys_only(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("---\nold_key: 1\n" + "x\n" * 10 + "[rank0]:---\n[rank0]:tokens_per_sec: 42\nsecret: 7\n"
                   "mfu_percent: n/a\n")
    assert ev.read_summary(str(log)) == {"tokens_per_sec": 42.0}


def test_loss_curves_side_by_side(ledger):
    _, state, _ = ledger
    text = ev.loss_curves(state)
    lines = text.splitlines()
    assert "self-reported" in lines[0] and "incumbent" in lines[1] and "baseline" in lines[1]
    assert len(lines) == 2 + 10  # ten progress lines each: ten fractions
    # at 50%: step 50, incumbent loss 8.0 - 1 = 7.0 at wall 48.0, baseline 7.2 at wall 50.0
    half = next(line for line in lines if line.startswith("   50%"))
    assert half.split() == ["50%", "|", "50", "7.0000", "48.0", "|", "50", "7.2000", "50.0"]
    state["incumbent"]["commit"] = BASE
    assert "the incumbent is the baseline" in ev.loss_curves(state)


def test_what_the_judge_can_detect(ledger):
    rows, state, _ = ledger
    params, prior = JudgeParams(), NoisePrior(0.014 ** 2, 12)
    night = ev.Night(hours=2.0, active_s=1800.0, max_experiments=10, experiments=2)
    text = ev.judge_section(rows, state, params, prior, night)
    first, last = detectable(params, 0.014, prior)
    assert f"first look, 2 pairs (4 timed runs): {first.half:.1%} / {first.most:.1%}" in text
    assert f"last look, 10 pairs (20 timed runs), were it reached: {last.half:.1%} / {last.most:.1%}" in text
    assert "sd 0.0140" in text and "12 df" in text
    # device minutes: (5 + 383) s and (5 + 375) s; experiment 0004 ran nothing and does not count
    per = np.mean([388 / 60, 380 / 60])
    assert f"{per:.1f} min (mean of 2" in text
    assert f"Time left: 1.5 of 2.0 h (~{90 / per:.0f} more experiments" in text and "Experiments left: 8 of 10" in text


def test_without_a_prior_the_noise_comes_from_the_incumbent(ledger):
    rows, state, _ = ledger
    text = ev.judge_section(rows, state, JudgeParams(), None)
    sd = np.sqrt(2) * np.std(np.log([90, 92]), ddof=1)
    assert f"sd {sd:.4f}" in text and "incumbent's 2 runs" in text and "first look, 4 pairs" in text
    state["incumbent"]["seconds"] = [90]
    assert "not known yet" in ev.judge_section([], state, JudgeParams(), None)
    assert "none run yet" in ev.judge_section([], state, JudgeParams(), None)


def test_hardware_facts():
    versions = {"python": "3.12.0", "torch": "2.13.0", "triton": "not installed"}
    cpu = ev.hardware_facts(1, None, 8192.0, versions)
    assert "Triton kernels in kernels/ do not run here" in cpu and "fp32" in cpu and "torch 2.13.0" in cpu
    assert "compiles from cold" in cpu and "TORCHINDUCTOR_CACHE_DIR" in cpu
    gpu = ev.hardware_facts(1, "NVIDIA H100 80GB HBM3", 81559.0, versions)
    assert "989 TFLOP/s dense bf16" in gpu and "3.35 TB/s" in gpu and "NVLink" in gpu and "Triton" not in gpu
    assert "unknown GPU" in ev.hardware_facts(1, "NVIDIA Tesla T4", 15360.0, versions)
    assert gpu_spec("NVIDIA H100 PCIe").interconnect.startswith("PCIe")
    assert gpu_spec("NVIDIA A100-SXM4-80GB").memory_tbs == 2.039
    assert gpu_spec("NVIDIA H200").memory_tbs == 4.8 and gpu_spec("NVIDIA L40S").model.startswith("L40S")


def test_every_section_in_order(ledger):
    rows, state, _ = ledger
    sections = ev.evidence(rows, state, JudgeParams(), None, nproc=1, night=ev.Night())
    assert list(sections) == [ev.TIME, ev.CURVES, ev.DETECT, ev.HARDWARE]
    assert all(sections.values()) and "No time or experiment budget" in sections[ev.DETECT]
