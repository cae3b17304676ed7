"""`ratchet doctor`: whether training runs can start here, with what the configured preset needs.

A GPU night fails in the first minute for reasons that no CPU test sees: torch blind to the GPUs (a CUDA 13 build
under an older driver), a batch that does not split over the GPUs or a micro-batch that does not fit in memory, no
C compiler or Python.h for Triton's launcher, no working bubblewrap, GPUs or NCCL missing inside the sandbox. Each
check here gives one line: ok, FAIL with the fix, or skipped (not needed on this machine: the GPU checks on a CPU
box). The last few run where training runs (agent/measure/doctor_probe.py: under torchrun, inside the sandbox).

`ratchet doctor --json` prints one object, {"ok": bool, "checks": [{"name", "ok", "skipped", "detail", "fix"}]},
where a check's "ok" is true, false, or null when skipped. Exit 0 when no check failed. `ratchet init` runs it.
"""
import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import git
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.measure import box

from agent.guard import sandbox
from agent import settings as settings_mod
from agent.guard.child_env import child_env
from agent.measure.doctor_probe import RESULT
from agent.measure.evaluate import TRUSTED_ROOT
from agent.measure.launcher import TORCHRUN
from agent.measure.runner import run_training
from agent.settings import Settings
from agent.edit.workspace import has_identity

PROBE_TIMEOUT = 300.0  # seconds for the probe: torchrun start-up, NCCL set-up and one Triton compile
MIN_FREE_GIB = 5.0  # a GPU run writes a 0.5 GB final.pt and up to ~1 GB of compile caches (removed after each
                    # run), the evaluator a scratch dir; 5 GiB holds both arms, the snapshots and a night's logs
COMPILER_FIX = "apt-get install build-essential python3-dev (or the -dev package of the Python that runs Ratchet)"


@dataclass
class Check:
    name: str
    ok: bool | None   # None: skipped, not needed on this machine
    detail: str       # one line: what was found
    fix: str = ""     # when it failed: what to do

    def as_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "skipped": self.ok is None, "detail": self.detail, "fix": self.fix}


def run(root: Path, gpus: box.Gpus | None = None) -> list[Check]:
    """Every check, in order, for the repo at `root` (its ratchet.toml, else the preset init would write)."""
    g = box.detect() if gpus is None else gpus
    first, s = settings_check(root, g)
    sandboxed, _ = sandbox.available()
    return [first, torch_check(g), gpus_check(g), driver_check(g), shape_check(s, g), compiler_check(g.torch_count > 0),
            bubblewrap_check(), *probe_checks(root, s, g, sandboxed), data_check(s), identity_check(root)]


def passed(checks: list[Check]) -> bool:
    return all(c.ok is not False for c in checks)


def as_json(checks: list[Check]) -> str:
    return json.dumps({"ok": passed(checks), "checks": [c.as_json() for c in checks]})


def render(checks: list[Check], console: Console) -> None:
    """The checks as a table, the fix of each failed one under it, and a count."""
    table = Table("check", "verdict", "found", title="ratchet doctor")
    for c in checks:  # what was found is text, not markup: "[train] nproc" must survive
        verdict = {True: "[green]ok[/green]", False: "[red bold]FAIL[/red bold]", None: "[dim]skipped[/dim]"}[c.ok]
        table.add_row(escape(c.name), verdict, escape(c.detail))
    console.print(table)
    failed = [c for c in checks if c.ok is False]
    for c in failed:
        console.print(f"[red bold]FAIL[/red bold] {escape(c.name)}: {escape(c.detail)}\n     [bold]fix:[/bold] "
                      f"{escape(c.fix)}")
    skipped = sum(c.ok is None for c in checks)
    console.print(f"doctor: {len(checks) - len(failed) - skipped} ok, {len(failed)} failed, {skipped} skipped")


# ---------------------------------------------------------------------------------------------- the checks
def settings_check(root: Path, g: box.Gpus) -> tuple[Check, Settings]:
    """The repo's ratchet.toml and the settings the other checks use: its own, else the preset init would write."""
    if (Path(root) / settings_mod.FILENAME).exists():
        s = settings_mod.load(root)
        nproc = s.train.nproc or "all visible GPUs (1 without)"
        return Check("settings", True, f"{settings_mod.FILENAME}: config {s.train.config}, nproc {nproc}"), s
    try:
        name = box.default_preset(g)
    except box.BoxError:  # torch is blind to the GPUs (the GPUs check says so): check what the box should run
        name = "gpt2-research"
    return (Check("settings", False, f"no {settings_mod.FILENAME}: checked preset {name}'s defaults", "ratchet init"),
            settings_mod.preset(name))


def torch_check(g: box.Gpus) -> Check:
    build = f"CUDA {g.torch_cuda} build" if g.torch_cuda else "CPU-only build"
    return Check("torch", True, f"{g.torch_version} ({build})")


def gpus_check(g: box.Gpus) -> Check:
    blind = box.torch_blind(g)
    if blind:
        return Check("GPUs", False, blind[0], blind[1])
    if not g.torch_count:
        found = (f"{g.present} present, hidden from torch by CUDA_VISIBLE_DEVICES={g.visible!r}" if g.present
                 else f"none (no {box.DEVICE_NODES}, no nvidia-smi)")
        return Check("GPUs", None, f"{found}: CPU runs, gloo, fp32")
    names = sorted({name for name, _ in g.smi}) or ["NVIDIA GPU"]
    seen = f"torch sees {g.torch_count} of {g.present}" if g.present else f"torch sees {g.torch_count}"
    hidden = f" (CUDA_VISIBLE_DEVICES={g.visible!r})" if g.torch_count < g.present and g.visible is not None else ""
    return Check("GPUs", True, f"{', '.join(names)}, {g.mem_gib:.0f} GiB each; {seen}{hidden}")


def driver_check(g: box.Gpus) -> Check:
    if not g.present and not g.torch_count:
        return Check("driver", None, "no NVIDIA GPU")
    if g.hidden:
        return Check("driver", None, f"{g.driver or 'version unknown'}, not used: CUDA_VISIBLE_DEVICES={g.visible!r}")
    old = box.driver_too_old(g)
    if old:
        return Check("driver", False, old[0], old[1])
    need = box.min_driver(g.torch_cuda)
    return Check("driver", True, f"{g.driver or 'version unknown'}"
                                 + (f" (torch's CUDA {g.torch_cuda} needs >= {need})" if need else ""))


def shape_check(s: Settings, g: box.Gpus) -> Check:
    """The configured processes and micro-batch split the config's batch, fit in memory, and leave no GPU idle
    that could be used."""
    name = "box shape"
    cfg = box.nanomodel_config(s.train.config)
    if not g.torch_count:
        return Check(name, None, "no GPU: one CPU process")
    if cfg is None:
        return Check(name, None, f"config {s.train.config!r} is not nanomodel's: its shape is the repo's own")
    try:
        best = box.fit(cfg, g.torch_count, g.mem_gib)
        nproc = s.train.nproc or g.torch_count
        micro = min(box.command_micro_batch(s.train.command) or cfg.micro_batch_size, cfg.batch_size // nproc)
    except box.BoxError as e:
        return Check(name, False, str(e), "GPUs with more memory, or a smaller config")
    wanted = [f"[train] nproc = {best.nproc}"]
    if best.micro_batch < min(cfg.micro_batch_size, cfg.batch_size // best.nproc):
        wanted.append(f"--micro_batch_size {best.micro_batch} at the end of [train] command")
    fix = f"in {settings_mod.FILENAME}: {' and '.join(wanted)} (what `ratchet init --force` writes on this box)"
    if nproc > g.torch_count:
        return Check(name, False, f"[train] nproc {nproc}, but torch sees {g.torch_count} GPUs", fix)
    if micro < 1 or cfg.batch_size % (nproc * micro):
        return Check(name, False, f"batch {cfg.batch_size} of {s.train.config} does not split over {nproc} GPUs "
                                  f"in micro-batches of {micro}", fix)
    need = box.memory_gib(cfg, micro)
    if need > best.usable_gib:
        return Check(name, False, f"micro-batch {micro} needs ~{need:.1f} GiB per GPU, {best.usable_gib:.1f} GiB "
                                  f"usable", fix)
    hours = box.run_hours(cfg, nproc)
    found = [f"{nproc} GPU process(es), micro-batch {micro} x {cfg.batch_size // (nproc * micro)}, "
             f"~{need:.1f} of {best.usable_gib:.1f} GiB usable per GPU"]
    if hours is not None:
        found.append(f"~{_duration(hours)} a run (estimated)")
    if (nproc, micro) == (best.nproc, best.micro_batch):
        found += best.notes
    else:
        found.append(f"this box fits nproc {best.nproc}, micro-batch {best.micro_batch}")
    return Check(name, True, "; ".join(found))


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def compiler_check(cuda: bool) -> Check:
    """Triton builds a small C launcher for each kernel at run time, inside the sandbox: a C compiler (its own
    lookup: $CC, gcc, clang) and Python.h of this interpreter (its sysconfig include dir) must be there."""
    name = "C compiler"
    cc = shutil.which(os.environ["CC"]) if os.environ.get("CC") else shutil.which("gcc") or shutil.which("clang")
    scheme = sysconfig.get_default_scheme()
    include = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    if cc is None:
        problem = f"CC={os.environ['CC']} not found" if os.environ.get("CC") else "no C compiler (gcc or clang)"
    elif not (include / "Python.h").is_file():
        problem = f"{cc} found, but no Python.h in {include}"
    else:
        build = subprocess.run([cc, "-fsyntax-only", f"-I{include}", "-x", "c", "-"], input="#include <Python.h>\n",
                               capture_output=True, text=True)
        problem = None if build.returncode == 0 else (
            f"{cc} cannot compile against {include}/Python.h: " + (build.stderr.strip().splitlines() or ["?"])[-1])
    found = problem or f"{cc} compiles against {include}/Python.h"
    if not cuda:
        return Check(name, None, f"not needed without a GPU (Triton interprets on CPU); {found}")
    return Check(name, problem is None, found + ("" if problem else " (for Triton's launchers)"),
                 COMPILER_FIX if problem else "")


def bubblewrap_check() -> Check:
    ok, what = sandbox.available()
    if ok:
        return Check("bubblewrap", True, f"{what}: builds the sandbox")
    version = sandbox.bwrap_version()
    if shutil.which(sandbox.BWRAP) is None:
        fix = sandbox.INSTALL_HINT
    elif version is not None and version < (0, 8):
        fix = sandbox.UPGRADE_HINT
    else:
        fix = "as the line above says; until then runs are NOT sandboxed (ratchet warns; --require-sandbox refuses)"
    return Check("bubblewrap", False, what, fix)


def probe_checks(root: Path, s: Settings, g: box.Gpus, sandboxed: bool) -> list[Check]:
    """GPUs visible, an all-reduce, a compiled Triton kernel and free disk, seen from where runs run: torchrun in the
    sandbox (or unsandboxed where runs are), in a scratch run dir under runs/ (so its disk is the runs' disk)."""
    cuda = g.torch_count > 0
    ranks = min(2, g.torch_count) if cuda else 2  # NCCL takes one rank per GPU
    where = "in the sandbox" if sandboxed else "unsandboxed (no working bubblewrap)"
    runs = Path(root) / "runs"
    runs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".doctor-", dir=runs) as tmp:  # a dot: no tag can be named so
        run_dir = Path(tmp)
        cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", "-m", "agent.measure.doctor_probe"]
        env = child_env({"RATCHET_RUN_DIR": str(run_dir), "PYTHONPATH": str(TRUSTED_ROOT), "OMP_NUM_THREADS": "1",
                         "TRITON_CACHE_DIR": str(run_dir / "cache" / "triton"), "TRITON_INTERPRET": "0",
                         **({} if cuda else {"GLOO_SOCKET_IFNAME": "lo"})})
        if sandboxed:
            env = sandbox.loopback_env(env)
            cmd = sandbox.wrap(cmd, sandbox.SandboxSpec(worktree=TRUSTED_ROOT, run_dir=run_dir, gpus=True))
        result = run_training(cmd, cwd=TRUSTED_ROOT, env=env, log_path=run_dir / "probe.log", timeout=PROBE_TIMEOUT)
        if not (run_dir / RESULT).exists():
            tail = " | ".join((run_dir / "probe.log").read_text(errors="replace").strip().splitlines()[-3:])
            return [Check("runs: probe", False, f"torchrun {where}: {result.status} {result.reason}: {tail}",
                          "fix the checks above and run `ratchet doctor` again (the probe: agent/measure/doctor_probe.py)")]
        found = json.loads((run_dir / RESULT).read_text())
    return [_visible_check(found, s, g, where), _allreduce_check(found, where), _triton_check(found, cuda, where),
            _disk_check(found, runs)]


def _visible_check(found: dict, s: Settings, g: box.Gpus, where: str) -> Check:
    name = "runs: GPUs"
    if not g.torch_count:
        return Check(name, None, f"none {where}: runs use the CPU")
    nproc = s.train.nproc or g.torch_count
    detail = f"{found['gpus']} GPU(s) visible {where}, torch sees {g.torch_count} outside; nproc {nproc}"
    ok = found["gpus"] == g.torch_count and found["gpus"] >= nproc
    return Check(name, ok, detail, "" if ok else "the sandbox binds /dev/nvidia*: check them with `ls -l /dev/nvidia*`"
                                                  " and CUDA_VISIBLE_DEVICES")


def _allreduce_check(found: dict, where: str) -> Check:
    ok = found["allreduce"] == "ok"
    detail = f"{found['backend']} over {found['ranks']} ranks {where}" + ("" if ok else f": {found['allreduce']}")
    fix = ("NCCL_DEBUG=INFO ratchet doctor shows NCCL's own account" if found["backend"] == "nccl"
           else "gloo talks over the loopback: check that `lo` is up")
    return Check("runs: all-reduce", ok, detail, "" if ok else fix)


def _triton_check(found: dict, cuda: bool, where: str) -> Check:
    name = "runs: Triton kernel"
    if not cuda:
        return Check(name, None, "no GPU: Triton kernels are interpreted on CPU (tests) and not compiled")
    result = found.get("triton", "not launched: no CUDA device where runs run")
    if result == "ok":
        return Check(name, True, f"one compiled Triton kernel (GELU) matches its reference {where}")
    compiler = any(word in result for word in ("compiler", "Python.h", "gcc", "CalledProcessError"))
    return Check(name, False, f"{where}: {result}",
                 COMPILER_FIX if compiler else "TRITON_INTERPRET=0 pytest tests/test_kernels.py narrows it down")


def _disk_check(found: dict, runs: Path) -> Check:
    ok = found["free_gib"] >= MIN_FREE_GIB
    return Check("runs: free disk", ok, f"{found['free_gib']:.1f} GiB free for runs in {runs} (need {MIN_FREE_GIB:g})",
                 "" if ok else f"free space on the disk of {runs}")


def data_check(s: Settings) -> Check:
    shards = sorted(s.data_dir.glob("*_train_*.bin"))
    if (s.data_dir / "manifest.json").exists() and shards:
        return Check("data", True, f"{s.data_dir}: {len(shards)} train shard(s)")
    return Check("data", False, f"{s.data_dir}: not prepared", "ratchet init (prepares it)")


def identity_check(root: Path) -> Check:
    ok = has_identity(git.Repo(root))
    return Check("git identity", True, "ok" if ok else "none: commits use 'Ratchet <ratchet@localhost>'")
