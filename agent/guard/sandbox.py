"""Where candidate code runs: training (and the evaluator's import of the candidate) under bubblewrap.

`wrap(cmd, spec)` returns the bwrap argv that runs `cmd` in a sandbox that sees only
  - read-only: the system (/usr, /bin, /lib*, /etc, /sys), the Python installation and venv, the worktree, `extra_ro`;
  - read-only: the training shards, each bound by its real path into an otherwise empty dir at RATCHET_TRAIN_DATA's
    path, so the validation shards beside them are nowhere to be seen;
  - read-write: the run dir (HOME is a folder inside it); /tmp and /dev/shm are fresh tmpfs that die with the run;
  - no host home, host /tmp, ledger, earlier runs or dataset dir; no network (a loopback of its own, for gloo, NCCL).
Processes: the command is pid 1 of its own PID namespace, so when it exits the kernel kills everything else inside
(setsid daemons included) before bwrap returns; when bwrap is killed (the runner kills bwrap's process group) or its
parent dies, the command gets SIGKILL and the namespace goes with it. Privileges: as root, bwrap keeps every
capability unless told otherwise, and CAP_SYS_ADMIN can remount a read-only bind read-write: capabilities are
dropped and the sandbox cannot make user namespaces of its own.
bubblewrap before 0.8 (Ubuntu 22.04: 0.6.1; RHEL 8 and 9: 0.4) has no --disable-userns: there the sandbox is built
without it, and a run can make a nested user namespace with capabilities over a copy of its mounts. The kernel locks
every mount it inherits (no read-write remount, no unmount that would uncover what lies beneath: tested), and a
nested network namespace has no interface at all, so the guarantees above hold; what is lost is the smaller kernel
attack surface. `available()` says so, and the ledger's sandbox note with it.
Network: the loopback is all there is, so the host's NCCL network settings would only break NCCL's start-up
(`loopback_env` replaces them; /etc/nccl.conf, which NCCL reads for whatever the environment leaves unset, is masked).

`ensure(required)` decides whether runs are sandboxed on this machine; `available()` says why not, and
`bwrap_version()` which bubblewrap it found.
"""
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.guard.child_env import child_env

BWRAP = "bwrap"  # the executable, looked up on PATH
INSTALL_HINT = "apt-get install bubblewrap"
UPGRADE_HINT = ("install bubblewrap >= 0.8 (Debian 12 and Ubuntu 24.04 ship it; elsewhere build it from source: "
                "github.com/containers/bubblewrap, meson)")
# the sandbox cannot make user namespaces of its own: bubblewrap >= 0.8 only, passed when this bwrap has it
NO_NESTED_USERNS = "--disable-userns"
# namespaces and privileges; --unshare-user is explicit because --disable-userns needs it (bwrap as root skips it).
# Every option here exists since bubblewrap 0.3.0 (2018).
ISOLATION = ["--unshare-all", "--unshare-user", "--cap-drop", "ALL",
             # the command is pid 1: its exit kills the rest before bwrap exits (bwrap's own pid-1 reaper reports
             # the exit first and lets the rest die a moment later, when the runner may count them as survivors)
             "--as-pid-1",
             "--die-with-parent",  # bwrap or its parent (the harness) dies -> the command dies, and the namespace
             "--new-session",  # no controlling terminal to push keystrokes into (TIOCSTI)
             "--hostname", "localhost"]  # the hostname resolves to 127.0.0.1: gloo finds lo without GLOO_SOCKET_IFNAME
# what any program needs from the host, all read-only; a path that is a symlink (merged /usr: /bin -> usr/bin) is
# recreated as that symlink. /sys: CPU topology for torch, PCI and driver state for CUDA.
SYSTEM_RO = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys"]
GPU_DEVICES = ["/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri"]  # bound with device access when present
PROBE_TIMEOUT = 30  # seconds for the one-off check that bwrap can build a sandbox here
NCCL_CONF = "/etc/nccl.conf"  # NCCL reads it for every variable the environment leaves unset; masked in the sandbox
# The host's NCCL network settings name its interfaces, RDMA devices, network plugins and files the sandbox does not
# have: with any of them NCCL fails at start-up ("Bootstrap : no socket interface found"). Dropped by prefix;
# settings inside one machine (NCCL_P2P_*, NCCL_SHM_*, NCCL_NVLS_*, NCCL_DEBUG...) stay.
HOST_NETWORK_PREFIXES = ("NCCL_SOCKET_", "NCCL_IB_", "NCCL_NET", "NCCL_COLLNET_", "NCCL_TOPO_", "NCCL_CONF_FILE")
LOOPBACK_ENV = {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo",
                "NCCL_IB_DISABLE": "1"}  # no RDMA device is mounted: do not even look for one


class SandboxError(Exception):
    """No sandbox can be built: bwrap is missing or too old, namespaces are disabled, or a path in the spec is wrong."""


@dataclass
class SandboxSpec:
    worktree: Path  # the candidate's code, read-only; the command starts there
    run_dir: Path  # the only writable host dir (fresh per run); HOME is run_dir/home
    train_data: Path | None = None  # RATCHET_TRAIN_DATA: a dir of (symlinks to) the training shards
    extra_ro: list[Path] = field(default_factory=list)  # more read-only dirs (the evaluator: dataset, Ratchet's agent/)
    gpus: bool = True  # bind /dev/nvidia* and /dev/dri when present (nothing on a CPU machine)
    network: bool = False  # share the host's network; off: a loopback of its own only


@dataclass(frozen=True)
class Bwrap:
    """The bwrap on PATH, as it describes itself."""
    path: str
    release: str  # its --version line, "bubblewrap 0.8.0"
    version: tuple[int, ...] | None
    options: frozenset[str] | None  # the options its --help lists; None: it printed no help

    def knows(self, option: str) -> bool:
        """Whether this bwrap has `option`; without a list of options, the probe's run tells."""
        return self.options is None or option in self.options

    def isolation(self) -> list[str]:
        return ISOLATION + ([NO_NESTED_USERNS] if self.knows(NO_NESTED_USERNS) else [])


@functools.cache
def _bwrap() -> Bwrap | None:
    """The bwrap on PATH (None when there is none), asked once per process."""
    path = shutil.which(BWRAP)
    if path is None:
        return None
    release, usage = (_query([path, flag]) for flag in ("--version", "--help"))
    number = re.search(r"\d+(?:\.\d+)+", release)
    return Bwrap(path, release or "bwrap", tuple(map(int, number[0].split("."))) if number else None,
                 frozenset(re.findall(r"^\s*(--[\w-]+)", usage, re.MULTILINE)) or None)


def _query(cmd: list[str]) -> str:
    """What a quick bwrap query prints on stdout; "" when it fails (the probe's run then tells why)."""
    try:  # like every child of Ratchet's, without secrets
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT, env=child_env({}))
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def bwrap_version() -> tuple[int, ...] | None:
    """The version of the bwrap on PATH, (0, 8, 0); None when bwrap is missing or does not say."""
    bwrap = _bwrap()
    return None if bwrap is None else bwrap.version


@functools.cache
def available() -> tuple[bool, str]:
    """(True, what) when bwrap is installed and can build our sandbox here, else (False, why not)."""
    bwrap = _bwrap()
    if bwrap is None:
        return False, f"bwrap not installed: {INSTALL_HINT}"
    where = f"{bwrap.release} at {bwrap.path}"
    missing = [option for option in ISOLATION if option.startswith("--") and not bwrap.knows(option)]
    if missing:
        return False, f"{where} lacks {', '.join(missing)}: {UPGRADE_HINT}"
    try:
        probe = subprocess.run([bwrap.path, *bwrap.isolation(), "--ro-bind", "/", "/", "true"], capture_output=True,
                               text=True, timeout=PROBE_TIMEOUT, env=child_env({}))
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bwrap at {bwrap.path} does not run: {e}"
    if probe.returncode != 0:
        error = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        unknown = re.search(r"Unknown option (\S+)", error)
        if unknown:  # too old for an option (that its --help did not tell): not a namespace problem
            return False, f"{where} does not know {unknown[1]}: {UPGRADE_HINT}"
        return False, (f"user namespaces disabled ({error}): enable them (sysctl kernel.unprivileged_userns_clone=1, "
                       f"user.max_user_namespaces > 0, or an AppArmor profile for {bwrap.path})")
    if not bwrap.knows(NO_NESTED_USERNS):
        return True, (f"{where}, older than 0.8: no {NO_NESTED_USERNS}, so runs can make nested user namespaces "
                      f"(their mounts stay read-only, locked by the kernel; more kernel code is reachable): "
                      f"{UPGRADE_HINT}")
    return True, where


def loopback_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a process in the sandbox's network namespace, where the loopback is the only interface: NCCL and
    gloo talk over `lo` (with or without CUDA), and the host's network settings (HOST_NETWORK_PREFIXES) are gone.
    Unsandboxed runs have the host's network and keep the host's settings."""
    return {**{k: v for k, v in env.items() if not k.startswith(HOST_NETWORK_PREFIXES)}, **LOOPBACK_ENV}


def describe() -> str:
    ok, what = available()
    if ok:
        return f"{what}: runs see no network, no home, no other runs, only their own run dir writable"
    return f"runs are NOT sandboxed: {what}"


def ensure(required: bool) -> bool:
    """Whether to sandbox runs: True when bwrap works here. Otherwise raises SandboxError when `required`
    (--require-sandbox), else warns on stderr and returns False."""
    ok, what = available()
    if ok:
        return True
    if required:
        raise SandboxError(f"sandbox required but unavailable: {what}")
    print(f"WARNING: runs are NOT sandboxed ({what}): candidate code can read the validation data and your files, "
          f"use the network and cache across runs", file=sys.stderr)
    return False


def wrap(cmd: list[str], spec: SandboxSpec) -> list[str]:
    """The bwrap argv that runs `cmd` inside the sandbox described by `spec`, starting in the worktree."""
    ok, what = available()
    if not ok:
        raise SandboxError(f"cannot sandbox: {what}")
    bwrap = _bwrap()
    worktree, run_dir = _existing_dir(spec.worktree, "worktree"), _existing_dir(spec.run_dir, "run_dir")
    home = run_dir / "home"
    home.mkdir(exist_ok=True)
    # (where, bwrap args): bwrap mounts in argv order, and a dir must be mounted before anything inside it
    # (the run dir may lie under /tmp, GPU devices under /dev), so they are sorted by depth below
    mounts = [(Path("/proc"), ["--proc", "/proc"]), (Path("/dev"), ["--dev", "/dev"]), (Path("/tmp"), ["--tmpfs", "/tmp"])]
    for path in SYSTEM_RO:
        if os.path.islink(path):
            mounts.append((Path(path), ["--symlink", os.readlink(path), path]))
        elif os.path.exists(path):
            mounts.append((Path(path), ["--ro-bind", path, path]))
    ro = [*_python_dirs(), *(_existing(p, "extra_ro") for p in spec.extra_ro), worktree]
    mounts += [(p, ["--ro-bind", str(p.resolve()), str(p)]) for p in ro]
    mounts.append((run_dir, ["--bind", str(run_dir), str(run_dir)]))
    if spec.gpus:
        mounts += [(Path(d), ["--dev-bind", d, d]) for pattern in GPU_DEVICES for d in sorted(glob.glob(pattern))]
    if not spec.network and os.path.isfile(NCCL_CONF):  # unreadable inside: the host's settings stay outside
        mounts.append((Path(NCCL_CONF), ["--ro-bind", os.devnull, NCCL_CONF]))
    sealed = ["/"]  # read-only once everything is mounted (non-recursive: the run dir and /tmp stay writable)
    if spec.train_data is not None:
        train = _existing_dir(spec.train_data, "train_data")
        mounts.append((train, ["--tmpfs", str(train)]))
        mounts += [(train / f.name, ["--ro-bind", str(_existing(f.resolve(), "train_data file")), str(train / f.name)])
                   for f in sorted(train.iterdir())]
        sealed.append(str(train))
    mounts.sort(key=lambda m: len(m[0].parts))
    return [bwrap.path, *bwrap.isolation(), *(["--share-net"] if spec.network else []),
            *(a for _, args in mounts for a in args), *(a for d in sealed for a in ("--remount-ro", d)),
            "--setenv", "HOME", str(home), "--setenv", "TMPDIR", "/tmp", "--chdir", str(worktree), "--", *cmd]


def _python_dirs() -> list[Path]:
    """The interpreter's installation and the venv (a venv's python is a symlink into the base installation),
    without those that a system dir or another of them already holds."""
    candidates = {Path(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    candidates.add(Path(os.path.realpath(sys.executable)).parent.parent)
    covered = [Path(p) for p in SYSTEM_RO]
    kept = []
    for path in sorted(candidates, key=lambda p: len(p.parts)):
        if not any(path.is_relative_to(c) for c in covered + kept):
            kept.append(path)
    return kept


def _existing(path, what: str) -> Path:
    path = Path(path).absolute()
    if not path.exists():
        raise SandboxError(f"{what}: {path} does not exist")
    return path


def _existing_dir(path, what: str) -> Path:
    path = _existing(path, what)
    if not path.is_dir():
        raise SandboxError(f"{what}: {path} is not a directory")
    return path
