"""The box: the GPUs this machine has, counted apart from torch, and the run shape that fits a config onto them.

Two questions that `ratchet init` and `ratchet doctor` answer before any run:
  - Does torch see the GPUs that are there? PyPI's torch 2.13.0 is a CUDA 13 build: under an NVIDIA driver older
    than 580 it sees no GPU at all, and init would write the CPU preset on an 8-GPU box. So GPUs are counted from
    the device nodes (/dev/nvidia0, ...) and nvidia-smi, and the driver is read from /proc/driver/nvidia/version,
    all independently of torch (`detect`); `torch_blind` says what is wrong and how to fix it.
  - How many processes, and how many sequences per forward? nanomodel's global batch must split evenly over the
    ranks (train.py refuses otherwise: gpt2-124m's 512 does not split over 3, 5, 6 or 7 GPUs), and a micro-batch
    must fit in a GPU's memory (gpt2-124m's 32 sequences with materialized attention need ~50 GB). `fit` answers
    from the config, the GPU count and their memory alone, or refuses with the reason (BoxError).
"""
import functools
import glob
import os
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass

import torch

from agent.settings import Settings
from nanomodel.config import Config, ConfigError, get_config

DEVICE_NODES = "/dev/nvidia[0-9]*"  # one character device per GPU (not nvidiactl, nvidia-uvm, nvidia-caps)
DRIVER_FILE = "/proc/driver/nvidia/version"  # the loaded kernel module's version line
NVIDIA_SMI = "nvidia-smi"  # looked up on PATH
SMI_TIMEOUT = 20  # seconds: a wedged driver can hang nvidia-smi
# the oldest NVIDIA driver that runs builds for each CUDA major version (CUDA's minor-version compatibility)
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
TORCH_BUILDS = "https://pytorch.org/get-started/locally/"  # the pip --index-url of each CUDA build of torch

MAX_NPROC = 8  # the GPU presets' smoke batch of 16 sequences gives each of 8 ranks 2, the least they allow (with 1 a
               # stray squeeze() misleads: agent/settings.py)
USABLE_FRACTION = 0.9  # of a GPU's memory: the caching allocator's fragmentation takes the rest...
RESERVED_GIB = 1.5  # ...and the CUDA context, cuBLAS workspaces and NCCL buffers this much
RUN_MFU = 0.10  # model FLOP utilization assumed for run times: docs/configuration.md's estimate for eager GPT-2
LONG_RUN_HOURS = 8.0  # a run longer than this leaves no night for a baseline (2-5 runs) and a few experiments


class BoxError(RuntimeError):
    """No run fits this box (memory, GPUs), or torch is blind to GPUs that are there."""


# ---------------------------------------------------------------------------------------------- what is there
@dataclass(frozen=True)
class Gpus:
    nodes: int                          # /dev/nvidia[0-9]* device nodes
    smi: tuple                          # ((name, GiB), ...) per GPU that nvidia-smi lists; () without it
    driver: str | None                  # NVIDIA driver version, e.g. "550.54.15"; None when neither source has it
    torch_count: int                    # GPUs torch sees (torch.cuda.device_count())
    torch_mem_gib: float | None         # the smallest visible GPU's memory as torch reports it; None without GPUs
    torch_version: str
    torch_cuda: str | None              # torch.version.cuda: the CUDA its build targets; None for a CPU-only build
    visible: str | None = None          # CUDA_VISIBLE_DEVICES when set: GPUs hidden from torch on purpose

    @property
    def present(self) -> int:
        """GPUs on this machine by the device nodes or nvidia-smi, whatever torch makes of them."""
        return max(self.nodes, len(self.smi))

    @property
    def hidden(self) -> bool:
        """CUDA_VISIBLE_DEVICES names no device ("", "-1", "none"): torch is kept off the GPUs on purpose."""
        return self.visible is not None and not re.match(r"\s*(\d|GPU-|MIG-)", self.visible)

    @property
    def mem_gib(self) -> float | None:
        """Memory of the smallest GPU: torch's figure, else nvidia-smi's."""
        if self.torch_mem_gib is not None:
            return self.torch_mem_gib
        return min((gib for _, gib in self.smi), default=None)


def detect(nodes: str = DEVICE_NODES, driver_file: str = DRIVER_FILE, nvidia_smi: str = NVIDIA_SMI) -> Gpus:
    """This machine's GPUs; the arguments let tests point at fake device nodes, version files and nvidia-smi."""
    smi, smi_driver = _query_smi(nvidia_smi)
    count = torch.cuda.device_count()
    mem = min((torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(count)), default=None)
    return Gpus(nodes=len(glob.glob(nodes)), smi=smi, driver=_read_driver(driver_file) or smi_driver,
                torch_count=count, torch_mem_gib=mem, torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


def _read_driver(path: str) -> str | None:
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ...", or with the open kernel modules
    # "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build ..."
    try:
        text = open(path).read()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def _query_smi(executable: str) -> tuple[tuple, str | None]:
    """((name, GiB) per GPU, driver version) from nvidia-smi; ((), None) when it is missing or fails."""
    try:
        out = subprocess.run([executable, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=SMI_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return (), None
    if out.returncode != 0:
        return (), None
    rows = [line.rsplit(",", 2) for line in out.stdout.splitlines() if line.strip()]
    try:
        gpus = tuple((name.strip(), float(mib) / 1024) for name, mib, _ in rows)
    except ValueError:  # "[N/A]" or a message instead of the three fields
        return (), None
    return gpus, rows[0][2].strip() if rows else None


def _driver_major(driver: str | None) -> int | None:
    m = re.match(r"\d+", driver or "")
    return int(m[0]) if m else None


def min_driver(torch_cuda: str | None) -> int | None:
    """The oldest driver that runs torch's CUDA build; None for a CPU build or a CUDA not in MIN_DRIVER."""
    return MIN_DRIVER.get(int(torch_cuda.split(".")[0])) if torch_cuda else None


def driver_too_old(g: Gpus) -> tuple[str, str] | None:
    """(problem, fix) when torch's CUDA build needs a newer NVIDIA driver than this one; None otherwise."""
    need, have = min_driver(g.torch_cuda), _driver_major(g.driver)
    if need is None or have is None or have >= need:
        return None
    runs = max((major for major, driver in MIN_DRIVER.items() if driver <= have), default=None)
    alternative = f"a torch build for CUDA {runs}" if runs else "a torch build for an older CUDA"
    return (f"torch {g.torch_version} is a CUDA {g.torch_cuda} build, which needs NVIDIA driver >= {need}; "
            f"this driver is {g.driver}",
            f"upgrade the NVIDIA driver to >= {need}, or install {alternative} (its pip --index-url: {TORCH_BUILDS})")


def torch_blind(g: Gpus) -> tuple[str, str] | None:
    """(problem, fix) when GPUs are there but torch sees none; None otherwise, and where CUDA_VISIBLE_DEVICES hides
    them on purpose (the test suite does)."""
    if not g.present or g.torch_count or g.hidden:
        return None
    driver = f"driver {g.driver}" if g.driver else "driver version unknown"
    problem = f"{g.present} NVIDIA GPU(s) present ({driver}) but torch {g.torch_version} sees none"
    if g.torch_cuda is None:
        return (f"{problem}: it is a CPU-only build",
                f"install a CUDA build of torch that this driver runs (its pip --index-url: {TORCH_BUILDS})")
    old = driver_too_old(g)
    if old:
        return f"{problem}: {old[0]}", old[1]
    return (f"{problem} (a CUDA {g.torch_cuda} build)",
            "check CUDA_VISIBLE_DEVICES, and the error of `python -c 'import torch; torch.cuda.init()'`")


def default_preset(g: Gpus) -> str:
    """The preset `ratchet init` writes without --preset: gpt2-research where torch sees GPUs, cpu-test where there
    are none. Without a GPU, Ratchet is being tried out, and cpu-test's runs of about 10 s show a first verdict
    minutes after `make run` starts; cpu-tiny, whose 1.35M-parameter model learns for real in 1.5-3 minutes a run,
    puts its first verdict 20-45 minutes in (README, "How long"). Where GPUs are there but torch is blind to them, a
    refusal: a CPU night on a GPU box is never meant."""
    blind = torch_blind(g)
    if blind:
        raise BoxError(f"{blind[0]}. Fix: {blind[1]}. To train on the CPU anyway: ratchet init --preset cpu-tiny")
    return "gpt2-research" if g.torch_count else "cpu-test"


# ---------------------------------------------------------------------------------------------- what fits
# Memory per GPU, for nanomodel's GPT under bf16 autocast, eager, attention materialized as [B, H, T, T]
# (C = n_embd, H = n_head, T = seq_len, V = vocab_size, L = n_layer, N = parameters). Bytes per token and layer that
# autograd keeps for the backward:
#   the fp32 residual stream into ln_1 and ln_2 (the LayerNorm kernel saves its input)          2 x 4C
#   autocast's bf16 copy of c_attn's input; q, k, v (c_attn's bf16 output)                       2C + 6C
#   the bf16 attention output that c_proj saves                                                  2C
#   c_fc's bf16 input, its bf16 [4C] output (saved by GELU), GELU's output (saved by c_proj)    2C + 8C + 8C
#                                                                                       together 36C
#   the scores: softmax runs in fp32 under autocast and keeps its output (4HT); att @ v keeps its bf16 cast (2HT): 6HT
# Once per token: the bf16 logits the cross-entropy kernel keeps and their bf16 gradient, 4V; and while one layer's
# attention runs backward, ~10HT of score gradients (fp32 and bf16) on top.
# Once per GPU: fp32 weights, gradients and DDP's gradient buckets (3 x 4N), AdamW's two moments (8N), autocast's
# bf16 weight copies (2N): 22N.
# gpt2-124m at micro-batch 32: 32,768 tokens x (12 x (27,648 + 73,728) + 201,028 + 122,880) B = 50.5 GB, plus
# 22 x 124.4M = 2.7 GB: 53.2 GB (49.6 GiB) per GPU, of an 80 GB H100's ~70 GiB usable.
@dataclass(frozen=True)
class BoxShape:
    nproc: int                # training processes, one per GPU: the most GPUs (<= MAX_NPROC) the batch splits over
    micro_batch: int          # sequences per forward/backward on each GPU: the config's, or fewer where it won't fit
    grad_accum: int           # micro-batches per optimizer step on each GPU
    gib: float                # estimated peak memory per GPU at this micro-batch
    usable_gib: float         # of each GPU's memory, what a run can use (USABLE_FRACTION, RESERVED_GIB)
    run_hours: float | None   # estimated hours per run at RUN_MFU of the config's peak_flops; None without peak_flops
    notes: tuple              # how it differs from one process per GPU at the config's micro-batch, and long runs


def usable_gib(mem_gib: float) -> float:
    return USABLE_FRACTION * mem_gib - RESERVED_GIB


@functools.cache
def _model_figures(cfg: Config) -> tuple[int, float]:
    """(parameters, training FLOPs per token), from the model built on the meta device: no memory, no time."""
    from nanomodel.model import build_model
    from nanomodel.train import flops_per_token
    with torch.device("meta"):
        model = build_model(asdict(cfg))
    return sum(p.numel() for p in model.parameters()), flops_per_token(model, cfg)


def memory_gib(cfg: Config, micro_batch: int) -> float:
    """Estimated peak memory per GPU for `micro_batch` sequences per forward (the arithmetic above)."""
    C, H, T, V, L = cfg.n_embd, cfg.n_head, cfg.seq_len, cfg.vocab_size, cfg.n_layer
    per_token = L * (36 * C + 6 * H * T) + 4 * V + 10 * H * T
    params, _ = _model_figures(cfg)
    return (micro_batch * T * per_token + 22 * params) / 2**30


def run_hours(cfg: Config, nproc: int) -> float | None:
    if not cfg.peak_flops:
        return None
    _, flops = _model_figures(cfg)
    return flops * cfg.batch_size * cfg.seq_len * cfg.steps / (nproc * cfg.peak_flops * RUN_MFU) / 3600


def fit(cfg: Config, gpus: int, mem_gib: float) -> BoxShape:
    """The shape of a run of `cfg` on `gpus` GPUs of `mem_gib` GiB each; BoxError when none fits."""
    if gpus < 1:
        raise BoxError(f"no GPU to fit on (gpus={gpus})")
    usable = usable_gib(mem_gib)
    nproc = max(n for n in range(1, min(gpus, MAX_NPROC) + 1) if cfg.batch_size % n == 0)
    per_rank = cfg.batch_size // nproc
    wanted = min(cfg.micro_batch_size, per_rank)  # what train.py takes with this many ranks
    micro = next((m for m in range(wanted, 0, -1) if per_rank % m == 0 and memory_gib(cfg, m) <= usable), None)
    if micro is None:
        raise BoxError(f"one sequence of {cfg.seq_len} tokens per forward needs ~{memory_gib(cfg, 1):.1f} GiB per GPU; "
                       f"a {mem_gib:.0f} GiB GPU leaves {usable:.1f} GiB usable: use GPUs with more memory or a "
                       f"smaller config")
    notes = []
    if nproc < gpus:
        why = (f"batch {cfg.batch_size} does not split over {gpus}" if nproc < min(gpus, MAX_NPROC)
               else f"the smoke batch of 16 gives more than {MAX_NPROC} ranks fewer than 2 sequences each")
        notes.append(f"uses {nproc} of {gpus} GPUs: {why}")
    if micro < wanted:
        notes.append(f"micro-batch {micro} instead of {wanted}: {wanted} needs ~{memory_gib(cfg, wanted):.1f} GiB, "
                     f"{usable:.1f} GiB usable")
    hours = run_hours(cfg, nproc)
    if hours is not None and hours > LONG_RUN_HOURS:
        notes.append(f"~{hours:.0f} h a run (estimated): a baseline of 2-5 runs takes days; more GPUs or a shorter "
                     f"preset (gpt2-research)")
    return BoxShape(nproc=nproc, micro_batch=micro, grad_accum=per_rank // micro, gib=memory_gib(cfg, micro),
                    usable_gib=usable, run_hours=hours, notes=tuple(notes))


def nanomodel_config(name: str) -> Config | None:
    """The nanomodel config of that name; None for a repo of one's own (docs/bring-your-own-repo.md)."""
    try:
        return get_config(name)
    except ConfigError:
        return None


def command_micro_batch(command: str) -> int | None:
    """The --micro_batch_size that a [train] command passes, if any."""
    args = shlex.split(command)
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--micro_batch_size" and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--micro_batch_size=") else None)
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                raise BoxError(f"[train] command: --micro_batch_size {value!r} is not a positive number")
            return int(value)
    return None


def configure(s: Settings, gpus: int, mem_gib: float) -> BoxShape | None:
    """Write the shape that fits this box into settings `s` (what `ratchet init` does on a GPU box): [train] nproc,
    and --micro_batch_size on the command only when memory demands fewer than the config's. None for a config that
    is not nanomodel's (its shape is its owner's).
    The override outlives edits of the config: an edit that changes batch_size must still split in micro-batches
    of this size, which it does for the powers of two fit picks and the catalog's batches (256, 384, 512)."""
    cfg = nanomodel_config(s.train.config)
    if cfg is None:
        return None
    shape = fit(cfg, gpus, mem_gib)
    s.train.nproc = shape.nproc
    if shape.micro_batch < min(cfg.micro_batch_size, cfg.batch_size // shape.nproc):
        s.train.command += f" --micro_batch_size {shape.micro_batch}"
    return shape
