"""Build a token-shard dataset under the data root (see nanomodel/data.py for the format).

    python -m nanomodel.prepare                                # stdlib: offline default
    python -m nanomodel.prepare --dataset textdir PATH --name NAME
    python -m nanomodel.prepare --dataset fineweb [--config gpt2-research | --train-shards N]

stdlib and textdir take one path: a list of text files, one document each, shuffled with a
fixed seed and split into train/val at document boundaries; a byte-level BPE trained with
rustbpe on the train documents (wrapped as a tiktoken.Encoding, saved as tokenizer.pkl);
each document encoded as <|bos|> + encode_ordinary(text). Same inputs give the same bytes.
fineweb downloads modded-nanogpt's pre-tokenized GPT-2 shards and validates them: the val shard and as
many train shards of 100M tokens as a named config's run reads (fineweb_train_shards), at most the 103 there are.

Every build goes to a temporary folder beside the target and is renamed into place at the
end, so an interrupted run never leaves a half dataset. An existing dataset whose manifest
checks out is left alone unless --force.
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from nanomodel.config import CONFIGS, Config, ConfigError
from nanomodel.data import (MANIFEST, TOKENIZER, DataError, data_root, dataset_dir, load_manifest,
                            read_shard, train_shards, val_shards, write_shard)

DEFAULT_VOCAB_SIZE = 4096  # total ids, <|bos|> included (id vocab_size-1): a small model's embedding stays small
BOS = "<|bos|>"
DEFAULT_SEED = 0  # seeds the document shuffle that decides the train/val split
VAL_FRACTION = 0.05  # val takes at least this share of the documents...
VAL_MIN_BYTES = 1_500_000  # ...and at least this much text: >= 300k val tokens for the evaluator on the stdlib
SHARD_TOKENS = 100_000_000  # tokens per shard at most (200 MB), as modded-nanogpt's FineWeb shards
SNIFF_BYTES = 8192  # a NUL byte among a file's first bytes marks it binary (as git and grep decide)
# stdlib folders that are not library code (tests, fixtures) or differ between builds of one version
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
STDLIB_SKIP_PREFIXES = ("config-", "_sysconfigdata_")  # build-specific: paths and compiler flags of this machine

FINEWEB_REPO = "kjj0/fineweb10B-gpt2"  # modded-nanogpt's pre-tokenized FineWeb 10B sample, 100M tokens per shard
FINEWEB_SHARD_TOKENS = 100_000_000  # tokens per train shard (llm.c's fineweb.py writes exactly this many)
FINEWEB_MAX_TRAIN_SHARDS = 103  # the whole sample: fineweb_train_000001.bin .. fineweb_train_000103.bin
FINEWEB_DEFAULT_CONFIG = "gpt2-research"  # the config whose shards a plain `--dataset fineweb` downloads
# Ratchet's step calibration may run an edit up to this multiple of its steps ([length] max_fraction): the shards
# cover that too, so no calibrated run reads a window twice
LENGTH_HEADROOM = 1.5
FINEWEB_VOCAB_SIZE = 50257  # GPT-2
FINEWEB_BOS_ID = 50256  # GPT-2's <|endoftext|>, which starts every FineWeb document in these shards
# UTF-8 bytes per GPT-2 token on FineWeb text. Not measurable offline; taken from nanochat's
# tokenizer report (GPT-2 column, FineWeb-Edu validation sample: 4,768,657 bytes / 1,027,270 tokens;
# 4.61-4.67 on its other samples). FineWeb proper is the same kind of web text: treat it as +-2%.
GPT2_FINEWEB_BYTES_PER_TOKEN = 4.64
DOWNLOAD_TIMEOUT_S = 10  # Hub metadata request timeout: offline, the download fails within ~25 s of retries
BYTES_PER_TOKEN_DEFINITION = ("utf-8 bytes of the val text / val tokens, counting the one <|bos|> that starts each "
                              "document (the evaluator's mean loss runs over those too); "
                              "bits per byte = loss_nats / ln(2) / bytes_per_token")


# --- how much FineWeb a config reads ----------------------------------------------------------


def fineweb_train_shards(config: str | Config = FINEWEB_DEFAULT_CONFIG, headroom: float = LENGTH_HEADROOM) -> int:
    """FineWeb train shards to download for nanomodel config `config` (a name in CONFIGS, or a Config): enough
    that a run of headroom x its steps takes every window once (the loader cuts each shard into
    (FINEWEB_SHARD_TOKENS - 1) // seq_len windows of seq_len + 1 tokens; steps x batch_size of them per run),
    capped at the FINEWEB_MAX_TRAIN_SHARDS that exist (a longer run then repeats windows).
    gpt2-research: 3 shards for its own 1000 steps, 4 with the default headroom; gpt2-124m: 100 for its 19,073
    steps, all 103 with the headroom. Raises ConfigError for an unknown name."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ConfigError(f"unknown config {config!r} (choose from {', '.join(CONFIGS)})")
        config = CONFIGS[config]
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    windows_per_shard = (FINEWEB_SHARD_TOKENS - 1) // config.seq_len
    windows = config.steps * config.batch_size * headroom
    return min(FINEWEB_MAX_TRAIN_SHARDS, max(1, math.ceil(windows / windows_per_shard)))


# default download: gpt2-research with step-calibration headroom (4; an edited config.py without it: still 4)
FINEWEB_TRAIN_SHARDS = fineweb_train_shards() if FINEWEB_DEFAULT_CONFIG in CONFIGS else 4


# --- corpus -------------------------------------------------------------------------------


def _walk(root: Path, skip_dir) -> list[Path]:
    """Every file under `root` whose folders pass `skip_dir`, sorted by relative path (same order on every machine)."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not skip_dir(d)]
        found += [Path(folder) / f for f in files]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> list[Path]:
    """The running Python's standard library .py files without tests; pydoc_data/topics.py (the docs' prose) is one."""
    def skip(name):  # a folder or file name
        return name in STDLIB_SKIP_DIRS or name.startswith(STDLIB_SKIP_PREFIXES)

    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in _walk(root, skip) if p.suffix == ".py" and not skip(p.name)]


def text_files(folder: Path) -> list[Path]:
    """Every non-hidden, non-empty, non-binary file under `folder`, recursively."""
    def hidden(name):
        return name.startswith(".")

    return [p for p in _walk(folder, hidden) if not hidden(p.name) and p.stat().st_size and not _is_binary(p)]


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(SNIFF_BYTES)


def read_document(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def split_documents(paths: list[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """Shuffle documents (2 or more) with `seed`; val = the first ones, enough for VAL_FRACTION
    of the documents and VAL_MIN_BYTES of text, but never more than half; train = the rest."""
    shuffled = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    sizes = np.cumsum([p.stat().st_size for p in shuffled])
    n_for_bytes = int(np.searchsorted(sizes, VAL_MIN_BYTES)) + 1
    n_val = min(max(math.ceil(VAL_FRACTION * len(paths)), n_for_bytes), len(paths) // 2)
    return shuffled[n_val:], shuffled[:n_val]


# --- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int, name: str):
    """A byte-level BPE with vocab_size-1 learned ids plus <|bos|> = vocab_size-1, as a tiktoken.Encoding."""
    import rustbpe  # here, not at the top: the fineweb path and the tests of it need neither
    import tiktoken

    if not 257 <= vocab_size <= 65536:
        raise DataError(f"vocab_size {vocab_size} must lie in [257, 65536]: 256 byte tokens + <|bos|>, uint16 ids")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, vocab_size - 1)  # a small corpus may yield fewer merges: ids then end below bos
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) < vocab_size - 1:
        print(f"note: the corpus yields only {len(ranks)} BPE tokens; ids {len(ranks)}..{vocab_size - 2} stay unused")
    return tiktoken.Encoding(name, pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                             special_tokens={BOS: vocab_size - 1})


# --- writing ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(path: Path, tokens: int | None) -> dict:
    return {"name": path.name, "tokens": tokens, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _chunks(arrays, size: int):
    """Regroup a stream of 1-D arrays into arrays of `size` elements (the last one shorter)."""
    pending, held = [], 0
    for array in arrays:
        while held + len(array) >= size:
            cut = size - held
            yield np.concatenate(pending + [array[:cut]])
            pending, held, array = [], 0, array[cut:]
        if len(array):
            pending.append(array)
            held += len(array)
    if held:
        yield np.concatenate(pending)


def _write_split(out_dir: Path, prefix: str, split: str, token_arrays, shard_tokens: int) -> list[dict]:
    entries = []
    for index, tokens in enumerate(_chunks(token_arrays, shard_tokens)):
        path = out_dir / f"{prefix}_{split}_{index:06d}.bin"
        write_shard(path, tokens)
        entries.append(_file_entry(path, len(tokens)))
    return entries


def _write_manifest(out_dir: Path, manifest: dict) -> dict:
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_text_dataset(files: list[Path], out_dir: Path, *, name: str, dataset: str, source: str,
                       vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = DEFAULT_SEED,
                       shard_tokens: int = SHARD_TOKENS) -> dict:
    """Shards, tokenizer.pkl and manifest.json for the documents `files`, written into `out_dir`."""
    def texts(docs):  # read lazily: a big textdir need not fit in memory
        return (read_document(p) for p in docs)

    train_docs, val_docs = split_documents(files, seed)
    t0 = time.perf_counter()
    encoding = train_tokenizer(texts(train_docs), vocab_size, f"{name}_bpe{vocab_size}")
    print(f"trained a {vocab_size}-token BPE on {len(train_docs)} documents in {time.perf_counter() - t0:.1f}s",
          flush=True)
    (out_dir / TOKENIZER).write_bytes(pickle.dumps(encoding))

    stats = {}

    def encoded(split, docs):  # <|bos|> + text for each document, counting documents and bytes on the way
        stats[split] = {"documents": len(docs), "bytes": 0}
        for text in texts(docs):
            stats[split]["bytes"] += len(text.encode("utf-8"))
            yield np.array([vocab_size - 1] + encoding.encode_ordinary(text), dtype=np.uint16)

    t0 = time.perf_counter()
    files_out = []
    for split, docs in (("train", train_docs), ("val", val_docs)):
        entries = _write_split(out_dir, name, split, encoded(split, docs), shard_tokens)
        stats[split]["tokens"] = sum(e["tokens"] for e in entries)
        files_out += entries
    print(f"encoded {stats['train']['tokens']:,} train and {stats['val']['tokens']:,} val tokens "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return _write_manifest(out_dir, {
        "dataset": dataset,
        "name": name,
        "source": source,
        "python_version": sys.version.split()[0],
        "vocab_size": vocab_size,
        "bos_id": vocab_size - 1,
        "split_seed": seed,
        "corpus": {k: stats["train"][k] + stats["val"][k] for k in ("documents", "bytes")},
        "train": stats["train"],
        "val": stats["val"],
        "bytes_per_token": stats["val"]["bytes"] / stats["val"]["tokens"],
        "bytes_per_token_definition": BYTES_PER_TOKEN_DEFINITION,
        "tokenizer": _file_entry(out_dir / TOKENIZER, None),
        "files": files_out,
    })


def write_fineweb_manifest(data_dir: Path) -> dict:
    """Validate every downloaded FineWeb shard in `data_dir` (header, size, GPT-2 id range) and write its manifest."""
    data_dir = Path(data_dir)
    files, counts = [], {"train": 0, "val": 0}
    for split, paths in (("train", train_shards(data_dir)), ("val", val_shards(data_dir))):
        for path in paths:
            tokens = read_shard(path)
            if len(tokens) and int(tokens.max()) >= FINEWEB_VOCAB_SIZE:
                raise DataError(f"{path}: token id {int(tokens.max())} is outside GPT-2's "
                                f"{FINEWEB_VOCAB_SIZE}-token vocabulary")
            files.append(_file_entry(path, len(tokens)))
            counts[split] += len(tokens)
    return _write_manifest(data_dir, {
        "dataset": "fineweb",
        "name": "fineweb",
        "source": f"huggingface.co/datasets/{FINEWEB_REPO} (FineWeb 10B sample, GPT-2 tokens, modded-nanogpt)",
        "vocab_size": FINEWEB_VOCAB_SIZE,
        "bos_id": FINEWEB_BOS_ID,
        "train": {"tokens": counts["train"]},
        "val": {"tokens": counts["val"]},
        "bytes_per_token": GPT2_FINEWEB_BYTES_PER_TOKEN,
        "bytes_per_token_definition": "constant for GPT-2 on FineWeb-like text (nanochat's tokenizer report); "
                                      "bits per byte = loss_nats / ln(2) / bytes_per_token",
        "tokenizer": None,
        "files": files,
    })


def download_fineweb(out_dir: Path, train_shards: int, have=frozenset()) -> None:
    """Fetch the val shard and train shards 1..train_shards into `out_dir`, except those named in `have`."""
    try:
        from huggingface_hub import hf_hub_download  # only the fineweb path needs it
    except ImportError:
        raise DataError("--dataset fineweb needs huggingface_hub: pip install 'ratchet[fineweb]'") from None
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]
    for name in names:
        if name in have or (out_dir / name).is_file():  # the client writes *.incomplete first: a named file is whole
            continue
        print(f"downloading {FINEWEB_REPO}/{name}", flush=True)
        try:
            hf_hub_download(FINEWEB_REPO, name, repo_type="dataset", local_dir=out_dir, etag_timeout=DOWNLOAD_TIMEOUT_S)
        except Exception as e:  # the client raises OSError, HTTP and timeout errors, varying with its version
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot download {FINEWEB_REPO}/{name} from the Hugging Face Hub (offline?): "
                            f"{reason}") from e
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)  # the client's resume metadata: not part of the dataset


# --- the command --------------------------------------------------------------------------


def _is_complete(data_dir: Path, want: dict, min_train_shards: int) -> bool:
    """The dataset has a manifest, every file it lists has the recorded size, and enough train shards.
    Raises DataError if its settings differ from `want`: rebuilding silently would surprise."""
    try:
        manifest = load_manifest(data_dir)
    except DataError:
        return False
    listed = manifest.get("files", []) + ([manifest["tokenizer"]] if manifest.get("tokenizer") else [])
    if any(not (data_dir / f["name"]).is_file() or (data_dir / f["name"]).stat().st_size != f["bytes"] for f in listed):
        return False
    if sum("_train_" in f["name"] for f in listed) < min_train_shards:
        return False
    for key, value in want.items():
        if manifest.get(key) != value:
            raise DataError(f"{data_dir}: exists with {key}={manifest.get(key)!r}, not {value!r}; "
                            f"add --force to rebuild it")
    return True


def _replace_dir(built: Path, target: Path) -> None:
    """Put the finished folder `built` at `target` (renames on one filesystem: never half there)."""
    if target.exists():
        old = built.with_name(built.name + ".old")
        target.rename(old)
        built.rename(target)
        shutil.rmtree(old)
    else:
        built.rename(target)


def _build_text(target: Path, files: list[Path], **kwargs) -> None:
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    building.chmod(0o755)  # mkdtemp makes it private; a dataset is read by other users (e.g. a sandboxed run)
    try:
        build_text_dataset(files, building, **kwargs)
        _replace_dir(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _build_fineweb(target: Path, train_shards: int, force: bool) -> None:
    # A fixed staging folder (not a fresh temp one): a re-run after an interruption keeps the finished shards.
    staging = target.with_name(f".{target.name}.partial")
    if force:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(exist_ok=True)
    # Shards of an existing dataset stay where they are (and usable) until the missing ones have arrived.
    have = set() if force or not target.exists() else {p.name for p in target.glob("*.bin")}
    download_fineweb(staging, train_shards, have)
    for name in have:
        os.replace(target / name, staging / name)
    write_fineweb_manifest(staging)
    _replace_dir(staging, target)


def prepare(dataset: str = "stdlib", *, root=None, path=None, name=None, vocab_size: int = DEFAULT_VOCAB_SIZE,
            train_shards: int = FINEWEB_TRAIN_SHARDS, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Build dataset `dataset` ("stdlib", "textdir" with `path`, or "fineweb") under `root`; return its folder."""
    if dataset == "stdlib":
        name = "stdlib"
    elif dataset == "textdir":
        if path is None or not Path(path).is_dir():
            raise DataError(f"--dataset textdir needs a folder of text files, got {path}")
        name = name or Path(path).resolve().name
    elif dataset == "fineweb":
        name = "fineweb"
        if not 1 <= train_shards <= FINEWEB_MAX_TRAIN_SHARDS:
            raise DataError(f"--train-shards must be in 1..{FINEWEB_MAX_TRAIN_SHARDS} (the shards {FINEWEB_REPO} "
                            f"has), got {train_shards}")
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose stdlib, textdir or fineweb")
    if not name or name.startswith(".") or Path(name).name != name:
        raise DataError(f"dataset name {name!r} must be a plain folder name")
    target = dataset_dir(name, root)
    target.parent.mkdir(parents=True, exist_ok=True)

    want = {"dataset": dataset}
    if dataset != "fineweb":
        want |= {"vocab_size": vocab_size, "split_seed": seed}
    if not force and _is_complete(target, want, min_train_shards=train_shards if dataset == "fineweb" else 1):
        print(f"{target}: already prepared (manifest checks out); --force rebuilds it")
        return target

    t0 = time.perf_counter()
    if dataset == "fineweb":
        _build_fineweb(target, train_shards, force)
    else:
        if dataset == "stdlib":
            files = stdlib_files()
            source = (f"Python {sys.version.split()[0]} standard library .py files without tests "
                      f"({sysconfig.get_paths()['stdlib']})")
        else:
            files = text_files(Path(path))
            source = f"text files under {Path(path).resolve()}"
            if len(files) < 2:
                raise DataError(f"{path}: {len(files)} text file(s) found; need at least 2 (train and val)")
        print(f"{name}: {len(files)} documents, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB", flush=True)
        _build_text(target, files, name=name, dataset=dataset, source=source, vocab_size=vocab_size, seed=seed)
    manifest = load_manifest(target)
    print(f"{target}: {manifest['train']['tokens']:,} train / {manifest['val']['tokens']:,} val tokens, "
          f"{manifest['bytes_per_token']:.3f} bytes/token, built in {time.perf_counter() - t0:.1f}s")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanomodel.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["stdlib", "textdir", "fineweb"], default="stdlib")
    parser.add_argument("path", nargs="?", help="textdir: the folder of text files")
    parser.add_argument("--name", help="textdir: dataset name (default: the folder's name)")
    shards = parser.add_mutually_exclusive_group()
    shards.add_argument("--config", choices=sorted(CONFIGS),
                        help=f"fineweb: download the train shards this nanomodel config reads, with x{LENGTH_HEADROOM} "
                             f"headroom for step calibration (default {FINEWEB_DEFAULT_CONFIG}: "
                             f"{FINEWEB_TRAIN_SHARDS} shards)")
    shards.add_argument("--train-shards", type=int,
                        help=f"fineweb: train shards of 100M tokens, 1..{FINEWEB_MAX_TRAIN_SHARDS}")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="stdlib/textdir: ids incl. <|bos|>")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="stdlib/textdir: seed of the train/val split")
    parser.add_argument("--data-root", help=f"where datasets live (default $RATCHET_DATA_ROOT or {data_root()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    args = parser.parse_args(argv)
    if (args.path is not None) != (args.dataset == "textdir"):
        parser.error("PATH is required with --dataset textdir and only there")
    train_shards = args.train_shards if args.train_shards is not None else \
        fineweb_train_shards(args.config or FINEWEB_DEFAULT_CONFIG)
    try:
        prepare(args.dataset, root=args.data_root, path=args.path, name=args.name, vocab_size=args.vocab_size,
                train_shards=train_shards, seed=args.seed, force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
