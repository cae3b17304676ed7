"""`ratchet bench loop`: where the wall-clock of `ratchet run` goes, with a proposer that thinks L seconds.

    python -m agent.bench.loop [--latencies 2,30] [--run-seconds 4] [--experiments 4]

Target: the stand-in repo of tests/fakerepo.py (a source checkout is needed), its trainer slowed to runs of
--run-seconds (it sleeps, so runs cost no CPU; the evaluator after each run is real). The proposer sleeps L
seconds and hands out scripted edits that alternate between a no-op comment (judged to the end: smoke run + 8
timed runs) and a slower trainer (smoke run + 2 timed runs, the second aborted early). Its first proposal is
free, so the table shows a night already under way: only the prefetch decides whether the devices wait.

Each configuration (L x prefetch on/off) runs the real Loop on a fresh copy of one baselined repo. Columns:
  wall        the loop's wall-clock (Loop.run, the baseline excluded)
  runs %      share of wall inside timed training runs (harness.run_training, launch to the group's exit)
  smoke       seconds in the harness's smoke runs (also run_training)
  eval        seconds in the evaluator (a separate process per run: torch import, val loss, causality probe)
  LLM wait    seconds the loop sat waiting for a proposal (Loop.waited_s)
  other/exp   per experiment: wall minus all of the above = git worktrees, commits, snapshots, policy, ledger
              and state writes, recovery scans, the runner's group checks
  ovh/exp     per experiment: eval + other, i.e. everything outside training runs and LLM waits
"""
import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import git

from agent.measure import devices as devices_mod
from agent import settings as settings_mod
from agent.baseline import measure_baseline
from agent.harness import Events, Harness
from agent.loop import Budgets, Loop
from agent.propose.base import Proposal

REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # the stand-in trainer's steps per run (tests/fakerepo.py)


class SleepyProposer:
    """Sleeps `latency` seconds per proposal (the first is free), then hands out the next scripted edit."""
    name = "bench"

    def __init__(self, latency: float, edits: list[str]):
        self.latency, self.edits, self.calls = latency, edits, 0

    def propose(self, context) -> Proposal | None:
        if self.calls >= len(self.edits):
            return None
        if self.calls:
            time.sleep(self.latency)
        text = self.edits[self.calls]
        self.calls += 1
        return Proposal(text=text, proposer=self.name, hypothesis=text.splitlines()[0].removeprefix("HYPOTHESIS: "))


class Timer:
    """Wraps harness.run_training and harness.evaluate to sum their wall-clock per kind, in the loop's thread."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.thread = threading.current_thread()

    def wrap(self, fn, kind_of):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if threading.current_thread() is self.thread:
                    self.seconds[kind_of(kwargs)] += time.perf_counter() - t0
        return timed

    def __enter__(self):
        self.saved = devices_mod.run_training, devices_mod.evaluate
        devices_mod.run_training = self.wrap(
            devices_mod.run_training, lambda kw: "smoke" if Path(kw["log_path"]).parent.name == "smoke" else "runs")
        devices_mod.evaluate = self.wrap(devices_mod.evaluate, lambda kw: "eval")
        return self

    def __exit__(self, *exc):
        devices_mod.run_training, devices_mod.evaluate = self.saved


def scripted_edits(fakerepo, n: int, sleep: float) -> list[str]:
    """n distinct edits: even ones a no-op comment, odd ones a slower trainer (each slower by another factor)."""
    edits = []
    for i in range(n):
        if i % 2 == 0:
            edits.append(fakerepo.edit("LOSS = 5.0", f"LOSS = 5.0  # note {i}", f"a comment that changes nothing ({i})"))
        else:
            edits.append(fakerepo.edit(f"SLEEP = {sleep}", f"SLEEP = {sleep * (2 + i)}", f"sleep {2 + i}x as long"))
    return edits


def make_template(fakerepo, root: Path, run_seconds: float) -> tuple[Path, float]:
    """The stand-in repo with runs of run_seconds, judged in one look after 4 pairs, baselined. -> (root, sleep)."""
    from nanomodel.prepare import prepare

    sleep = round(run_seconds / STEPS, 3)
    root = fakerepo.make_repo(root, prepare("stdlib"))
    trainer = root / "nanomodel" / "fake_train.py"
    trainer.write_text(trainer.read_text().replace("SLEEP = 0.1", f"SLEEP = {sleep}"))
    settings = root / "ratchet.toml"
    settings.write_text(settings.read_text().replace("max_pairs = 6", "max_pairs = 4"))
    git.Repo(root).git.commit("-a", "-q", "-m", f"runs of {run_seconds}s")
    measure_baseline(Harness(root, settings_mod.load(root), "default"))
    return root, sleep


def measure(template: Path, where: Path, latency: float, prefetch: bool, edits: list[str]) -> dict:
    root = where / f"L{latency:g}-{'on' if prefetch else 'off'}"
    shutil.copytree(template, root, symlinks=True)
    h = Harness(root, settings_mod.load(root), "default", Events())
    loop = Loop(h, SleepyProposer(latency, edits), Budgets(max_experiments=len(edits)),
                console=type("Quiet", (), {"print": staticmethod(lambda *a, **k: None)})(), prefetch=prefetch)
    with Timer() as timer:
        t0 = time.perf_counter()
        loop.run()
        wall = time.perf_counter() - t0
    s = timer.seconds
    n = len([r for r in h.ledger.rows() if r["kind"] != "baseline"])
    other = wall - s["runs"] - s["smoke"] - s["eval"] - loop.waited_s
    return {"latency": latency, "prefetch": prefetch, "experiments": n, "wall": wall, "runs": s["runs"],
            "smoke": s["smoke"], "eval": s["eval"], "wait": loop.waited_s, "other": other}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ratchet bench loop", description=__doc__.split("\n")[0])
    parser.add_argument("--latencies", default="2,30", help="proposer latencies L to compare, seconds")
    parser.add_argument("--run-seconds", type=float, default=4.0, help="wall-clock of one stand-in training run")
    parser.add_argument("--experiments", type=int, default=4, help="experiments per configuration")
    args = parser.parse_args(argv)
    if not (REPO / "tests" / "fakerepo.py").exists():
        parser.error(f"needs a source checkout: the stand-in repo lives in tests/fakerepo.py, not found under {REPO}")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests import fakerepo

    latencies = [float(x) for x in args.latencies.split(",")]
    with tempfile.TemporaryDirectory(prefix="ratchet-bench-loop-") as tmp:
        template, sleep = make_template(fakerepo, Path(tmp) / "template", args.run_seconds)
        edits = scripted_edits(fakerepo, args.experiments, sleep)
        results = [measure(template, Path(tmp), latency, prefetch, edits)
                   for latency in latencies for prefetch in (True, False)]
    print(f"stand-in runs of {args.run_seconds:g}s, {args.experiments} experiments per row "
          f"(no-op and slower edits alternating), first proposal free")
    print(f"{'L s':>5} {'prefetch':>8} {'exps':>4} {'wall s':>7} {'runs %':>6} {'smoke s':>7} {'eval s':>7} "
          f"{'LLM wait s':>10} {'other/exp s':>11} {'ovh/exp s':>9}")
    for r in results:
        n = max(r["experiments"], 1)
        print(f"{r['latency']:5g} {'on' if r['prefetch'] else 'off':>8} {r['experiments']:4d} {r['wall']:7.1f} "
              f"{100 * r['runs'] / r['wall']:6.1f} {r['smoke']:7.1f} {r['eval']:7.1f} {r['wait']:10.1f} "
              f"{r['other'] / n:11.2f} {(r['eval'] + r['other']) / n:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
