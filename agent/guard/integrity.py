"""Which paths an edit may touch, and the integrity of everything it may not.

Protected files (the harness, the evaluator, tests, kernel references, ratchet.toml) are hashed when the
baseline is measured and re-checked in the worktree before every run and every evaluation: a mismatch
stops the experiment with the file's name, whatever route the change took (edit, script, symlink).
The dataset is fingerprinted at the baseline and checked against it before every run (sizes, the manifest's
hash) and in full (every file's sha256 against the manifest) at the baseline and once per process.
"""
import fnmatch
import hashlib
import json
from pathlib import Path


class IntegrityError(RuntimeError):
    pass


def matches(path: str, globs: list[str]) -> bool:
    """fnmatch semantics: `*` also crosses '/', so `nanomodel/**` covers the whole folder."""
    return any(fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(path, g.removesuffix("/**")) for g in globs)


def path_violation(paths: list[str], editable: list[str], protected: list[str]) -> str | None:
    """The rejection reason for the first path the edit may not touch, or None."""
    for p in paths:
        if matches(p, protected):
            return f"protected path {p}"
        if not matches(p, editable):
            return f"not an editable path: {p} (editable: {', '.join(editable)})"
    return None


def protected_hashes(tree: Path, protected: list[str]) -> dict[str, str]:
    """sha256 of every file under `tree` that a protected glob covers (symlinks hashed by their target text)."""
    hashes = {}
    for path in sorted(Path(tree).rglob("*")):
        rel = path.relative_to(tree).as_posix()
        if rel.startswith(".git/") or rel == ".git" or "__pycache__" in rel or not matches(rel, protected):
            continue
        if path.is_symlink():
            hashes[rel] = "symlink:" + str(path.readlink())
        elif path.is_file():
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def check_integrity(tree: Path, protected: list[str], expected: dict[str, str]) -> None:
    actual = protected_hashes(tree, protected)
    for rel in sorted(set(expected) | set(actual)):
        if expected.get(rel) != actual.get(rel):
            what = "missing" if rel not in actual else "added" if rel not in expected else "modified"
            raise IntegrityError(f"protected file {what}: {rel}")


def data_fingerprint(data_dir: Path) -> dict[str, str]:
    """The dataset's manifest (which holds every shard's sha256) and the sizes of the shard files.

    Hashing a FineWeb-sized dataset (~20 GB) before every run would cost minutes, so runs compare this with the
    fingerprint taken at the baseline (sizes, and the manifest's own hash, which pins the shard hashes it lists);
    `verify_data` checks those hashes in full at the baseline and once in every process that runs experiments.
    """
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    fp = {"manifest.json": _sha256(manifest) if manifest.exists() else "missing"}
    for shard in sorted(data_dir.glob("*.bin")):
        fp[shard.name] = str(shard.stat().st_size)
    return fp


def check_data(data_dir: Path, expected: dict[str, str]) -> None:
    """Raise IntegrityError naming the first file whose fingerprint differs from `expected` (the baseline's)."""
    data_dir = Path(data_dir)
    actual = data_fingerprint(data_dir)
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            if name not in actual or actual[name] == "missing":
                what = "missing"
            elif name not in expected:
                what = "added"
            elif name == "manifest.json":
                what = "rewritten"
            else:
                what = f"resized ({actual[name]} bytes, {expected[name]} at the baseline)"
            raise IntegrityError(f"data file {what} since the baseline: {data_dir / name}")


def verify_data(data_dir: Path) -> None:
    """Full check: every file the manifest lists (shards, tokenizer) against its sha256. Nothing to check
    without a manifest (a bring-your-own dataset): the sizes in the fingerprint are all there is then."""
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").exists():
        return
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for entry in manifest["files"] + ([manifest["tokenizer"]] if manifest.get("tokenizer") else []):
        path = data_dir / entry["name"]
        if not path.exists():
            raise IntegrityError(f"data file missing: {path}")
        if _sha256(path) != entry["sha256"]:
            raise IntegrityError(f"data file changed (sha256 differs from manifest.json): {path}")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
