"""The evaluator end to end: fake candidate worktrees in tmp_path, a real `python -m agent.measure.evaluator` child per case.

Each candidate is a copy of the checkout's nanomodel/ and kernels/ whose model.py may get a few lines appended
(a cheat, a crash); the weights are the lead's GPT with random weights large enough to make logits distinct.
"""
import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agent.measure.captured import EvalError
from agent.measure.evaluate import evaluate
from agent.measure.evaluator import read_val_tokens
from agent.measure.probe import CPU_PROBE_NATS, ProbeFailure, make_probe_cases, probe_causality

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"vocab_size": 72, "seq_len": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
BOS = 64  # the dataset's <|bos|>; ids 0..63 are text tokens; the model's vocab (72) is padded past the data's (65)
TOKENS, WINDOW, BATCH = 128, 16, 4  # 8 windows in 2 batches of 4; the probe runs batches of 4 too


def write_shard(path, tokens, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def make_dataset(root, tokenizer: bool):
    """Two val shards (the first N+1 tokens span both), a train shard, manifest.json and maybe tokenizer.pkl."""
    rng = np.random.default_rng(0)
    val = rng.integers(0, BOS, 200)
    val[::37] = BOS  # documents start with <|bos|>, which decodes to no text bytes
    root.mkdir()
    write_shard(root / "toy_val_000000.bin", val[:100])
    write_shard(root / "toy_val_000001.bin", val[100:])
    write_shard(root / "toy_train_000000.bin", rng.integers(0, BOS, 500))
    bytes_per_token = 1.75
    (root / "manifest.json").write_text(json.dumps({"vocab_size": BOS + 1, "bos_id": BOS,
                                                    "bytes_per_token": bytes_per_token}))
    if tokenizer:
        import pickle

        import tiktoken
        # token i is the text str(i): 1 or 2 bytes, so a byte count that ignores the tokens would be wrong
        encoding = tiktoken.Encoding("toy", pat_str=r"\d+", mergeable_ranks={str(i).encode(): i for i in range(BOS)},
                                     special_tokens={"<|bos|>": BOS})
        (root / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    targets = val[1:TOKENS + 1]
    expected_bytes = sum(len(str(t)) for t in targets if t != BOS) if tokenizer else bytes_per_token * TOKENS
    return root, val, expected_bytes


@pytest.fixture
def model_and_weights(tmp_path):
    from nanomodel.model import build_model
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # logits spread by several nats: a wrong target or window would show in the loss
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"config": CONFIG, "model": model.state_dict()}, run_dir / "final.pt")
    return model.eval(), run_dir / "final.pt"


def make_worktree(tmp_path, model_suffix: str = "", name: str = "wt"):
    """A candidate worktree: the checkout's nanomodel/ and kernels/, model.py with `model_suffix` appended."""
    if not (REPO / "kernels" / "__init__.py").exists():
        pytest.skip("kernels/ is not in the checkout yet, and nanomodel.model imports it")
    worktree = tmp_path / name
    for package in ("nanomodel", "kernels"):
        shutil.copytree(REPO / package, worktree / package, ignore=shutil.ignore_patterns("__pycache__"))
    model_py = worktree / "nanomodel" / "model.py"
    model_py.write_text(model_py.read_text() + "\n" + textwrap.dedent(model_suffix))
    return worktree


def wrap_logits(expression: str) -> str:
    """model.py suffix: build_model's model returns `expression` of its honest `logits` (and its input `idx`)."""
    return f"""
    _honest_build_model = build_model

    def build_model(config):
        model = _honest_build_model(config)
        honest_forward = model.forward

        def forward(idx):
            logits = honest_forward(idx)
            return {expression}

        model.forward = forward  # an instance attribute: the state dict keeps its keys
        return model
    """


def reference_nats(model, val) -> float:
    """Sum of F.cross_entropy over the N targets, windows of WINDOW, computed here in the test's own process."""
    x = torch.from_numpy(val[:TOKENS].astype(np.int64)).view(-1, WINDOW)
    y = torch.from_numpy(val[1:TOKENS + 1].astype(np.int64)).view(-1, WINDOW)
    with torch.no_grad():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()


def run_eval(worktree, weights, data, **kwargs):
    return evaluate(worktree, weights, data, TOKENS, WINDOW, batch=BATCH, device="cpu", **kwargs)


# --- honest candidates -----------------------------------------------------------------------------------------


def test_honest_model_scores_the_reference_loss_and_exact_bytes(tmp_path, model_and_weights):
    model, weights = model_and_weights
    data, val, expected_bytes = make_dataset(tmp_path / "data", tokenizer=True)
    result = run_eval(make_worktree(tmp_path), weights, data)
    assert result["ok"], result["error"]
    assert result["causal"] is True and result["probe_max_diff"] <= 1e-4 and result["error"] is None
    assert (result["tokens"], result["window"]) == (TOKENS, WINDOW)
    nats = reference_nats(model, val)
    assert result["val_loss"] == pytest.approx(nats / TOKENS, abs=1e-5)
    assert result["bits_per_byte"] == pytest.approx(result["val_loss"] * TOKENS / math.log(2) / expected_bytes, rel=1e-12)


def test_weights_saved_through_compile_or_ddp_load_into_the_bare_model(tmp_path, model_and_weights):
    model, weights = model_and_weights
    data, val, _ = make_dataset(tmp_path / "data", tokenizer=False)
    checkpoint = torch.load(weights, weights_only=True)
    checkpoint["model"] = {f"module._orig_mod.{k}": v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, weights)
    result = run_eval(make_worktree(tmp_path), weights, data)
    assert result["ok"], result["error"]
    assert result["val_loss"] == pytest.approx(reference_nats(model, val) / TOKENS, abs=1e-5)


# --- cheats and failures ---------------------------------------------------------------------------------------


def test_model_that_sees_the_next_position_fails_the_probe(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, wrap_logits("logits + logits.roll(-1, dims=1)"))  # position t sees t+1
    result = run_eval(worktree, weights, data, probe_only=True)
    assert result["ok"] is False and result["causal"] is False
    assert "causality probe failed" in result["error"] and result["probe_max_diff"] > 1e-2
    assert result["val_loss"] is None


# What the loss ignores of the logits: a shift of a whole row (softmax is shift-invariant), and columns pushed so far
# down that exp() of them is 0. Each inflates max |logit|, the quantity the probe's old relative tolerance grew with.
LOSS_BLIND = {
    "huge shift": "logits + 1e5",
    "shift that depends on the future": "logits + 2.0 * (idx.roll(-1, dims=1) % 4)[..., None].float()",
    "buried columns": "torch.cat([logits, torch.full_like(logits[..., :8], -1e5)], dim=-1)",
}
PEEK = "logits + 5.0 * torch.nn.functional.one_hot(idx.roll(-1, dims=1), logits.size(-1)).float()"  # a bonus for the next token


def probe_model(expression: str):
    """The lead's GPT with random weights, its logits replaced by `expression` of (logits, idx), and probe cases."""
    from nanomodel.model import build_model
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)

    def forward(idx):
        with torch.no_grad():
            logits = model(idx)
            return eval(expression, {"torch": torch}, {"logits": logits, "idx": idx})

    val_rows = np.random.default_rng(1).integers(0, BOS, (BATCH, WINDOW))
    return forward, make_probe_cases(val_rows, BOS + 1, seed=3)


def logit_change_under_old_tolerance(forward, cases) -> bool:
    """Whether every logit change stays within the old rule, 1e-4 * max(1, max |logit|): what got through before."""
    for base, variants in cases:
        base_logits = forward(base)
        tol = 1e-4 * max(1.0, base_logits[0].abs().max().item())
        if any((forward(changed)[0, :t] - base_logits[0, :t]).abs().max().item() > tol for t, changed in variants):
            return False
    return True


@pytest.mark.parametrize("blind", sorted(LOSS_BLIND))
def test_transforms_the_loss_ignores_neither_hide_a_peek_nor_fail_an_honest_model(blind):
    # honest in what the loss sees: passes, whatever the logits' magnitude or their dependence on the future
    forward, cases = probe_model(LOSS_BLIND[blind])
    assert probe_causality(forward, cases, torch.device("cpu"), seed=3) <= CPU_PROBE_NATS
    # a peek at the next token under the same transform: fails, although the old tolerance would let it through
    cheat = LOSS_BLIND[blind].replace("logits", f"({PEEK})", 1)
    forward, cases = probe_model(cheat)
    if blind != "shift that depends on the future":  # that one moves the logits by up to 6 anyway
        assert logit_change_under_old_tolerance(forward, cases)
    with pytest.raises(ProbeFailure, match="log-probabilities at positions < \\d+ moved by .* nats") as failure:
        probe_causality(forward, cases, torch.device("cpu"), seed=3)
    assert failure.value.max_diff > 1.0


def test_a_peek_hidden_by_a_huge_shift_fails_in_the_evaluator_and_scores_nothing(tmp_path, model_and_weights):
    """The whole evaluator: the probe in its own process, on the candidate's model and checkpoint."""
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, wrap_logits(LOSS_BLIND["huge shift"].replace("logits", f"({PEEK})", 1)))
    result = run_eval(worktree, weights, data)
    assert result["ok"] is False and result["causal"] is False and result["val_loss"] is None
    assert "causality probe failed" in result["error"] and result["probe_max_diff"] > 1.0


def test_model_that_mixes_rows_of_the_batch_fails_the_probe(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, wrap_logits("logits + logits.mean(dim=0, keepdim=True)"))  # causal per row
    result = run_eval(worktree, weights, data)
    assert result["ok"] is False and result["causal"] is False
    assert "another row" in result["error"] and result["val_loss"] is None


def test_candidate_that_patches_the_scoring_functions_is_rejected_by_name(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, """
    import torch.nn.functional
    _sum, _logsumexp = torch.Tensor.sum, torch.logsumexp
    torch.nn.functional.cross_entropy = lambda *args, **kwargs: torch.zeros(())
    torch.Tensor.sum = lambda self, *args, **kwargs: _sum(self, *args, **kwargs) * 0.5
    torch.logsumexp = lambda *args, **kwargs: _logsumexp(*args, **kwargs) - 1.0
    """)
    result = run_eval(worktree, weights, data)
    assert result["ok"] is False and result["val_loss"] is None
    for name in ("torch.nn.functional.cross_entropy", "torch.Tensor.sum", "torch.logsumexp"):
        assert name in result["error"]


def test_candidate_that_overrides_a_torch_kernel_of_the_scoring_is_rejected(tmp_path, model_and_weights):
    """No Python attribute changes here: the dispatcher runs the candidate's logsumexp, a lower bound of the real one."""
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, """
    _aten = torch.library.Library("aten", "IMPL")
    _aten.impl("logsumexp", lambda x, dim, keepdim=False: torch.amax(x, dim, keepdim), "CPU")
    """)
    result = run_eval(worktree, weights, data)
    assert result["ok"] is False and result["val_loss"] is None
    assert "answers differently than before candidate code was imported" in result["error"]


def test_non_finite_logits_on_the_val_batches_only_are_a_failure_not_a_number(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, val, _ = make_dataset(tmp_path / "data", tokenizer=False)
    # the probe's batches have the val batches' shape and its row 0 is random or val window 0: NaN only where the
    # score of a later val window is computed (the second batch starts with window BATCH)
    second = val[BATCH * WINDOW:BATCH * WINDOW + 4].tolist()
    worktree = make_worktree(tmp_path, wrap_logits(
        f"logits * float('nan') if idx[0, :4].tolist() == {second} else logits"))
    result = run_eval(worktree, weights, data)
    assert result["causal"] is True
    assert result["ok"] is False and result["val_loss"] is None and "non-finite" in result["error"]


def test_fake_results_from_a_shadow_agent_package_or_an_atexit_handler_never_count(tmp_path, model_and_weights):
    """The worktree and the run dir hold their own agent/measure/evaluator.py, and model.py registers an atexit handler:
    each would report a perfect score. `agent` must come from the trusted root, and the evaluator must leave
    before any atexit handler runs."""
    model, weights = model_and_weights
    data, val, expected_bytes = make_dataset(tmp_path / "data", tokenizer=False)
    marker = tmp_path / "atexit-ran"
    write_fake_result = ("import json, os, sys\n"
                         "fd = int(sys.argv[sys.argv.index('--result-fd') + 1])\n"
                         "os.write(fd, json.dumps({'ok': True, 'val_loss': 0.0}).encode() + b'\\n')\n")
    worktree = make_worktree(tmp_path, f"""
    import atexit

    def _report_a_better_score():
        open({str(marker)!r}, "w").close()
        exec({write_fake_result!r})

    atexit.register(_report_a_better_score)
    """)
    for root in (worktree, weights.parent):
        (root / "agent" / "measure").mkdir(parents=True)
        (root / "agent" / "__init__.py").write_text("")
        (root / "agent" / "measure" / "__init__.py").write_text("")
        (root / "agent" / "measure" / "evaluator.py").write_text(write_fake_result + "os._exit(0)\n")
    result = run_eval(worktree, weights, data)
    assert not marker.exists()
    assert result["ok"], result["error"]
    assert result["val_loss"] == pytest.approx(reference_nats(model, val) / TOKENS, abs=1e-5)
    assert result["bits_per_byte"] == pytest.approx(result["val_loss"] * TOKENS / math.log(2) / expected_bytes, rel=1e-12)


def test_candidate_that_writes_its_own_result_is_rejected(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, """
    import os, sys
    os.write(int(sys.argv[sys.argv.index("--result-fd") + 1]), b'{"ok": true, "val_loss": 0.0}\\n')
    """)
    result = run_eval(worktree, weights, data)
    assert result["ok"] is False and result["val_loss"] is None
    assert "result pipe held 2 results" in result["error"]


def test_pickled_object_in_the_weights_is_refused_and_never_runs(tmp_path, model_and_weights):
    model, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    marker = tmp_path / "unpickled"
    torch.save({"config": CONFIG, "model": model.state_dict(), "extra": _RunsOnUnpickle(str(marker))}, weights)
    result = run_eval(make_worktree(tmp_path), weights, data)
    assert not marker.exists()
    assert result["ok"] is False and "not a weights-only checkpoint" in result["error"]


class _RunsOnUnpickle:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_candidate_that_kills_the_evaluator_gets_its_last_words_as_the_reason(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, "import os, sys\nprint('out of ideas', file=sys.stderr, flush=True)\nos._exit(3)\n")
    result = run_eval(worktree, weights, data)
    assert result["ok"] is False and result["error"] == "evaluator died: exit 3: out of ideas"


def test_candidate_that_hangs_is_killed_at_the_timeout(tmp_path, model_and_weights):
    _, weights = model_and_weights
    data, _, _ = make_dataset(tmp_path / "data", tokenizer=False)
    worktree = make_worktree(tmp_path, "import time\ntime.sleep(600)\n")
    result = run_eval(worktree, weights, data, timeout=2)
    assert result["ok"] is False and "timed out after 2s" in result["error"]


# --- the trusted shard reader ----------------------------------------------------------------------------------


def test_val_tokens_come_from_the_val_shards_in_name_order(tmp_path):
    data, val, _ = make_dataset(tmp_path / "data", tokenizer=False)
    assert np.array_equal(read_val_tokens(data, 150), val[:150])
    with pytest.raises(EvalError, match="hold 200 tokens, fewer than the 201 needed"):
        read_val_tokens(data, 201)


def test_truncated_or_foreign_val_shard_is_a_clear_error(tmp_path):
    data, val, _ = make_dataset(tmp_path / "data", tokenizer=False)
    write_shard(data / "toy_val_000001.bin", val[100:150], count=100)
    with pytest.raises(EvalError, match=r"toy_val_000001\.bin: truncated shard: header says 100 tokens"):
        read_val_tokens(data, 120)
    (data / "toy_val_000000.bin").write_bytes(b"\x00" * 2048)
    with pytest.raises(EvalError, match=r"toy_val_000000\.bin: not a token shard: magic 0"):
        read_val_tokens(data, 10)
