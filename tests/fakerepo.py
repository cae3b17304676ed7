"""A scratch target repo with a stand-in trainer, for fast tests of the harness and the loop.

The repo holds the real nanomodel model code (the evaluator builds it) and `nanomodel/fake_train.py`, which
sleeps instead of training and copies a tiny untrained model as final.pt. Its speed, its crashes and its NaNs
are constants at the top of the file that test edits change, so every verdict has a known right answer.
"""
import json
import shutil
from pathlib import Path

import git
import torch

from agent import cli
from nanomodel.model import build_model

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAIN = '''"""Stand-in trainer: sleeps STEPS x SLEEP seconds, prints progress, copies a tiny untrained model as final.pt."""
import os, shutil, sys, time
SLEEP = 0.1
STEPS = 8
LOSS = 5.0
CRASH = False

if "--steps" in sys.argv:  # the smoke run's override
    STEPS = int(sys.argv[sys.argv.index("--steps") + 1])
t0 = time.perf_counter()
for step in range(1, STEPS + 1):
    time.sleep(SLEEP)
    if CRASH and step == 3:
        1 / 0
    print(f"step {step}/{STEPS} loss {LOSS - step * 0.01:.4f} elapsed {time.perf_counter() - t0:.2f}s", flush=True)
# the same weights every run (no torch import: runs stay short, and the val loss is no source of noise)
shutil.copy(os.path.join(os.path.dirname(__file__), "fake_weights.pt"), os.path.join(os.environ["RATCHET_RUN_DIR"], "final.pt"))
'''
FAKE_CONFIG = {"vocab_size": 4096, "seq_len": 64, "n_layer": 1, "n_head": 2, "n_embd": 16}
SETTINGS = """
[train]
command = "python -m nanomodel.fake_train"
nproc = 1
data = "{dataset}"
smoke_args = "--steps 2"
first_timeout = 60.0
timeout_factor = 4.0
[paths]
editable = ["nanomodel/**", "kernels/**"]
protected = ["kernels/reference.py", "ratchet.toml", "tests/**"]
[eval]
tokens = 1024
window = 64
batch = 16
[judge]
baseline_runs = 2
min_pairs = 4
max_pairs = 6
[abort]
pace_slack = 0.3
min_fraction = 0.25
"""


def edit(old: str, new: str, hypothesis: str, path: str = "nanomodel/fake_train.py") -> str:
    return f"HYPOTHESIS: {hypothesis}\nRATIONALE: test edit\n\n{path}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"


def make_repo(root: Path, dataset: Path) -> Path:
    """A git repo holding the real nanomodel + kernels, the stand-in trainer and its ratchet.toml."""
    root.mkdir()
    for package in ("nanomodel", "kernels"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "nanomodel" / "fake_train.py").write_text(FAKE_TRAIN)
    torch.manual_seed(0)
    torch.save({"config": FAKE_CONFIG, "model": build_model(FAKE_CONFIG).state_dict()}, root / "nanomodel" / "fake_weights.pt")
    (root / ".gitignore").write_text("runs/\n")
    (root / "ratchet.toml").write_text(SETTINGS.format(dataset=dataset))
    r = git.Repo.init(root)
    r.git.config("user.name", "Test")
    r.git.config("user.email", "test@example.com")
    r.git.add("-A")
    r.git.commit("-m", "target repo")
    return root


def ratchet(capsys, *args) -> dict:
    code = cli.main([*args, "--json"])
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert code == 0, captured.err[-2000:]
    return json.loads(out[-1])


def ledger(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "runs" / "default" / "ledger.jsonl").read_text().splitlines()]
