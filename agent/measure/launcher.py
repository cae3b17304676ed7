"""Which programs a run's command starts: `python` and `torchrun` are always Ratchet's own.

The training command of ratchet.toml says `torchrun ...` or `python ...`. Looked up on PATH, that is whatever comes
first there: a system or conda torchrun with another torch (and another NCCL, another CUDA), or one in a directory
the sandbox does not mount, so that the run dies at once inside it. Ratchet's interpreter is the one whose torch
the harness and the evaluator use and the one the sandbox mounts, so both names mean that interpreter, whether or
not its environment is activated. Any other command (an absolute path, `uv run ...`) is taken as written.
"""
import sys

PYTHON_NAMES = ("python", "python3")
# torchrun's console script is `from torch.distributed.run import main`: the module, run by our interpreter, is the
# same program without depending on where the environment put its scripts
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def resolve_launcher(cmd: list[str]) -> list[str]:
    """`cmd` with a leading `python`/`python3` or `torchrun` replaced by Ratchet's own interpreter (and its torch)."""
    if cmd[0] in PYTHON_NAMES:
        return [sys.executable, *cmd[1:]]
    if cmd[0] == "torchrun":
        return [*TORCHRUN, *cmd[1:]]
    return cmd
