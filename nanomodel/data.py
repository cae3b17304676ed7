"""Token shards on disk and the loaders that read them.

Shard format (modded-nanogpt's): a header of 256 little-endian int32
(magic 20240520, version 1, token count, zeros), then `count` uint16 token ids.

A dataset is a folder `<root>/<name>/` holding `<prefix>_train_%06d.bin`,
`<prefix>_val_%06d.bin`, `manifest.json` and, for our own BPE datasets,
`tokenizer.pkl`. `python -m nanomodel.prepare` builds it.

Training imports this module: it stays light (numpy + torch, no tokenizer).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256  # int32 slots in the header; [0]=magic, [1]=version, [2]=token count
HEADER_BYTES = HEADER_INTS * 4
HEADER_DTYPE = np.dtype("<i4")
TOKEN_DTYPE = np.dtype("<u2")  # uint16: vocabularies up to 65,536 ids (GPT-2's 50,257 fits)
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.pkl"
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "ratchet" / "data"  # overridden by $RATCHET_DATA_ROOT


class DataError(ValueError):
    """A dataset or shard is missing, truncated, or not what it claims to be."""


# --- shards -------------------------------------------------------------------------------


def write_shard(path, tokens) -> None:
    """Write 1-D integer `tokens` (ids in [0, 65535]) as one shard at `path`."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: shard tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise DataError(f"{path}: token ids must lie in [0, 65535], got [{tokens.min()}, {tokens.max()}]")
    if tokens.size > np.iinfo(HEADER_DTYPE).max:
        raise DataError(f"{path}: {tokens.size} tokens do not fit the int32 count of one shard")
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE).tobytes())


def read_shard(path) -> np.ndarray:
    """Validate the header and size of the shard at `path`; return its tokens as a read-only uint16 memmap."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, count = np.fromfile(path, dtype=HEADER_DTYPE, count=3).tolist()
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: not a token shard: magic {magic}, expected {SHARD_MAGIC}")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if size < expected:
        held = (size - HEADER_BYTES) // TOKEN_DTYPE.itemsize
        raise DataError(f"{path}: truncated shard: header says {count} tokens, file holds {held}")
    if size > expected:
        raise DataError(f"{path}: corrupt shard: header says {count} tokens ({expected} bytes), file has {size} bytes")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


# --- dataset folders ----------------------------------------------------------------------


def data_root() -> Path:
    """Where datasets live: $RATCHET_DATA_ROOT, else ~/.cache/ratchet/data (never inside the repo)."""
    return Path(os.environ.get("RATCHET_DATA_ROOT") or DEFAULT_DATA_ROOT).expanduser()


def dataset_dir(name: str, root=None) -> Path:
    return Path(root if root is not None else data_root()).expanduser() / name


def _existing_dir(data_dir) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        # fineweb: the shard count follows the config's tokens (nanomodel.prepare.fineweb_train_shards)
        how = {"stdlib": "stdlib", "fineweb": "fineweb --config CONFIG"}.get(
            data_dir.name, f"textdir PATH --name {data_dir.name}")
        if data_dir.parent != data_root():
            how += f" --data-root {data_dir.parent}"
        note = " with CONFIG the config you train (gpt2-research, gpt2-124m)" if data_dir.name == "fineweb" else ""
        raise DataError(f"{data_dir}: dataset not found; run `python -m nanomodel.prepare --dataset {how}`{note}")
    return data_dir


def _shards(data_dir, split: str) -> list[Path]:
    data_dir = _existing_dir(data_dir)
    shards = sorted(data_dir.glob(f"*_{split}_*.bin"))
    if not shards:
        raise DataError(f"{data_dir}: no {split} shards (*_{split}_*.bin); "
                        f"rebuild it with `python -m nanomodel.prepare --force`")
    return shards


def train_shards(data_dir) -> list[Path]:
    return _shards(data_dir, "train")


def val_shards(data_dir) -> list[Path]:
    return _shards(data_dir, "val")


def load_manifest(data_dir) -> dict:
    path = _existing_dir(data_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found; rebuild with `python -m nanomodel.prepare --force`") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from None


def val_tokens(data_dir, n: int) -> torch.Tensor:
    """The first `n` tokens of the validation split, in shard order, as a LongTensor[n]."""
    parts, held = [], 0
    for path in val_shards(data_dir):
        shard = read_shard(path)
        parts.append(np.asarray(shard[: n - held]))
        held += len(parts[-1])
        if held == n:
            break
    if held < n:
        raise DataError(f"{data_dir}: validation split holds {held} tokens, fewer than the {n} requested")
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


# --- training batches ---------------------------------------------------------------------


class TrainLoader:
    """Deterministic, rank-disjoint batches of training windows.

    The train shards are cut, each on its own, into windows of seq_len+1 tokens at stride
    seq_len: consecutive windows share one token, so every token is a target once per epoch
    (a shard's last partial window is dropped). Step s of epoch e takes the windows
    perm_e[s*B:(s+1)*B], where perm_e is a permutation seeded by (seed, e) and B is the
    global batch_size; rank r takes its contiguous slice of B/world_size and hands it out
    as grad_accum micro-batches. So any world size sees the same global batches.

    Call next_batch() grad_accum times per optimizer step; it returns (x, y), both
    LongTensor[micro_batch_size, seq_len] on the CPU, with y[:, i] == x[:, i+1].
    """

    def __init__(self, data, seq_len: int, batch_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0):
        if min(seq_len, batch_size, micro_batch_size, world_size) < 1 or seed < 0:
            raise ValueError(f"TrainLoader: seq_len, batch sizes and world_size must be >= 1 and seed >= 0 "
                             f"(got {seq_len}, {batch_size}, {micro_batch_size}, {world_size}, seed {seed})")
        if batch_size % (world_size * micro_batch_size):
            raise ValueError(f"TrainLoader: batch_size {batch_size} is not a multiple of world_size {world_size} "
                             f"x micro_batch_size {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainLoader: rank {rank} is outside world_size {world_size}")
        paths = train_shards(data) if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]
        if not paths:
            raise DataError("TrainLoader: empty list of train shards")
        self.seq_len, self.batch_size, self.micro_batch_size = seq_len, batch_size, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.grad_accum = batch_size // (world_size * micro_batch_size)
        self.shards = [read_shard(p) for p in paths]  # memmaps: only the windows we gather get read
        windows = [max(len(s) - 1, 0) // seq_len for s in self.shards]
        self.window_offsets = np.concatenate([[0], np.cumsum(windows)])  # global window id -> shard by searchsorted
        self.num_windows = int(self.window_offsets[-1])
        self.steps_per_epoch = self.num_windows // batch_size  # each epoch drops its last partial batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{paths[0].parent}: {self.num_windows} windows of {seq_len + 1} tokens in the train "
                            f"shards, fewer than one batch of {batch_size}")
        self._epoch, self._perm = None, None
        self.skip_to(start_step)

    def skip_to(self, step: int) -> None:
        """Resume so that the next next_batch() is the first micro-batch of optimizer step `step`."""
        self.step, self.micro_step = step, 0

    def step_windows(self, step: int) -> np.ndarray:
        """Global window ids of optimizer step `step`: int64[batch_size], the same for every world size."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.batch_size // self.world_size
        start = self.rank * per_rank + self.micro_step * self.micro_batch_size
        windows = self.step_windows(self.step)[start:start + self.micro_batch_size]
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.step, self.micro_step = self.step + 1, 0
        tokens = torch.from_numpy(self._gather(windows).astype(np.int64))  # [micro_batch_size, seq_len+1]
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def _gather(self, windows: np.ndarray) -> np.ndarray:
        """uint16[len(windows), seq_len+1]: one fancy-index read per shard touched."""
        shard_of = np.searchsorted(self.window_offsets, windows, side="right") - 1
        starts = (windows - self.window_offsets[shard_of]) * self.seq_len
        columns = np.arange(self.seq_len + 1)
        out = np.empty((len(windows), self.seq_len + 1), dtype=TOKEN_DTYPE)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            out[rows] = self.shards[shard][starts[rows, None] + columns]
        return out
