"""What this machine's devices can do at best: peak bf16 FLOP/s, memory bandwidth and interconnect by GPU name, the
memory a run can fill, and the library versions. The proposer reads them against the incumbent's own numbers (its
tokens/s, its peak memory): a run at 10% of peak FLOP/s has room a run at 60% has not.

The table holds vendor datasheet figures, dense (without 2:4 sparsity, which datasheets often quote by default
and which training does not use). A GPU that is not in it is "unknown", never guessed from a neighbour.
"""
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata

import torch


@dataclass(frozen=True)
class GpuSpec:
    model: str           # the part, as the vendor names it ("H100 SXM5 80GB")
    bf16_tflops: float   # peak dense bf16 tensor-core TFLOP/s (fp32 accumulate)
    memory_tbs: float    # peak memory bandwidth, TB/s
    interconnect: str    # how two GPUs of this part talk: NCCL over NVLink on SXM parts, PCIe otherwise


NVLINK4 = "NVLink 4 (900 GB/s per GPU, NVSwitch on 8-GPU boards)"
NVLINK3 = "NVLink 3 (600 GB/s per GPU)"
NVL_BRIDGE = "NVLink bridge between pairs or fours (600 GB/s); PCIe Gen5 otherwise"
PCIE4, PCIE5 = "PCIe Gen4 (no NVLink)", "PCIe Gen5 (no NVLink unless bridged)"

# (pattern on torch.cuda.get_device_name, spec): the first match wins, so variants come before their family
SPECS: tuple[tuple[str, GpuSpec], ...] = (
    (r"B200", GpuSpec("B200 SXM 180GB", 2250, 8.0, "NVLink 5 (1.8 TB/s per GPU)")),
    (r"H200 NVL", GpuSpec("H200 NVL 141GB", 835, 4.8, NVL_BRIDGE)),
    (r"H200", GpuSpec("H200 SXM 141GB", 989, 4.8, NVLINK4)),
    (r"H100 NVL", GpuSpec("H100 NVL 94GB", 835, 3.9, NVL_BRIDGE)),
    (r"H100.*PCIe", GpuSpec("H100 PCIe 80GB", 756, 2.0, PCIE5)),
    (r"H100", GpuSpec("H100 SXM5 80GB", 989, 3.35, NVLINK4)),
    (r"A100.*SXM.*80GB", GpuSpec("A100 SXM4 80GB", 312, 2.039, NVLINK3)),
    (r"A100.*SXM", GpuSpec("A100 SXM4 40GB", 312, 1.555, NVLINK3)),
    (r"A100.*80GB", GpuSpec("A100 PCIe 80GB", 312, 1.935, PCIE4)),
    (r"A100", GpuSpec("A100 PCIe 40GB", 312, 1.555, PCIE4)),
    (r"L40S", GpuSpec("L40S 48GB", 362, 0.864, PCIE4)),
    (r"L4\b", GpuSpec("L4 24GB", 121, 0.3, PCIE4)),
    (r"RTX 4090", GpuSpec("GeForce RTX 4090 24GB", 165, 1.008, PCIE4)),
)


def gpu_spec(name: str) -> GpuSpec | None:
    """The datasheet figures of a GPU by its torch name ("NVIDIA H100 80GB HBM3"); None when not in the table."""
    return next((spec for pattern, spec in SPECS if re.search(pattern, name)), None)


def device_name() -> str | None:
    """The first visible GPU's name; None on a machine where torch sees no GPU."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def device_memory_mb() -> float:
    """What a run's peak memory is read against, in MiB: the first GPU's memory, or without GPUs the machine's RAM
    (which the ranks share)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def library_versions() -> dict[str, str]:
    """Python, torch, triton (read from its metadata: no import, which costs seconds), and on GPUs CUDA and NCCL."""
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton}
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return versions
