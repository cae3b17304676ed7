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
from pathlib import Path

import pytest

from agent import sandbox
from agent.runner import run_training
from agent.sandbox import SandboxError, SandboxSpec

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


@pytest.fixture
def use_bwrap(monkeypatch):
    """Point the module at another bwrap executable; the cached probe result is cleared on the way in and out."""
    def use(executable: str):
        monkeypatch.setattr(sandbox, "BWRAP", executable)
        sandbox.available.cache_clear()
    yield use
    monkeypatch.undo()
    sandbox.available.cache_clear()


def test_without_bwrap_wrap_refuses_and_ensure_decides(use_bwrap, tmp_path, capsys):
    use_bwrap(f"bwrap-missing-{uuid.uuid4().hex}")
    ok, why = sandbox.available()
    assert not ok and "bwrap not installed" in why and "apt-get install bubblewrap" in why
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
