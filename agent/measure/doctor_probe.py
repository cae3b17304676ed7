"""What `ratchet doctor` runs where training runs: under torchrun, inside the sandbox when there is one.

    python -m torch.distributed.run --standalone --nproc_per_node=N -m agent.measure.doctor_probe

Each rank joins an all-reduce (NCCL on GPU, gloo on CPU); rank 0 also counts the GPUs it sees, launches one
compiled Triton kernel on CUDA (which builds its launcher with the C compiler and Python.h, in here) and reads the
free disk of the run dir. Rank 0 writes the findings to $RATCHET_RUN_DIR/probe.json, each finding on its own:
a failure is its message there, so one broken part does not hide the others.
"""
import datetime
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

RESULT = "probe.json"
ALLREDUCE_TIMEOUT = datetime.timedelta(seconds=60)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[-1][:500]


def allreduce(cuda: bool) -> str | None:
    """None when every rank's sum of (rank + 1) comes back right, else what went wrong."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=ALLREDUCE_TIMEOUT, device_id=device if cuda else None)
    try:
        value = torch.full((4,), rank + 1.0, device=device)
        dist.all_reduce(value)
        want = world * (world + 1) / 2
        return None if value.eq(want).all().item() else f"rank {rank} got {value.tolist()}, want {want}"
    finally:
        dist.destroy_process_group()


def triton_kernel() -> str | None:
    """None when the Triton GELU, compiled for this GPU, matches the reference; else the error."""
    os.environ["RATCHET_KERNELS"] = "triton"
    import kernels
    from kernels.reference import gelu_tanh_ref
    x = torch.randn(4099, device="cuda")
    diff = (kernels.gelu_tanh(x) - gelu_tanh_ref(x)).abs().max().item()
    return None if diff <= 1e-5 else f"the compiled kernel differs from the reference by {diff:.3g}"


def main() -> None:
    cuda = torch.cuda.is_available()
    found = {"ranks": int(os.environ["WORLD_SIZE"]), "backend": "nccl" if cuda else "gloo"}
    try:
        found["allreduce"] = allreduce(cuda) or "ok"
    except Exception as e:  # a finding, not a crash
        found["allreduce"] = _error(e)
    if os.environ["RANK"] != "0":
        return
    run_dir = Path(os.environ["RATCHET_RUN_DIR"])
    found["gpus"] = torch.cuda.device_count()
    found["free_gib"] = shutil.disk_usage(run_dir).free / 2**30
    if cuda:
        try:
            found["triton"] = triton_kernel() or "ok"
        except Exception as e:
            found["triton"] = _error(e)
    (run_dir / RESULT).write_text(json.dumps(found))


if __name__ == "__main__":
    main()
