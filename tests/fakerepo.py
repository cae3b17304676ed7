"""A scratch target repo with a stand-in trainer, for fast tests of the harness and the loop.

The repo holds the real nanomodel model code (the evaluator builds it) and `nanomodel/fake_train.py`, which
sleeps instead of training and copies a tiny model as final.pt: untrained, or (WEIGHTS) one trained for a few
steps, whose val loss is lower. Its speed, length, quality, crashes and NaNs are constants at the top of the
file that test edits change, so every verdict has a known right answer.
"""
import functools
import io
import json
import shutil
from pathlib import Path

import git
import torch

from agent.ui import cli

from agent import settings
from nanomodel.data import read_shard, train_shards
from nanomodel.model import build_model

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAIN = '''"""Stand-in trainer: sleeps STEPS x SLEEP seconds, prints progress, copies a tiny model as final.pt."""
import os, shutil, sys, time
SLEEP = 0.1
STEPS = 8
LOSS = 5.0
CRASH = False
WEIGHTS = "fake_weights.pt"

if "--steps" in sys.argv:  # the smoke run's override
    STEPS = int(sys.argv[sys.argv.index("--steps") + 1])
t0 = time.perf_counter()
for step in range(1, STEPS + 1):
    time.sleep(SLEEP)
    if CRASH and step == 3:
        1 / 0
    print(f"step {step}/{STEPS} loss {LOSS - step * 0.01:.4f} elapsed {time.perf_counter() - t0:.2f}s", flush=True)
# the same weights every run (no torch import: runs stay short, and the val loss is no source of noise)
shutil.copy(os.path.join(os.path.dirname(__file__), WEIGHTS), os.path.join(os.environ["RATCHET_RUN_DIR"], "final.pt"))
'''
FAKE_CONFIG = {"vocab_size": 4096, "seq_len": 64, "n_layer": 1, "n_head": 2, "n_embd": 16}
# alpha 0.001, not the default 0.01: the suite judges no-op edits and asserts that they are rejected, which the
# judge only promises with probability 1 - alpha (at 0.01 about 0.3-0.9% of the time, by `ratchet bench judge`'s
# simulation at these settings, per no-op). The speedups the suite wants accepted are 50% and more.
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
alpha = 0.001
baseline_runs = 2
min_pairs = 4
max_pairs = 6
[abort]
pace_slack = 0.3
min_fraction = 0.25
[length]
file = "nanomodel/fake_train.py"
pattern = 'STEPS = (\\d+)'
"""

# a better model at the same length (a lower curve, weights with a lower val loss): no faster as it stands, a win
# once step calibration shortens it. (SEARCH, REPLACE, hypothesis)
QUALITY = ('LOSS = 5.0\nCRASH = False\nWEIGHTS = "fake_weights.pt"',
           'LOSS = 4.0\nCRASH = False\nWEIGHTS = "fake_trained.pt"', "train for real")


# how a judged edit that cannot win ends: the judge's verdicts, or the screen stopping its run early (a no-op's
# per-step times sit on the incumbent's, so on a noisy machine either may come first)
NO_WIN = ("not significant", "slower", "speedup", "screen: projected")


def edit(old: str, new: str, hypothesis: str, path: str = "nanomodel/fake_train.py") -> str:
    return f"HYPOTHESIS: {hypothesis}\nRATIONALE: test edit\n\n{path}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"


def make_repo(root: Path, dataset: Path) -> Path:
    """A git repo holding the real nanomodel + kernels, the stand-in trainer and its ratchet.toml."""
    copy_target(root)
    (root / "nanomodel" / "fake_train.py").write_text(FAKE_TRAIN)
    for name, weights in weight_files(dataset).items():
        (root / "nanomodel" / name).write_bytes(weights)
    (root / "ratchet.toml").write_text(SETTINGS.format(dataset=dataset))
    return commit_all(root)


def make_real_repo(root: Path, dataset: Path, baseline_runs: int, config_change: tuple[str, str] | None = None,
                   alpha: float | None = None) -> Path:
    """A git repo holding the real nanomodel + kernels and the cpu-test preset's ratchet.toml: real training.
    config_change: (old, new) text replaced once in nanomodel/config.py before the first commit.
    alpha: the judge's false-accept rate, when not the preset's."""
    copy_target(root)
    if config_change:
        config = root / "nanomodel" / "config.py"
        assert config.read_text().count(config_change[0]) == 1, config_change[0]
        config.write_text(config.read_text().replace(*config_change))
    s = settings.preset("cpu-test")
    s.train.data = str(dataset)
    s.judge.baseline_runs = baseline_runs
    s.judge.alpha = alpha or s.judge.alpha
    (root / "ratchet.toml").write_text(settings.dumps(s))
    return commit_all(root)


def copy_target(root: Path) -> None:
    root.mkdir()
    for package in ("nanomodel", "kernels"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".gitignore").write_text("runs/\n")


def commit_all(root: Path) -> Path:
    r = git.Repo.init(root)
    r.git.config("user.name", "Test")
    r.git.config("user.email", "test@example.com")
    r.git.add("-A")
    r.git.commit("-m", "target repo")
    return root


@functools.cache
def weight_files(dataset: Path) -> dict[str, bytes]:
    """The stand-in's two final.pt files, made once per test process: the tiny model untrained (val loss ~8.3) and
    after a few training steps (~7.0)."""
    files = {}
    for name, steps in (("fake_weights.pt", 0), ("fake_trained.pt", 20)):
        torch.manual_seed(0)
        model = trained(build_model(FAKE_CONFIG), dataset, steps)
        buffer = io.BytesIO()
        torch.save({"config": FAKE_CONFIG, "model": model.state_dict()}, buffer)
        files[name] = buffer.getvalue()
    return files


def trained(model: torch.nn.Module, dataset: Path, steps: int) -> torch.nn.Module:
    """`model` after `steps` AdamW steps on the start of the training split."""
    tokens = torch.from_numpy(read_shard(train_shards(dataset)[0])[:steps * 16 * 65].astype("int64"))
    windows = tokens.view(steps, 16, 65)  # [step, batch, seq_len + 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in windows:
        logits = model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def ratchet(capsys, *args) -> dict:
    code = cli.main([*args, "--json"])
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert code == 0, captured.err[-2000:]
    return json.loads(out[-1])


def ledger(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "runs" / "default" / "ledger.jsonl").read_text().splitlines()]
