"""The evaluator: validation loss and a causality probe of a candidate's final weights, in a process of its own.

Started by agent/measure/evaluate.py as `python -m agent.measure.evaluator ...` (see `parse_args`); it writes one
JSON object with RESULT_KEYS to --result-fd (or --out). In this order:
  1. trusted setup, before any candidate code runs: the first N+1 val tokens (own shard reader, not the
     candidate's nanomodel.data), the target bytes for bits per byte, the checkpoint (weights_only), the probe
     inputs, and a snapshot of the identity of every attribute of the modules and classes the scoring relies on;
     the functions it calls after that are captured in agent/measure/captured.py;
  2. import the candidate's `nanomodel.model.build_model` from WORKTREE (and nothing of that name from elsewhere);
  3. build the model, load the weights strictly, eval mode, no grad;
  4. causality probe (agent/measure/probe.py): the log-probabilities (what the loss sees) at positions < t of row 0
     must not move by more than an absolute tolerance in nats when the tokens at positions >= t of row 0 and every
     token of the other rows change (random rows and a real val row; fresh random cut and tokens each run);
  5. val loss over N/T fixed, non-overlapping windows of the evaluator's window T: logsumexp - target logit per
     token from the logits, summed in float64; bits per byte = nats / ln 2 / bytes.
     Probe and scoring call the model the same way (fp32, no autocast, [batch, T]: the last batch is padded);
  6. after every forward and at the end: any rebound attribute of the snapshot, a torch function/dispatch mode left
     active, a changed val slice or a scoring path that answers differently than before the import is a failure.
The candidate runs inside this process, so the result goes to a file descriptor the harness reads, and the process
leaves with os._exit(0) right after writing it: no candidate atexit handler or thread runs after the result.
Every module this process imports before step 2 is the trusted root's (the launcher sets PYTHONPATH and
PYTHONSAFEPATH); the worktree reaches sys.path only in `import_build_model`.
"""
import argparse
import builtins
import inspect
import json
import json.encoder
import math
import os
import pickle
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agent.measure import captured, probe
from agent.measure.captured import (EvalError, _all, _dispatch_modes, _encode_json, _eval, _from_numpy,
                                    _function_modes, _gather, _isfinite, _item, _load_state_dict, _logsumexp, _Module,
                                    _no_grad, _os_exit, _os_write, _perf_counter, _sha256, _squeeze, _sub, _sum,
                                    _Tensor, _to, _unsqueeze)
from agent.measure.probe import ProbeFailure, make_probe_cases, probe_causality

CANDIDATE_PACKAGES = ("nanomodel", "kernels")  # top-level packages that must come from the candidate's worktree
SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # modded-nanogpt shard header: 256 int32 (magic, version, count, 0...)
HEADER_BYTES = 256 * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_ERROR_CHARS = 2000  # a candidate's exception message can be huge; the result must stay far below a pipe's buffer
# torch rewrites these itself (torch._dynamo on import and on the first torch.compile): a candidate that compiles
# is no cheat, and the evaluator calls none of them once candidate code has run
TORCH_SELF_PATCHES = frozenset({"torch.manual_seed", "torch.nn.Module.__init__", "torch.nn.Module.__setstate__"})
RESULT_KEYS = ("ok", "val_loss", "bits_per_byte", "tokens", "window", "causal", "probe_max_diff", "error", "seconds")


# --- trusted reading of the validation data --------------------------------------------------------------------


def read_val_tokens(data_dir: Path, n: int) -> np.ndarray:
    """The first n tokens of the val shards (`*_val_*.bin`, sorted by name) as a read-only uint16[n]."""
    shards = sorted(Path(data_dir).glob("*_val_*.bin"))
    if not shards:
        raise EvalError(f"{data_dir}: no validation shards (*_val_*.bin)")
    parts, held = [], 0
    for path in shards:
        parts.append(_read_shard(path, n - held))
        held += len(parts[-1])
        if held == n:
            break
    if held < n:
        raise EvalError(f"{data_dir}: the validation shards hold {held} tokens, fewer than the {n} needed")
    tokens = np.concatenate(parts)
    tokens.setflags(write=False)
    return tokens


def _read_shard(path: Path, limit: int) -> np.ndarray:
    """Check the header and the file size of one shard; return its first `limit` tokens (or all it has)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        if len(header) * 4 < HEADER_BYTES:
            raise EvalError(f"{path}: not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
        magic, version, count = (int(v) for v in header[:3])
        if magic != SHARD_MAGIC or version != SHARD_VERSION:
            raise EvalError(f"{path}: not a token shard: magic {magic} version {version}, "
                            f"expected {SHARD_MAGIC} version {SHARD_VERSION}")
        expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
        if size != expected:
            raise EvalError(f"{path}: {'truncated' if size < expected else 'corrupt'} shard: header says {count} "
                            f"tokens ({expected} bytes), the file has {size} bytes")
        return np.frombuffer(f.read(min(limit, count) * TOKEN_DTYPE.itemsize), dtype=TOKEN_DTYPE)


def read_manifest(data_dir: Path) -> dict:
    """manifest.json of the dataset ({} if it has none): vocab_size, bos_id, bytes_per_token (of the val split)."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: unreadable manifest: {e}") from None


def count_target_bytes(data_dir: Path, targets: np.ndarray, manifest: dict) -> float | None:
    """UTF-8 bytes the target tokens stand for: decoded with tokenizer.pkl (special tokens such as <|bos|> count
    no bytes), else the manifest's bytes_per_token x len(targets); None when the dataset gives neither."""
    tokenizer = Path(data_dir) / "tokenizer.pkl"
    if tokenizer.exists():  # the dataset folder is the harness's, fingerprinted; the candidate cannot write it
        encoding = pickle.loads(tokenizer.read_bytes())
        special = {encoding.encode_single_token(s) for s in encoding.special_tokens_set}
        return float(len(encoding.decode_bytes([t for t in targets.tolist() if t not in special])))
    if "bytes_per_token" in manifest:
        return float(manifest["bytes_per_token"]) * len(targets)
    return None


def load_checkpoint(weights: Path) -> tuple[dict, dict]:
    """(config, state_dict) of a final.pt, unpickled weights_only: tensors and plain containers, never objects."""
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EvalError(f"{weights}: not a weights-only checkpoint: {str(e).splitlines()[0]}") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict)
            and isinstance(checkpoint.get("model"), dict)):
        raise EvalError(f"{weights}: expected {{'config': dict, 'model': state_dict}}, got "
                        f"{sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__}")
    return checkpoint["config"], unwrapped(checkpoint["model"])


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule, DistributedDataParallel


def unwrapped(state_dict: dict) -> dict:
    """The state dict of the bare model: a prefix that every key shares because the model was saved through a
    compile or DDP wrapper (`module._orig_mod.`...) is removed; a prefix only some keys have is a real submodule."""
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


# --- identity snapshot -----------------------------------------------------------------------------------------


def snapshot_identities() -> dict:
    """'torch.nn.functional.cross_entropy' -> the object, for every attribute of the modules and classes that the
    scoring relies on (classes: as found on the class or its bases, so shadowing an inherited method shows too)."""
    # this module, captured and probe: the evaluator's own names that it calls after candidate code has run
    modules = (torch, F, np, math, time, builtins, os, json, json.encoder, captured, probe, sys.modules[__name__])
    snapshot = {f"{m.__name__}.{name}": (m, name, value) for m in modules for name, value in vars(m).items()}
    for cls in (_Tensor, _Module):
        prefix = f"{cls.__module__}.{cls.__qualname__}".replace("torch._tensor.", "torch.").replace(
            "torch.nn.modules.module.", "torch.nn.")
        snapshot.update({f"{prefix}.{name}": (cls, name, inspect.getattr_static(cls, name)) for name in dir(cls)})
    return {name: entry for name, entry in snapshot.items() if name not in TORCH_SELF_PATCHES}


def require_untouched(snapshot: dict) -> None:
    """Raise naming every snapshotted attribute that candidate code rebound or deleted (additions are harmless)."""
    missing = object()
    patched = [name for name, (owner, attr, value) in snapshot.items()
               if (inspect.getattr_static(owner, attr, missing) if isinstance(owner, type)
                   else vars(owner).get(attr, missing)) is not value]
    if patched:
        raise EvalError(f"candidate code patched {', '.join(patched[:8])}" + (" ..." if len(patched) > 8 else ""))
    if _function_modes() or _dispatch_modes():
        raise EvalError("candidate code left a torch function or dispatch mode active (e.g. torch.set_default_device):"
                        " it would intercept the evaluator's own computations")


# --- candidate ---------------------------------------------------------------------------------------------------


def import_build_model(code_dir: Path):
    """The candidate's nanomodel.model.build_model, imported from code_dir and nowhere else."""
    for name in list(sys.modules):
        if name.split(".")[0] in CANDIDATE_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, str(code_dir))
    from nanomodel.model import build_model
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in CANDIDATE_PACKAGES and not Path(getattr(module, "__file__", None) or "/").resolve(
                ).is_relative_to(code_dir):
            raise EvalError(f"{name} was imported from {getattr(module, '__file__', None)}, not from the candidate's "
                            f"worktree {code_dir}")
    return build_model


def checked_forward(model, idx: torch.Tensor, min_vocab: int, snapshot: dict) -> torch.Tensor:
    """The model's logits for idx [B, T]: a plain torch.Tensor [B, T, V >= min_vocab], all finite.
    No autocast: the probe and the scoring see the model in the same precision (the model's own, fp32 weights)."""
    batch, window = idx.shape
    try:
        with _no_grad():
            logits = model(idx)
    except Exception as e:
        raise EvalError(f"the model's forward failed on a [{batch}, {window}] batch: {type(e).__name__}: {e}") from e
    require_untouched(snapshot)
    if type(logits) is not _Tensor:  # a subclass could override the very methods the scoring calls
        raise EvalError(f"forward returned {type(logits).__name__}, expected a torch.Tensor of logits [B, T, V]")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, window) or logits.shape[2] < min_vocab:
        raise EvalError(f"forward returned logits of shape {tuple(logits.shape)}, expected [{batch}, {window}, V] "
                        f"with V >= {min_vocab}")
    if not logits.is_floating_point():
        raise EvalError(f"forward returned {logits.dtype} logits, expected floating point")
    if not _item(_all(_isfinite(logits))):
        raise EvalError("forward returned non-finite logits (NaN or inf)")
    return logits


def nll_sum(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> float:
    """Sum over tokens of logsumexp(logits) - logits[target], in `dtype` per token and float64 in the sum."""
    logits = _to(logits, dtype)  # [B, T, V]
    target_logits = _squeeze(_gather(logits, -1, _unsqueeze(targets, -1)), -1)  # [B, T]
    nll = _sub(_logsumexp(logits, -1), target_logits)  # [B, T]
    if not _item(_all(_isfinite(nll))):
        raise EvalError("non-finite loss (NaN or inf)")
    return _item(_sum(nll, dtype=torch.float64))


# --- the evaluation, in order ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, result: dict) -> None:
    """Fill `result` (see RESULT_KEYS); raise on any failure, keeping what was measured before it."""
    if args.window < 2 or args.batch < 1:
        raise EvalError(f"--window {args.window} must be >= 2 and --batch {args.batch} >= 1")
    if args.tokens < args.window or args.tokens % args.window:
        raise EvalError(f"--tokens {args.tokens} must be a positive multiple of --window {args.window}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    loss_dtype = torch.float32 if device.type == "cuda" else torch.float64
    if device.type == "cuda":  # fp32 matmuls on tensor cores (TF32): ~8x faster, deterministic for equal shapes
        torch.set_float32_matmul_precision("high")
    code_dir = Path(args.code).resolve()
    scored = 0 if args.probe_only else args.tokens

    # 1. trusted setup
    tokens = read_val_tokens(args.data, max(scored, args.window) + 1)  # every target has its input
    manifest = read_manifest(args.data)
    total_bytes = None if args.probe_only else count_target_bytes(args.data, tokens[1:scored + 1], manifest)
    config, state_dict = load_checkpoint(args.weights)
    data_vocab = int(manifest.get("vocab_size") or int(tokens.max()) + 1)
    if int(tokens.max()) >= data_vocab:
        raise EvalError(f"{args.data}: val token id {int(tokens.max())} is outside the manifest's vocab_size {data_vocab}")
    min_vocab = max(data_vocab, int(config.get("vocab_size", 0)))
    probe_seed = secrets.randbits(32)
    rows = max(scored, args.window) // args.window
    # every forward gets [batch, T]: the last scoring batch is padded with copies of window 0, whose loss is dropped
    inputs = tokens[:rows * args.window].reshape(rows, args.window)
    inputs = np.concatenate([inputs, np.repeat(inputs[:1], -rows % args.batch, axis=0)])
    probe_cases = make_probe_cases(inputs[:args.batch], data_vocab, probe_seed)
    tokens_digest = _sha256(tokens.tobytes()).digest()
    canary_logits = torch.randn(1, args.window, min_vocab, generator=torch.Generator().manual_seed(0)).to(device)
    canary_targets = _from_numpy(tokens[None, 1:args.window + 1].astype(np.int64)).to(device)
    canary_nll = nll_sum(canary_logits, canary_targets, loss_dtype)
    snapshot = snapshot_identities()

    def forward(idx):
        return checked_forward(model, idx, min_vocab, snapshot)

    try:
        # 2-3. the candidate's model with the checkpoint's weights
        build_model = import_build_model(code_dir)
        model = build_model(dict(config))
        if not isinstance(model, _Module):
            raise EvalError(f"build_model returned {type(model).__name__}, expected a torch.nn.Module")
        _load_state_dict(model, state_dict, strict=True)
        model = _eval(model.to(device))

        # 4. causality
        try:
            result["probe_max_diff"] = probe_causality(forward, probe_cases, device, probe_seed)
        except ProbeFailure as failure:
            result["causal"], result["probe_max_diff"] = False, failure.max_diff
            raise
        result["causal"] = True

        # 5. val loss over fixed, non-overlapping windows
        targets = tokens[1:scored + 1].reshape(-1, args.window)
        total_nats = 0.0
        for start in range(0, len(targets), args.batch):
            logits = forward(_to(_from_numpy(inputs[start:start + args.batch].astype(np.int64)), device))
            # targets become tensors only after the forward: the model never gets hold of them
            batch_targets = _to(_from_numpy(targets[start:start + args.batch].astype(np.int64)), device)
            total_nats += nll_sum(logits[:len(batch_targets)], batch_targets, loss_dtype)
    except BaseException:
        require_untouched(snapshot)  # a patch explains the crash it caused better than the crash does
        raise

    # 6. nothing the scoring relies on was changed by candidate code
    require_untouched(snapshot)
    if _sha256(tokens.tobytes()).digest() != tokens_digest:
        raise EvalError("the validation tokens changed in memory during the evaluation")
    if nll_sum(canary_logits, canary_targets, loss_dtype) != canary_nll:
        raise EvalError("the loss computation answers differently than before candidate code was imported "
                        "(torch internals overridden?)")
    if args.probe_only:
        return
    # 7. a number only when it is finite
    if not math.isfinite(total_nats):
        raise EvalError(f"non-finite total loss {total_nats}")
    result["tokens"], result["val_loss"] = scored, total_nats / scored
    if total_bytes:
        result["bits_per_byte"] = total_nats / math.log(2) / total_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.measure.evaluator", description=__doc__.splitlines()[0])
    parser.add_argument("--code", required=True, help="the candidate's worktree (holds nanomodel/ and kernels/)")
    parser.add_argument("--weights", required=True, help="final.pt: {'config': dict, 'model': state_dict}")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder with *_val_*.bin shards")
    parser.add_argument("--tokens", required=True, type=int, help="N: score the first N val tokens (multiple of T)")
    parser.add_argument("--window", required=True, type=int, help="T: tokens per window, owned by the evaluator")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--probe-only", action="store_true", help="the causality probe alone (after a smoke run)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--result-fd", type=int, help="write the result JSON to this inherited file descriptor")
    where.add_argument("--out", help="write the result JSON to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    started = _perf_counter()
    args = parse_args(argv)
    out_fd = args.result_fd if args.out is None else os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    result = dict.fromkeys(RESULT_KEYS)
    result.update(ok=False, tokens=0, window=args.window)
    try:
        run(args, result)
        result["ok"] = True
    except BaseException as e:  # the candidate's SystemExit and KeyboardInterrupt too: a reason, never a crash
        result["error"] = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:MAX_ERROR_CHARS]
    result["seconds"] = _perf_counter() - started
    result = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    try:
        print(summary(result), file=sys.stderr, flush=True)
    except BaseException:  # candidate code may have closed or replaced stderr; the result matters, not the summary
        pass
    _os_write(out_fd, (_encode_json(result) + "\n").encode())
    _os_exit(0)  # at once: no atexit handler, finalizer or thread of the candidate runs after the result


def summary(result: dict) -> str:
    if not result["ok"]:
        return f"evaluate: FAILED ({result['seconds']:.1f}s): {result['error']}"
    if result["val_loss"] is None:
        return f"evaluate: causal (probe max diff {result['probe_max_diff']:.3g}), probe only, {result['seconds']:.1f}s"
    bpb = "" if result["bits_per_byte"] is None else f", {result['bits_per_byte']:.4f} bits/byte"
    return (f"evaluate: val_loss {result['val_loss']:.4f} nats/token{bpb} over {result['tokens']:,} tokens "
            f"(window {result['window']}), causal (probe max diff {result['probe_max_diff']:.3g}), "
            f"{result['seconds']:.1f}s")


if __name__ == "__main__":
    main()
