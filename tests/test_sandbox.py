"""The sandbox holds: no network but a loopback, only the run dir writable, no host files, no validation shards,
no process that outlives the command, and a real torchrun training run still works inside."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import suppress
from types import SimpleNamespace
from dataclasses import replace
from pathlib import Path

import pytest

from agent.guard import sandbox
from agent.measure.devices import Devices
from agent.measure.runner import run_training
from agent.guard.sandbox import NO_NESTED_USERNS, SandboxError, SandboxSpec

REPO = Path(__file__).resolve().parents[1]
TAG_VAR = "SANDBOX_TEST_TAG"  # marks every process a test starts, so that survivors can be found in /proc


@pytest.fixture
def spec(tmp_path) -> SandboxSpec:
    """A worktree, a run dir, and a dataset dir with a train and a val shard, of which only the train one is
    linked into the train dir (as the harness does)."""
    for d in ("worktree", "run", "data", "train"):
        (tmp_path / d).mkdir()
    (tmp_path / "worktree" / "code.py").write_text("print('candidate')\n")
    (tmp_path / "data" / "x_train_000000.bin").write_bytes(b"train tokens")
    (tmp_path / "data" / "x_val_000000.bin").write_bytes(b"val tokens")
    (tmp_path / "train" / "x_train_000000.bin").symlink_to(tmp_path / "data" / "x_train_000000.bin")
    return SandboxSpec(worktree=tmp_path / "worktree", run_dir=tmp_path / "run", train_data=tmp_path / "train")


def run_inside(spec: SandboxSpec, code: str, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a Python snippet in the sandbox; its stdout and stderr come back as text."""
    return subprocess.run(sandbox.wrap([sys.executable, "-c", code, *args], spec), capture_output=True, text=True,
                          timeout=60, env=env, **kwargs)


def tagged_processes(tag: str) -> list[int]:
    """Live (non-zombie) processes, seen from outside, whose environment carries TAG_VAR=tag."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if f"{TAG_VAR}={tag}".encode() in environ and stat[stat.rindex(")") + 2] not in "ZX":
            found.append(int(name))
    return found


def forget_bwrap() -> None:
    """Drop what the module learnt about bwrap (which one, its options, the probe's result)."""
    sandbox._bwrap.cache_clear()
    sandbox.available.cache_clear()


@pytest.fixture
def use_bwrap(monkeypatch):
    """Point the module at another bwrap executable; what it learnt is forgotten on the way in and out."""
    def use(executable: str):
        monkeypatch.setattr(sandbox, "BWRAP", executable)
        forget_bwrap()
    yield use
    monkeypatch.undo()
    forget_bwrap()


def fake_bwrap(directory: Path, options: list[str] | None) -> Path:
    """bubblewrap 0.6.1 as a script: --version and --help (the `options`; None: --help fails) answer like it, it
    rejects --disable-userns with bwrap's own words, and it 'runs' any other command line by exiting 0."""
    usage = "".join(f"    {option}    does something\n" for option in options or [])
    path = directory / "bwrap"
    path.write_text(f"""#!/bin/sh
case "$1" in
  --version) echo 'bubblewrap 0.6.1'; exit 0;;
  --help) {"printf '%s' '" + usage + "'; exit 0" if options is not None else "exit 1"};;
esac
for arg in "$@"; do
  [ "$arg" = {NO_NESTED_USERNS} ] && {{ echo 'bwrap: Unknown option {NO_NESTED_USERNS}' >&2; exit 1; }}
done
exit 0
""")
    path.chmod(0o755)
    return path


OLD_OPTIONS = [option for option in sandbox.ISOLATION if option.startswith("--")]  # all of them before 0.8


def test_without_bwrap_wrap_refuses_and_ensure_decides(use_bwrap, tmp_path, capsys):
    use_bwrap(f"bwrap-missing-{uuid.uuid4().hex}")
    ok, why = sandbox.available()
    assert not ok and "bwrap not installed" in why and "apt-get install bubblewrap" in why
    assert sandbox.bwrap_version() is None
    assert "NOT sandboxed" in sandbox.describe()
    with pytest.raises(SandboxError, match="bwrap not installed"):
        sandbox.wrap(["true"], SandboxSpec(tmp_path, tmp_path))
    with pytest.raises(SandboxError, match="required"):
        sandbox.ensure(required=True)
    assert sandbox.ensure(required=False) is False
    assert "NOT sandboxed" in capsys.readouterr().err


def test_a_bwrap_that_cannot_make_namespaces_is_reported(use_bwrap, tmp_path):
    fake = tmp_path / "bwrap"  # what bwrap prints where user namespaces are off
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    use_bwrap(str(fake))
    ok, why = sandbox.available()
    assert not ok and why.startswith("user namespaces disabled (bwrap: No permissions")


def test_a_bwrap_older_than_0_8_sandboxes_without_disable_userns_and_says_so(use_bwrap, tmp_path):
    use_bwrap(str(fake_bwrap(tmp_path, OLD_OPTIONS)))
    assert sandbox.bwrap_version() == (0, 6, 1)
    ok, why = sandbox.available()
    assert ok, why
    assert "bubblewrap 0.6.1" in why and f"no {NO_NESTED_USERNS}" in why and "install bubblewrap >= 0.8" in why
    assert "user namespaces disabled" not in why
    (tmp_path / "worktree").mkdir()
    (tmp_path / "run").mkdir()
    argv = sandbox.wrap(["true"], SandboxSpec(tmp_path / "worktree", tmp_path / "run"))
    assert argv[0] == str(tmp_path / "bwrap")
    assert NO_NESTED_USERNS not in argv and {"--unshare-user", "--cap-drop", "--as-pid-1"} <= set(argv)


@pytest.mark.parametrize("options, diagnosis", [
    (None, f"bubblewrap 0.6.1 at {{bwrap}} does not know {NO_NESTED_USERNS}: install bubblewrap >= 0.8"),
    (["--unshare-all", "--unshare-user"], "bubblewrap 0.6.1 at {bwrap} lacks --cap-drop, --as-pid-1, "
                                          "--die-with-parent, --new-session, --hostname: install bubblewrap >= 0.8"),
], ids=["no-help-then-unknown-option", "help-without-options"])
def test_a_bwrap_too_old_for_an_option_is_diagnosed_by_its_version_not_by_namespaces(use_bwrap, tmp_path,
                                                                                     options, diagnosis):
    bwrap = fake_bwrap(tmp_path, options)
    use_bwrap(str(bwrap))
    ok, why = sandbox.available()
    assert not ok and why.startswith(diagnosis.format(bwrap=bwrap)), why
    assert "namespaces disabled" not in why


HOST_NCCL = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_NET": "IB", "NCCL_NET_PLUGIN": "aws-ofi", "NCCL_TOPO_FILE": "/x",
             "NCCL_IB_HCA": "mlx5_0", "NCCL_CONF_FILE": "/opt/nccl.conf", "GLOO_SOCKET_IFNAME": "^lo"}


@pytest.mark.parametrize("sandboxed", [True, False])
def test_a_sandboxed_run_talks_over_lo_without_the_hosts_network_settings(monkeypatch, tmp_path, sandboxed):
    """The environment the harness gives a training run: inside the sandbox's network namespace (only `lo`) the
    host's NCCL settings would break NCCL's start-up; an unsandboxed run has the host's network and keeps them."""
    for name, value in {**HOST_NCCL, "NCCL_P2P_DISABLE": "1"}.items():
        monkeypatch.setenv(name, value)
    devices = SimpleNamespace(sandboxed=sandboxed, nproc=2, train_data_view=lambda: tmp_path)
    env = Devices.env(devices, tmp_path, tmp_path / "run", seed=1)
    assert env["NCCL_P2P_DISABLE"] == "1"  # a setting within the machine stays either way
    if sandboxed:
        assert (env["NCCL_SOCKET_IFNAME"], env["GLOO_SOCKET_IFNAME"], env["NCCL_IB_DISABLE"]) == ("lo", "lo", "1")
        assert not {"NCCL_NET", "NCCL_NET_PLUGIN", "NCCL_TOPO_FILE", "NCCL_IB_HCA", "NCCL_CONF_FILE"} & set(env)
    else:
        assert {name: env.get(name) for name in HOST_NCCL if name != "GLOO_SOCKET_IFNAME"} == {
            name: value for name, value in HOST_NCCL.items() if name != "GLOO_SOCKET_IFNAME"}


@pytest.mark.sandbox
def test_the_hosts_nccl_conf_is_unreadable_inside(spec, monkeypatch):
    """NCCL reads /etc/nccl.conf for every variable the environment leaves unset (NCCL_NET=IB from it would fail
    the run as surely as from the environment): the sandbox masks it. A stand-in file plays /etc/nccl.conf."""
    conf = spec.worktree / "nccl.conf"
    conf.write_text("NCCL_NET=IB\nNCCL_TOPO_FILE=/x\n")
    monkeypatch.setattr(sandbox, "NCCL_CONF", str(conf))
    code = """
import sys
try:
    print(repr(open(sys.argv[1]).read()))
except OSError as e:
    print(type(e).__name__)
"""
    masked = run_inside(spec, code, str(conf))
    spec.network = True  # with the host's network the host's settings are right, and the probe can tell
    shared = run_inside(spec, code, str(conf))
    assert masked.returncode == 0, masked.stderr
    assert "NCCL_NET" not in masked.stdout and masked.stdout.strip() in ("PermissionError", "''")
    assert "NCCL_NET=IB" in shared.stdout, shared.stderr


# inside: make a user namespace of our own (full capabilities over a copy of the mounts), then try to undo the
# sandbox with them: remount the read-only worktree read-write, unmount the train dir's tmpfs (what lies beneath
# would show), write the worktree's file
ESCAPE_VIA_NESTED_USERNS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def result(code):
    return "ok" if code == 0 else os.strerror(ctypes.get_errno())
CLONE_NEWUSER, CLONE_NEWNS, MS_REMOUNT, MS_BIND, MNT_DETACH = 0x10000000, 0x00020000, 32, 4096, 2
print("unshare", result(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)))
worktree, train = sys.argv[1:]
print("remount", result(libc.mount(None, worktree.encode(), None, MS_REMOUNT | MS_BIND, None)))
print("umount", result(libc.umount2(train.encode(), MNT_DETACH)))
try:
    open(os.path.join(worktree, "code.py"), "w").write("patched")
    print("write ok")
except OSError as e:
    print("write", e.strerror)
"""


@pytest.mark.sandbox
def test_without_disable_userns_a_nested_user_namespace_cannot_undo_the_sandbox(spec, monkeypatch):
    """The fallback for bubblewrap < 0.8 keeps the sandbox's guarantees: the kernel locks the mounts a nested
    user namespace inherits. (Where this bwrap has --disable-userns, the same code cannot even make one.)"""
    real = sandbox._bwrap()
    args = str(spec.worktree), str(spec.train_data)
    default = run_inside(spec, ESCAPE_VIA_NESTED_USERNS, *args).stdout.splitlines()
    monkeypatch.setattr(sandbox, "_bwrap", lambda: replace(real, options=real.options - {NO_NESTED_USERNS}))
    sandbox.available.cache_clear()
    try:
        assert sandbox.available()[0]
        fallback = run_inside(spec, ESCAPE_VIA_NESTED_USERNS, *args)
    finally:
        monkeypatch.undo()
        forget_bwrap()
    if real.knows(NO_NESTED_USERNS):
        assert default[0] != "unshare ok", default
    lines = fallback.stdout.splitlines()
    assert lines[0] == "unshare ok", fallback.stdout + fallback.stderr  # it did get a namespace of its own
    assert lines[1:] == ["remount Operation not permitted", "umount Invalid argument", "write Read-only file system"]
    assert (spec.worktree / "code.py").read_text() == "print('candidate')\n"


@pytest.mark.sandbox
def test_bad_spec_paths_are_named(spec, tmp_path):
    with pytest.raises(SandboxError, match="worktree.*nowhere"):
        sandbox.wrap(["true"], SandboxSpec(tmp_path / "nowhere", spec.run_dir))
    (spec.train_data / "x_train_000001.bin").symlink_to(tmp_path / "data" / "gone.bin")
    with pytest.raises(SandboxError, match="gone.bin"):
        sandbox.wrap(["true"], spec)


@pytest.mark.sandbox
def test_no_network_but_a_loopback_of_its_own(spec):
    host_server = socket.create_server(("127.0.0.1", 0))
    port = host_server.getsockname()[1]
    code = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    print("reached the host")
except OSError:
    print("host unreachable")
inner = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(inner.getsockname(), timeout=5)
peer, _ = inner.accept()
client.sendall(b"ping")
print("loopback", peer.recv(4).decode())
"""
    with host_server:
        isolated = run_inside(spec, code, str(port))
        spec.network = True  # the same probe with the host's network shows that the probe can tell
        shared = run_inside(spec, code, str(port))
    assert isolated.returncode == 0, isolated.stderr
    assert isolated.stdout.splitlines() == ["host unreachable", "loopback ping"]
    assert shared.stdout.startswith("reached the host"), shared.stderr


@pytest.mark.sandbox
def test_sees_the_train_shard_and_nothing_of_the_host(spec, tmp_path):
    host_tmp_secret = tmp_path / "host-tmp-secret.txt"
    host_tmp_secret.write_text("secret")
    home_secret = Path.home() / f".ratchet-sandbox-test-{uuid.uuid4().hex}"
    home_secret.write_text("secret")
    hidden = [host_tmp_secret, home_secret, tmp_path / "data" / "x_val_000000.bin", tmp_path / "data",
              Path(sandbox.__file__)]  # the last: Ratchet's own tree (ledger, runs) is not mounted
    code = """
import os, sys
train = os.environ["TRAIN"]
print(sorted(os.listdir(train)), open(os.path.join(train, "x_train_000000.bin"), "rb").read())
print([p for p in sys.argv[1:] if os.path.exists(p)])
try:
    import agent
    print("imported Ratchet's agent from", agent.__file__)
except ImportError:
    print("no agent")
"""
    try:
        result = run_inside(spec, code, *map(str, hidden), env={**os.environ, "TRAIN": str(spec.train_data)})
    finally:
        home_secret.unlink()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['x_train_000000.bin'] b'train tokens'", "[]", "no agent"]


@pytest.mark.sandbox
def test_writes_only_to_the_run_dir_and_tmp_dies_with_the_run(spec):
    code = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for path in map(os.path.dirname, sys.argv[1:]):  # with CAP_SYS_ADMIN a read-only bind can be made writable
    libc.mount(None, path.encode(), None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
for path in map(os.path.expanduser, sys.argv[1:]):
    try:
        with open(path, "w") as f:
            f.write("written inside")
        print(path)
    except OSError:
        pass
"""
    targets = [spec.run_dir / "out.txt", "~/home.txt", spec.worktree / "code.py", spec.train_data / "new.bin",
               spec.train_data / "x_train_000000.bin", "/new.txt", "/etc/new.txt", "/tmp/marker", "/dev/shm/marker"]
    first = run_inside(spec, code, *map(str, targets))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [str(spec.run_dir / "out.txt"), str(spec.run_dir / "home" / "home.txt"),
                                         "/tmp/marker", "/dev/shm/marker"]
    assert (spec.run_dir / "out.txt").read_text() == "written inside"
    assert (spec.worktree / "code.py").read_text() == "print('candidate')\n"
    assert (spec.train_data / "x_train_000000.bin").read_bytes() == b"train tokens"
    assert sorted(p.name for p in spec.train_data.iterdir()) == ["x_train_000000.bin"]
    second = run_inside(spec, "import os, sys; print([p for p in sys.argv[1:] if os.path.exists(p)])",
                        "/tmp/marker", "/dev/shm/marker")
    assert second.stdout.strip() == "[]", second.stderr


@pytest.mark.sandbox
def test_starts_in_the_worktree(spec):
    result = run_inside(spec, "import os; print(os.getcwd())", cwd="/")
    assert result.stdout.strip() == str(spec.worktree), result.stderr


@pytest.mark.sandbox
def test_inherited_file_descriptors_reach_the_command(spec):
    read_end, write_end = os.pipe()
    try:
        result = run_inside(spec, "import os, sys; os.write(int(sys.argv[1]), b'result')", str(write_end),
                            pass_fds=(write_end,))
        os.close(write_end)
        assert result.returncode == 0, result.stderr
        assert os.read(read_end, 100) == b"result"
    finally:
        os.close(read_end)


# inside: a child, and a daemon that left the session (double fork + setsid); both would sleep a minute
SPAWN_AND_HOLD = """
import os, subprocess, sys, time
subprocess.Popen(["sleep", "60"])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(sys.argv[1] + "/daemon-started", "w").close()
        time.sleep(60)
    os._exit(0)
while not os.path.exists(sys.argv[1] + "/daemon-started"):
    time.sleep(0.01)
open(sys.argv[1] + "/ready", "w").close()
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.sandbox
def test_background_processes_end_with_the_command(spec):
    for _ in range(5):  # a reaper that lets bwrap exit first leaves them alive a moment, in a few runs out of 100
        tag = uuid.uuid4().hex
        (spec.run_dir / "ready").unlink(missing_ok=True)
        result = run_inside(spec, SPAWN_AND_HOLD, str(spec.run_dir), "0", env={**os.environ, TAG_VAR: tag})
        assert result.returncode == 0, result.stderr
        assert (spec.run_dir / "ready").exists()
        assert tagged_processes(tag) == []  # at once: the command is the namespace's pid 1, its exit waits for the rest


@pytest.mark.sandbox
def test_the_runner_finds_no_survivor_after_a_sandboxed_run(spec, tmp_path):
    """Background work dies with the command, before bwrap exits: no process is left for the runner to flag."""
    result = run_training(sandbox.wrap([sys.executable, "-c", SPAWN_AND_HOLD, str(spec.run_dir), "0"], spec),
                          cwd=spec.worktree, env=dict(os.environ), log_path=tmp_path / "run.log", timeout=60)
    assert (spec.run_dir / "ready").exists()
    assert (result.status, result.survivors) == ("ok", False), result.reason


@pytest.mark.sandbox
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_outer_group_kills_everything_inside(spec, sig):
    """What the runner does on timeout or abort: kill the process group of the command it launched (bwrap)."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(sandbox.wrap([sys.executable, "-c", SPAWN_AND_HOLD, str(spec.run_dir), "60"], spec),
                            env={**os.environ, TAG_VAR: tag}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (spec.run_dir / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (spec.run_dir / "ready").exists(), "the sandboxed command did not start"
        inside = tagged_processes(tag)
        assert len(inside) >= 4  # bwrap, python (pid 1 inside), sleep, daemon
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # the kernel kills the PID namespace once bwrap's pid 1 sees its parent die
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tagged_processes(tag) == []
    finally:
        for pid in tagged_processes(tag):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.sandbox
def test_torchrun_training_with_two_processes_runs_in_the_sandbox(tmp_path, dataset):
    worktree, train, run_dir = tmp_path / "worktree", tmp_path / "train", tmp_path / "run"
    for package in ("nanomodel", "kernels"):
        shutil.copytree(REPO / package, worktree / package, ignore=shutil.ignore_patterns("__pycache__"))
    train.mkdir()
    run_dir.mkdir()
    for shard in sorted(dataset.glob("*_train_*.bin")):
        (train / shard.name).symlink_to(shard)
    env = {**os.environ, "PYTHONPATH": str(worktree), "RATCHET_RUN_DIR": str(run_dir), "RATCHET_SEED": "1",
           "RATCHET_TRAIN_DATA": str(train), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanomodel.train", "--config", "cpu-test"]
    spec = SandboxSpec(worktree=worktree, run_dir=run_dir, train_data=train)
    result = run_training(sandbox.wrap(cmd, spec), cwd=worktree, env=env, log_path=tmp_path / "train.log", timeout=240)
    assert result.status == "ok", result.reason + "\n" + Path(result.log_path).read_text()[-3000:]
    assert not result.survivors
    assert result.curve and result.curve[-1].step == result.curve[-1].total
    assert (run_dir / "final.pt").exists()
    assert "world_size:       2" in Path(result.log_path).read_text()
