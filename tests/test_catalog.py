"""The catalog proposer: every entry is a valid, applicable, runnable edit, and the proposer hands them out in order,
once each, for the right hardware, passing over the ones that no longer apply."""
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from agent.edit.apply import apply_edit
from agent.edit.parse import parse_edit
from agent.propose.base import Context
from agent.propose.catalog import CatalogError, CatalogProposer, config_blocks, detect_hardware, render
from agent.propose.catalog_entries import CPU_ORDER, ENTRIES, GPU_ORDER, HARDWARE, KINDS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nanomodel", "kernels")  # the editable target: entries are applied to copies of these
CPU_ENTRIES = [e for e in ENTRIES if e.hardware in ("any", "cpu")]
BY_KEY = {e.key: e for e in ENTRIES}


def baseline_files() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text()
            for pkg in PACKAGES for p in sorted((REPO / pkg).glob("*.py"))}


def copy_target(dest: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and far faster than two on a machine the team shares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """key -> a copy of the baseline nanomodel/ and kernels/ with that entry applied."""
    files = baseline_files()
    out = {}
    for entry in ENTRIES:
        tree = copy_target(tmp_path_factory.mktemp(entry.key))
        apply_edit(parse_edit(render(entry, files)), tree)
        out[entry.key] = tree
    return out


@contextlib.contextmanager
def imported_from(tree: Path):
    """nanomodel's modules imported from `tree`; whatever was imported under those names before comes back after."""
    def ours():
        return [name for name in sys.modules if name.split(".")[0] in PACKAGES]

    saved = {name: sys.modules.pop(name) for name in ours()}
    sys.path.insert(0, str(tree))
    try:
        yield tuple(importlib.import_module(f"nanomodel.{m}") for m in ("config", "model", "train"))
    finally:
        sys.path.remove(str(tree))
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)


def context(files=None, hardware="CPU: 2 cores (x86_64), no GPU; torch 2.13.0", history=()) -> Context:
    return Context(root=str(REPO), editable=["nanomodel/**", "kernels/**"], protected=["kernels/reference.py"],
                   files=baseline_files() if files is None else files, incumbent={}, hardware=hardware,
                   history=list(history), rules="")


def proposed_keys(proposer: CatalogProposer, ctx: Context) -> list[str]:
    """Every key the proposer hands out until it returns None, recording each in the history as the ledger would."""
    keys = []
    while (proposal := proposer.propose(ctx)) is not None:
        keys.append(proposal.key)
        ctx.history.append({"key": proposal.key, "hypothesis": proposal.hypothesis, "decision": "rejected"})
        assert len(keys) <= len(ENTRIES), "the proposer repeats itself"
    return keys


# --- the entries ----------------------------------------------------------------------------------------------


def test_catalog_has_enough_well_formed_entries_in_both_orders():
    keys = [e.key for e in ENTRIES]
    assert len(ENTRIES) >= 20
    assert len(set(keys)) == len(keys)
    assert all(e.hardware in HARDWARE and e.kind in KINDS for e in ENTRIES)
    for order, excluded in ((CPU_ORDER, "gpu"), (GPU_ORDER, "cpu")):
        assert len(set(order)) == len(order)
        assert set(order) == {e.key for e in ENTRIES if e.hardware != excluded}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.key)
def test_entry_parses_and_touches_only_the_target(entry):
    edit = parse_edit(render(entry, baseline_files()))
    assert edit.hypothesis == entry.hypothesis and "\n" not in edit.hypothesis
    assert len(edit.rationale) > 80
    assert edit.paths()
    for path in edit.paths():
        assert path.split("/")[0] in PACKAGES and path != "kernels/reference.py", path


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.key)
def test_entry_applies_to_the_baseline_and_changes_it(entry, tmp_path):
    tree = copy_target(tmp_path)
    changed = apply_edit(parse_edit(render(entry, baseline_files())), tree)
    assert changed
    assert all((tree / path).read_text() != (REPO / path).read_text() for path in changed if (REPO / path).exists())


@pytest.mark.parametrize("entry", CPU_ENTRIES, ids=lambda e: e.key)
def test_entry_model_trains_a_step_on_cpu_and_stays_causal(entry, trees):
    with imported_from(trees[entry.key]) as (config, model_module, train):
        cfg = config.get_config("cpu-test")
        torch.manual_seed(0)
        model = model_module.build_model(asdict(cfg))
        optimizer = train.make_optimizer(model, cfg, fused=False)
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
        for _ in range(2):  # a step, so that zero-initialized layers are no longer trivially causal
            logits = model(idx)
            assert logits.shape[:2] == idx.shape and logits.shape[2] >= cfg.vocab_size
            targets = idx.roll(-1, 1).flatten()
            loss = torch.nn.functional.cross_entropy(logits[..., :cfg.vocab_size].flatten(0, 1), targets)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert all(0 < train.lr_at(step, cfg) <= cfg.lr * (1 + 1e-9) for step in range(cfg.steps))
        with torch.no_grad():
            base = model(idx)
            cut = cfg.seq_len // 2
            changed = idx.clone()
            changed[0, cut:] = (changed[0, cut:] + 1) % cfg.vocab_size
            changed[1] = (changed[1] + 1) % cfg.vocab_size
            assert torch.equal(model(changed)[0, :cut], base[0, :cut])
            assert not torch.equal(model(changed)[0, cut:], base[0, cut:])  # the probe would notice a change


def test_vocab_padding_keeps_exactly_the_vocab_in_the_logits(trees):
    with imported_from(trees["vocab-pad-128"]) as (config, model_module, _):
        cfg = asdict(config.get_config("cpu-test", vocab_size=4000))
        model = model_module.build_model(cfg)
        assert model.wte.weight.shape[0] == 4096
        assert model(torch.randint(0, 4000, (2, 8))).shape == (2, 8, 4000)


def test_step_cuts_scale_every_named_config_and_follow_the_incumbent(trees, tmp_path):
    with imported_from(trees["fewer-steps-15"]) as (config, _, _):
        cut = {name: c.steps for name, c in config.CONFIGS.items()}
        lrs = {name: c.lr for name, c in config.CONFIGS.items()}
    with imported_from(REPO) as (config, _, _):
        base = {name: c.steps for name, c in config.CONFIGS.items()}
        assert lrs == {name: c.lr for name, c in config.CONFIGS.items()}  # nothing else moved
    assert cut == {name: round(steps * 0.85) for name, steps in base.items()}
    # a second cut is relative to the incumbent's steps, not the baseline's
    tree = copy_target(tmp_path)
    shutil.copy(trees["fewer-steps-15"] / "nanomodel/config.py", tree / "nanomodel/config.py")
    files = baseline_files() | {"nanomodel/config.py": (tree / "nanomodel/config.py").read_text()}
    apply_edit(parse_edit(render(BY_KEY["fewer-steps-30"], files)), tree)
    with imported_from(tree) as (config, _, _):
        assert {name: c.steps for name, c in config.CONFIGS.items()} == {n: round(s * 0.7) for n, s in cut.items()}


def test_config_values_keep_their_type_and_the_comment_column():
    text = ("    steps: int = 300       # length\n    lr: float = 1e-3\n"
            "CONFIGS = {\n    \"a\": Config(steps=40, lr=3e-3),\n}\n")
    blocks = config_blocks(text, {"steps": 0.5, "lr": 2.0}, {})
    assert "    steps: int = 150       # length" in blocks
    assert "    lr: float = 0.002" in blocks and "Config(steps=20, lr=0.006)" in blocks
    assert "    lr: float = 0.0" in config_blocks(text, {}, {"lr": 0.0})
    with pytest.raises(CatalogError, match="no line sets warmup"):
        config_blocks(text, {"warmup": 2.0}, {})


# --- the proposer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hardware, line, order", [
    ("cpu", "CPU: 2 cores (x86_64), no GPU; torch 2.13.0; fp32", CPU_ORDER),
    ("gpu", "GPU: 8x NVIDIA H100 80GB HBM3; torch 2.13.0; bf16 autocast; NCCL", GPU_ORDER)])
def test_proposals_follow_the_hardware_order_once_each_then_none(hardware, line, order):
    assert detect_hardware(line) == hardware
    proposer = CatalogProposer()
    ctx = context(hardware=line)
    keys = proposed_keys(proposer, ctx)
    assert keys == order  # unchanged baseline files: every entry applies, in order, once
    assert all(BY_KEY[k].hardware in ("any", hardware) for k in keys)
    other = {e.key for e in ENTRIES if e.hardware not in ("any", hardware)}
    assert other and {key for key, _ in proposer.skipped} == other
    assert proposer.propose(ctx) is None


def test_explicit_hardware_wins_over_the_context_line():
    proposal = CatalogProposer(hardware="gpu").propose(context(hardware="CPU: 2 cores, no GPU"))
    assert proposal.key == GPU_ORDER[0]
    assert CatalogProposer(hardware="gpu").propose(context(history=[{"key": GPU_ORDER[0]}])).key == GPU_ORDER[1]
    with pytest.raises(ValueError, match="'tpu'"):
        CatalogProposer(hardware="tpu")


def test_an_entry_in_the_history_is_never_proposed_again():
    first, second, third = CPU_ORDER[:3]
    # a resumed session: a fresh proposer, the ledger's rows (by key, or by hypothesis for rows without a key)
    history = [{"key": first, "hypothesis": BY_KEY[first].hypothesis},
               {"key": None, "hypothesis": BY_KEY[second].hypothesis}]
    proposal = CatalogProposer().propose(context(history=history))
    assert proposal.key == third and proposal.proposer == "catalog"
    assert proposal.hypothesis == BY_KEY[third].hypothesis
    assert proposal.text.startswith(f"HYPOTHESIS: {proposal.hypothesis}\nRATIONALE: ")
    # the loop asks for the next edit while the current one trains: the queued one is pending, not yet history
    proposer = CatalogProposer()
    ctx = context()
    assert proposer.propose(ctx).key == first
    ctx.pending = [{"key": first, "hypothesis": BY_KEY[first].hypothesis}]
    assert proposer.propose(ctx).key == second
    # an entry dropped from the queue (made against a head that moved) is no longer pending: it comes back
    ctx.pending = []
    assert proposer.propose(ctx).key == first


def test_entries_that_no_longer_apply_or_change_nothing_are_skipped():
    files = baseline_files()
    # the incumbent already uses fused attention (written differently) and the speedrun's Adam settings
    model = files["nanomodel/model.py"].replace("att = torch.softmax(att, dim=-1)", "att = att.softmax(dim=-1)")
    config = files["nanomodel/config.py"].replace("beta1: float = 0.9", "beta1: float = 0.8").replace(
        "eps: float = 1e-8", "eps: float = 1e-10")
    proposer = CatalogProposer(hardware="cpu")
    keys = proposed_keys(proposer, context(files | {"nanomodel/model.py": model, "nanomodel/config.py": config}))
    assert keys == [k for k in CPU_ORDER if k not in ("sdpa-attention", "adam-betas-eps")]
    reasons = dict(proposer.skipped)
    assert reasons["sdpa-attention"].startswith("does not apply: nanomodel/model.py: block #2")
    assert reasons["adam-betas-eps"] == "changes nothing: already in place"


# --- end to end (slow) ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("entry", CPU_ENTRIES, ids=lambda e: e.key)
def test_entry_trains_with_the_real_script_and_reloads(entry, trees, dataset, tmp_path):
    tree = trees[entry.key]
    env = {**os.environ, "RATCHET_RUN_DIR": str(tmp_path), "RATCHET_TRAIN_DATA": str(dataset), "RATCHET_SEED": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-m", "nanomodel.train", "--config", "cpu-test", "--steps", "3",
                           "--log_every", "1"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 3/3 loss" in proc.stdout
    checkpoint = torch.load(tmp_path / "final.pt", weights_only=True)
    with imported_from(tree) as (_, model_module, _):
        model_module.build_model(checkpoint["config"]).load_state_dict(checkpoint["model"], strict=True)
