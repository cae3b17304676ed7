"""The data pipeline: shard format, dataset folders, TrainLoader, val_tokens, prepare."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from nanomodel import prepare as prep
from nanomodel.data import (DataError, TrainLoader, data_root, dataset_dir, load_manifest, read_shard,
                            train_shards, val_shards, val_tokens, write_shard)


def counting_dataset(folder, train_lengths, val_lengths=(500,)):
    """Shards whose tokens count up 0, 1, 2, ... across all of them (unique while < 65536), so a
    window's first token says where it came from and y must equal x + 1."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, lengths in (("train", train_lengths), ("val", val_lengths)):
        for i, n in enumerate(lengths):
            write_shard(folder / f"toy_{split}_{i:06d}.bin", np.arange(start, start + n))
            start += n
    return folder


# --- shards -------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens)
    back = read_shard(tmp_path / "a.bin")
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert (tmp_path / "a.bin").stat().st_size == 256 * 4 + 2 * len(tokens)
    write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.int64))
    assert len(read_shard(tmp_path / "empty.bin")) == 0


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(DataError, match="65535"):
        write_shard(tmp_path / "a.bin", np.array([1, 65536]))


def _corrupt(path, *, count=None, magic=None, version=None, cut_bytes=0, extra_bytes=0):
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:1024], dtype="<i4").copy()
    for slot, value in ((0, magic), (1, version), (2, count)):
        if value is not None:
            header[slot] = value
    raw[:1024] = header.tobytes()
    path.write_bytes(bytes(raw[:len(raw) - cut_bytes]) + b"\0" * extra_bytes)


@pytest.mark.parametrize("damage, message", [
    ({"cut_bytes": 2 * 580}, "truncated shard: header says 1000 tokens, file holds 420"),
    ({"count": 1001}, "truncated shard: header says 1001 tokens, file holds 1000"),
    ({"extra_bytes": 1}, "corrupt shard: header says 1000 tokens"),
    ({"magic": 12345}, "not a token shard: magic 12345"),
    ({"version": 7}, "unsupported shard version 7"),
])
def test_read_shard_rejects_damaged_files_naming_them(tmp_path, damage, message):
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, np.arange(1000))
    _corrupt(path, **damage)
    with pytest.raises(DataError) as error:
        read_shard(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_read_shard_rejects_foreign_and_missing_files(tmp_path):
    (tmp_path / "notes.bin").write_bytes(b"hello, not a shard")
    with pytest.raises(DataError, match=r"notes\.bin: not a token shard"):
        read_shard(tmp_path / "notes.bin")
    with pytest.raises(DataError, match=r"gone\.bin: shard not found"):
        read_shard(tmp_path / "gone.bin")


# --- dataset folders ----------------------------------------------------------------------


def test_data_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RATCHET_DATA_ROOT", str(tmp_path))
    assert data_root() == tmp_path
    assert dataset_dir("stdlib") == tmp_path / "stdlib"
    assert dataset_dir("stdlib", root=tmp_path / "r") == tmp_path / "r" / "stdlib"


def test_missing_dataset_gives_a_one_line_hint(tmp_path):
    with pytest.raises(DataError, match=r"stdlib: dataset not found; run `python -m nanomodel.prepare --dataset stdlib"):
        train_shards(tmp_path / "stdlib")
    with pytest.raises(DataError, match="--dataset fineweb"):
        TrainLoader(tmp_path / "fineweb", 8, 2, 1)
    with pytest.raises(DataError, match="--dataset fineweb --config CONFIG .*gpt2-research"):  # shards follow it
        TrainLoader(tmp_path / "fineweb", 8, 2, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no val shards"):
        val_shards(tmp_path / "empty")
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "empty")


def test_shard_lists_are_sorted(tmp_path):
    data = counting_dataset(tmp_path / "toy", [30, 30, 30], [10, 10])
    assert [p.name for p in train_shards(data)] == [f"toy_train_{i:06d}.bin" for i in range(3)]
    assert [p.name for p in val_shards(data)] == ["toy_val_000000.bin", "toy_val_000001.bin"]


# --- TrainLoader --------------------------------------------------------------------------

SEQ_LEN, BATCH = 16, 16  # global batch of 16 windows: 2 per rank at world size 8


def global_batch(data, world_size, step, seed=0, micro=2):
    """The step's windows as all ranks see them, in rank then micro-batch order: (x, y) [BATCH, SEQ_LEN]."""
    xs, ys = [], []
    for rank in range(world_size):
        loader = TrainLoader(data, SEQ_LEN, BATCH, micro, rank=rank, world_size=world_size, seed=seed, start_step=step)
        for _ in range(loader.grad_accum):
            x, y = loader.next_batch()
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_every_world_size_sees_the_same_global_batches(tmp_path):
    data = counting_dataset(tmp_path / "toy", [1008, 777, 1500])
    steps = TrainLoader(data, SEQ_LEN, BATCH, 2).steps_per_epoch + 2  # run into the second epoch
    for step in range(steps):
        x1, y1 = global_batch(data, 1, step, micro=4)
        for world_size in (2, 4, 8):
            x, y = global_batch(data, world_size, step)
            assert torch.equal(x, x1) and torch.equal(y, y1), (world_size, step)


def test_batches_are_shifted_disjoint_windows_covering_an_epoch(tmp_path):
    lengths = [1008, 777, 1500]
    data = counting_dataset(tmp_path / "toy", lengths)
    loader = TrainLoader(data, SEQ_LEN, BATCH, 4, rank=0, world_size=2)
    firsts = []
    for _ in range(loader.steps_per_epoch * loader.grad_accum):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, SEQ_LEN)
        assert torch.equal(y, x + 1)  # counting tokens: shifted by one, no window crosses a shard edge
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, SEQ_LEN - 1, dtype=torch.long))
        firsts += x[:, 0].tolist()
    other = TrainLoader(data, SEQ_LEN, BATCH, 4, rank=1, world_size=2)
    firsts_other = [t for _ in range(len(firsts) // 4) for t in other.next_batch()[0][:, 0].tolist()]
    assert not set(firsts) & set(firsts_other)  # ranks disjoint
    seen = firsts + firsts_other
    assert len(seen) == len(set(seen))  # no window twice in an epoch
    starts = {s + k * SEQ_LEN for s, n in zip(np.cumsum([0] + lengths[:-1]), lengths) for k in range((n - 1) // SEQ_LEN)}
    assert set(seen) <= starts and len(seen) == loader.steps_per_epoch * BATCH


def test_loader_is_deterministic_and_seeded(tmp_path):
    data = counting_dataset(tmp_path / "toy", [4000])
    first = global_batch(data, 1, step=0, seed=1)[0]
    assert torch.equal(first, global_batch(data, 1, step=0, seed=1)[0])
    assert not torch.equal(first, global_batch(data, 1, step=0, seed=2)[0])
    epoch = TrainLoader(data, SEQ_LEN, BATCH, 4, seed=1).steps_per_epoch
    assert not torch.equal(first, global_batch(data, 1, step=epoch, seed=1)[0])  # a new permutation per epoch


def test_start_step_resumes_where_stepping_would_be(tmp_path):
    data = counting_dataset(tmp_path / "toy", [4000])
    loader = TrainLoader(data, SEQ_LEN, BATCH, 4)
    for _ in range(5 * loader.grad_accum):
        loader.next_batch()
    resumed = TrainLoader([str(p) for p in train_shards(data)], SEQ_LEN, BATCH, 4, start_step=5)
    assert torch.equal(loader.next_batch()[0], resumed.next_batch()[0])
    resumed.skip_to(0)
    assert torch.equal(resumed.next_batch()[0], TrainLoader(data, SEQ_LEN, BATCH, 4).next_batch()[0])


def test_loader_rejects_bad_sizes(tmp_path):
    data = counting_dataset(tmp_path / "toy", [1000])
    with pytest.raises(ValueError, match="batch_size 12 is not a multiple of world_size 8 x micro_batch_size 1"):
        TrainLoader(data, SEQ_LEN, 12, 1, world_size=8)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        TrainLoader(data, SEQ_LEN, BATCH, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        TrainLoader(data, 100, 64, 1)


# --- val_tokens ---------------------------------------------------------------------------


def test_val_tokens_reads_the_val_split_in_order(tmp_path):
    data = counting_dataset(tmp_path / "toy", [100], val_lengths=[50, 70])
    tokens = val_tokens(data, 110)
    assert tokens.dtype == torch.long and torch.equal(tokens, torch.arange(100, 210))
    with pytest.raises(DataError, match="validation split holds 120 tokens, fewer than the 121 requested"):
        val_tokens(data, 121)


# --- prepare: stdlib / textdir ------------------------------------------------------------

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 40,
    "sub/b.py": "def add(a, b):\n    return a + b\n\n" * 30,
    "sub/deeper/c.md": "# Notes\n\nCafé, naïve, 東京 — unicode survives the round trip.\n" * 20,
    "d.txt": "lorem ipsum dolor sit amet " * 50,
    "e.txt": "import os\nprint(os.getcwd())\n" * 25,
}


@pytest.fixture
def textdir(tmp_path):
    src = tmp_path / "corpus"
    for rel, text in DOCS.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # binary: skipped
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: skipped
    return src


def test_prepare_textdir_is_byte_identical_across_runs(tmp_path, textdir):
    one = prep.prepare("textdir", root=tmp_path / "r1", path=textdir, name="toy", vocab_size=300)
    two = prep.prepare("textdir", root=tmp_path / "r2", path=textdir, name="toy", vocab_size=300)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert {"manifest.json", "tokenizer.pkl", "toy_train_000000.bin", "toy_val_000000.bin"} <= set(names)
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifest = load_manifest(one)
    for entry in manifest["files"] + [manifest["tokenizer"]]:
        assert entry["sha256"] == hashlib.sha256((one / entry["name"]).read_bytes()).hexdigest()
    assert [p.name for p in (tmp_path / "r1").iterdir()] == ["toy"]  # no temp folder left behind


def test_prepared_textdir_decodes_back_to_its_documents(tmp_path, textdir):
    data = prep.prepare("textdir", root=tmp_path, path=textdir, vocab_size=300)
    assert data == tmp_path / "corpus"  # the name defaults to the folder's
    manifest = load_manifest(data)
    encoding = pickle.loads((data / "tokenizer.pkl").read_bytes())
    bos = manifest["bos_id"]
    assert bos == 299 and encoding.encode("<|bos|>", allowed_special="all") == [bos]
    text = DOCS["sub/deeper/c.md"]
    assert encoding.decode(encoding.encode_ordinary(text)) == text
    documents = []
    for split in ("train", "val"):
        tokens = np.concatenate([read_shard(p) for p in (train_shards if split == "train" else val_shards)(data)])
        assert tokens[0] == bos and tokens.max() <= bos
        starts = np.flatnonzero(tokens == bos).tolist() + [len(tokens)]
        texts = [encoding.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
        assert len(texts) == manifest[split]["documents"] >= 1
        assert manifest[split]["tokens"] == len(tokens)
        if split == "val":
            val_bytes = sum(len(t.encode("utf-8")) for t in texts)
            assert manifest["bytes_per_token"] == pytest.approx(val_bytes / len(tokens))
        documents += texts
    assert sorted(documents) == sorted(DOCS.values())  # every text file once; binary and hidden ones skipped


def test_prepare_leaves_a_valid_dataset_alone_unless_forced(tmp_path, textdir, capsys):
    data = prep.prepare("textdir", root=tmp_path, path=textdir, name="toy", vocab_size=300)
    shard = data / "toy_train_000000.bin"
    shard.write_bytes(shard.read_bytes())  # same bytes, new inode time: tells us whether it was rewritten
    stamp = shard.stat().st_mtime_ns
    prep.prepare("textdir", root=tmp_path, path=textdir, name="toy", vocab_size=300)
    assert "already prepared" in capsys.readouterr().out and shard.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="vocab_size=300, not 320; add --force"):
        prep.prepare("textdir", root=tmp_path, path=textdir, name="toy", vocab_size=320)
    prep.prepare("textdir", root=tmp_path, path=textdir, name="toy", vocab_size=320, force=True)
    assert load_manifest(data)["vocab_size"] == 320


def test_interrupted_prepare_leaves_no_dataset(tmp_path, textdir, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_manifest", fail)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("textdir", root=tmp_path / "r", path=textdir, name="toy", vocab_size=300)
    assert list((tmp_path / "r").iterdir()) == []


def test_prepare_rejects_too_few_documents(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("just one document")
    with pytest.raises(DataError, match=r"one: 1 text file\(s\) found; need at least 2"):
        prep.prepare("textdir", root=tmp_path / "r", path=tmp_path / "one", vocab_size=300)


def test_val_split_takes_enough_documents(tmp_path):
    paths = []
    for i in range(100):
        paths.append(tmp_path / f"{i:03d}.txt")
        paths[-1].write_text("x" * (1000 + i))
    train, val = prep.split_documents(paths, seed=0)
    assert sorted(train + val) == paths and not set(train) & set(val)
    assert len(val) == 50  # 5% of 100 documents hold far less than VAL_MIN_BYTES: capped at half
    assert prep.split_documents(paths, seed=0) == (train, val)
    assert prep.split_documents(paths, seed=1) != (train, val)


@pytest.mark.slow
def test_prepare_stdlib(tmp_path):
    data = prep.prepare("stdlib", root=tmp_path)
    manifest = load_manifest(data)
    assert manifest["vocab_size"] == 4096 and manifest["bos_id"] == 4095
    assert manifest["corpus"]["bytes"] > 5_000_000 and manifest["val"]["tokens"] >= 300_000
    assert 2.0 < manifest["bytes_per_token"] < 6.0
    assert len(val_tokens(data, 300_000)) == 300_000


# --- prepare: fineweb ---------------------------------------------------------------------


def fineweb_shards(folder, rng):
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 50257, 3000))
    for i in (1, 2):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 5000))


def test_fineweb_manifest_validates_downloaded_shards(tmp_path):
    data = tmp_path / "fineweb"
    fineweb_shards(data, np.random.default_rng(0))
    manifest = prep.write_fineweb_manifest(data)
    assert json.loads((data / "manifest.json").read_text()) == manifest
    assert (manifest["vocab_size"], manifest["bos_id"]) == (50257, 50256)
    assert (manifest["train"]["tokens"], manifest["val"]["tokens"]) == (10000, 3000)
    assert manifest["bytes_per_token"] == prep.GPT2_FINEWEB_BYTES_PER_TOKEN
    assert [f["name"] for f in manifest["files"]] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    assert TrainLoader(data, 64, 8, 4).next_batch()[0].max() < 50257

    write_shard(data / "fineweb_train_000002.bin", [1, 2, 60000])
    with pytest.raises(DataError, match=r"fineweb_train_000002\.bin: token id 60000 is outside GPT-2"):
        prep.write_fineweb_manifest(data)
    _corrupt(data / "fineweb_train_000002.bin", cut_bytes=2)
    with pytest.raises(DataError, match=r"fineweb_train_000002\.bin: truncated shard"):
        prep.write_fineweb_manifest(data)


def test_fineweb_download_offline_fails_in_one_line(tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub.\nPlease check your connection.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match=r"cannot download kjj0/fineweb10B-gpt2/fineweb_val_000000\.bin .*offline"):
        prep.prepare("fineweb", root=tmp_path, train_shards=2)
    assert calls[0][0] == "kjj0/fineweb10B-gpt2" and calls[0][2]["repo_type"] == "dataset"
    assert calls[0][2]["etag_timeout"] <= 30
    assert not (tmp_path / "fineweb").exists()
    assert prep.main(["--dataset", "fineweb", "--train-shards", "1", "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download") and err.count("\n") == 1


def test_fineweb_download_fetches_only_missing_shards(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    rng = np.random.default_rng(1)
    source = tmp_path / "hub"
    fineweb_shards(source, rng)
    write_shard(source / "fineweb_train_000003.bin", rng.integers(0, 50257, 5000))
    fetched = []

    def from_source(repo_id, filename, *, local_dir, **kwargs):  # a stand-in Hub serving `source`
        fetched.append(filename)
        (local_dir / filename).write_bytes((source / filename).read_bytes())
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_source)
    data = prep.prepare("fineweb", root=tmp_path / "r", train_shards=2)
    assert fetched == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    prep.prepare("fineweb", root=tmp_path / "r", train_shards=2)
    assert len(fetched) == 3  # complete: nothing fetched
    prep.prepare("fineweb", root=tmp_path / "r", train_shards=3)
    assert fetched[3:] == ["fineweb_train_000003.bin"]
    assert len(train_shards(data)) == 3 and load_manifest(data)["train"]["tokens"] == 15000
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["fineweb"]


# --- how many FineWeb shards a config needs --------------------------------------------------------------------


def test_fineweb_shard_count_follows_the_config():
    from nanomodel.config import get_config
    windows_per_shard = (prep.FINEWEB_SHARD_TOKENS - 1) // 1024  # 97,656 windows of 1025 tokens per 100M-token shard
    # gpt2-research: 1000 x 256 windows = 262M tokens -> 3 shards (2.62); x1.5 for step calibration -> 4 (3.93)
    assert prep.fineweb_train_shards("gpt2-research", headroom=1.0) == 3
    assert prep.fineweb_train_shards("gpt2-research") == prep.FINEWEB_TRAIN_SHARDS == 4
    # gpt2-124m: 19,073 x 512 windows = 10B tokens -> 100 shards (99.998); with headroom all 103 there are
    assert prep.fineweb_train_shards("gpt2-124m", headroom=1.0) == 100
    assert prep.fineweb_train_shards("gpt2-124m") == prep.FINEWEB_MAX_TRAIN_SHARDS == 103
    for name in ("gpt2-research", "gpt2-124m"):  # no window read twice in one run
        cfg = get_config(name)
        assert prep.fineweb_train_shards(name, 1.0) * windows_per_shard >= cfg.steps * cfg.batch_size
        assert (prep.fineweb_train_shards(name, 1.0) - 1) * windows_per_shard < cfg.steps * cfg.batch_size
    research = get_config("gpt2-research")
    assert 4 * windows_per_shard >= 1.5 * research.steps * research.batch_size  # calibrated runs: no repeats either
    assert prep.fineweb_train_shards(get_config("gpt2-research", steps=5)) == 1  # a Config works too
    with pytest.raises(ValueError, match="unknown config"):
        prep.fineweb_train_shards("gpt2-xl")


def test_prepare_cli_downloads_the_shards_of_a_config(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(prep, "prepare", lambda dataset, **kw: asked.append((dataset, kw["train_shards"])))
    root = ["--data-root", str(tmp_path)]
    assert prep.main(["--dataset", "fineweb", *root]) == 0
    assert prep.main(["--dataset", "fineweb", "--config", "gpt2-124m", *root]) == 0
    assert prep.main(["--dataset", "fineweb", "--config", "gpt2-research", *root]) == 0
    assert prep.main(["--dataset", "fineweb", "--train-shards", "2", *root]) == 0
    assert asked == [("fineweb", 4), ("fineweb", 103), ("fineweb", 4), ("fineweb", 2)]
    with pytest.raises(SystemExit):  # one or the other
        prep.main(["--dataset", "fineweb", "--config", "gpt2-124m", "--train-shards", "2", *root])


def test_prepare_rejects_more_shards_than_the_hub_has(tmp_path):
    with pytest.raises(DataError, match=r"--train-shards must be in 1\.\.103"):
        prep.prepare("fineweb", root=tmp_path, train_shards=104)
    with pytest.raises(DataError, match=r"--train-shards must be in 1\.\.103"):
        prep.prepare("fineweb", root=tmp_path, train_shards=0)
    assert not (tmp_path / "fineweb").exists()
