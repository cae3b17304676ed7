"""`ratchet`: the command line. Every command works from the repo's ratchet.toml (written by `ratchet init`).

Exit codes: 0 for any decision (accepted or rejected); 2 for errors (bad arguments, broken setup, an API key refused
or a model unknown); `doctor`: 1 when a check failed.
With --json, `try`, `baseline` and `replay` end with one JSON object on a line of its own on stdout.
"""
import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent import settings as settings_mod
from agent.measure.box import BoxError
from agent.edit.parse import EditError
from agent.guard.integrity import IntegrityError
from agent.baseline import measure_baseline
from agent.experiment import experiment
from agent.harness import Harness, HarnessError
from agent.replay import replay
from agent.measure.runner import RunnerError
from agent.guard.sandbox import SandboxError
from agent.records.ledger import Ledger
from agent.records.types import Arm
from agent.propose.chat_api import ProposerFatal
from agent.settings import SettingsError
from agent.ui.view import ConsoleEvents, fmt
from agent.edit.workspace import Workspace, WorkspaceError, repo_root
from nanomodel.data import DataError


class UsageError(Exception):
    """Options that cannot work together."""


ERRORS = (SettingsError, HarnessError, WorkspaceError, EditError, IntegrityError, RunnerError, SandboxError,
          DataError, FileNotFoundError, BoxError, ProposerFatal, UsageError)
err = Console(stderr=True)


def _harness(args) -> Harness:
    """The harness of a command that changes the tag's branch or records: one such process per tag."""
    root = repo_root(Path.cwd())
    h = Harness(root, settings_mod.load(root), args.tag, ConsoleEvents(err), require_sandbox=args.require_sandbox)
    h.lock()
    return h


def _emit(args, obj) -> None:
    if args.json:
        print(json.dumps(obj, default=str), flush=True)


def _summary(row: dict) -> dict:
    keys = ("id", "kind", "decision", "reason", "stage", "speedup", "candidate_s", "incumbent_s", "p_value",
            "val_loss", "target", "commit", "ref", "recorded_speedup", "replay_of", "screen")
    out = {k: row.get(k) for k in keys if k in row}
    out["runs"] = len(row.get("runs", []))  # timed runs started (a screened or aborted run counts)
    out["candidate_seconds"] = [r["seconds"] for r in row.get("runs", []) if r["arm"] == "candidate"]
    out["incumbent_seconds"] = [r["seconds"] for r in row.get("runs", []) if r["arm"] == "incumbent"]
    out["val_losses"] = [r["val_loss"] for r in row.get("runs", []) if r["arm"] == "candidate"]
    return out


# ---------------------------------------------------------------------------------------------- commands
def cmd_init(args) -> int:
    from agent.measure import box
    from agent.ui import doctor
    root = repo_root(Path.cwd())
    gpus = box.detect()
    path = root / settings_mod.FILENAME
    if path.exists() and not args.force:
        if args.set or args.preset:  # asked for settings the kept file may not have: say so instead of ignoring it
            raise SettingsError(f"{path} exists: --preset and --set apply to a ratchet.toml being written "
                                "(add --force)")
        err.print(f"{path} exists: keeping it (--force to overwrite)")
        s = settings_mod.load(root)
    else:
        # without --preset: refused where GPUs are there but torch sees none (box.default_preset says why)
        preset = args.preset or box.default_preset(gpus)
        s = settings_mod.preset(preset)
        shape = box.configure(s, gpus.torch_count, gpus.mem_gib) if gpus.torch_count else None
        s = settings_mod.with_overrides(s, args.set)
        path.write_text(settings_mod.dumps(s))
        fitted = f", {shape.nproc} GPU process(es), micro-batch {shape.micro_batch}" if shape else ""
        err.print(f"wrote {path} (preset {preset}{fitted})")
    if "fineweb" in s.data_dir.name:  # every time: it fetches only the shards this config needs and lacks
        from nanomodel.config import ConfigError
        from nanomodel.prepare import FINEWEB_TRAIN_SHARDS, fineweb_train_shards, prepare
        try:  # enough shards that a calibrated longer run repeats no data
            shards = fineweb_train_shards(s.train.config, headroom=s.length.max_fraction if s.length.calibrate else 1.0)
        except ConfigError:  # not a nanomodel config (a bring-your-own repo)
            shards = FINEWEB_TRAIN_SHARDS
        err.print(f"preparing dataset fineweb ({shards} train shards) in {s.data_dir} ...")
        prepare("fineweb", root=s.data_dir.parent, name=s.data_dir.name, train_shards=shards)
    elif not (s.data_dir / "manifest.json").exists():
        from nanomodel.prepare import prepare
        err.print(f"preparing dataset stdlib in {s.data_dir} ...")
        prepare("stdlib", root=s.data_dir.parent, name=s.data_dir.name)
    checks = doctor.run(root, gpus)
    doctor.render(checks, err)
    if not doctor.passed(checks):  # not an error here: `make run` works without bubblewrap, unsandboxed and warned
        err.print("[red bold]some checks failed[/red bold]: runs may fail or go unsandboxed until their fixes above "
                  "are done (`ratchet doctor` checks again)")
    return 0


def cmd_doctor(args) -> int:
    from agent.ui import doctor
    checks = doctor.run(repo_root(Path.cwd()))
    if args.json:
        print(doctor.as_json(checks), flush=True)
    else:
        doctor.render(checks, Console())
    return 0 if doctor.passed(checks) else 1


def cmd_baseline(args) -> int:
    h = _harness(args)
    b = measure_baseline(h, force=args.force)
    arm = Arm.from_state(b)
    err.print(f"baseline: {arm.mean_seconds:.2f}s mean over {len(arm.seconds)} runs, "
              f"val loss {arm.mean_val_loss:.4f}, target {b['target']:.4f}")
    _emit(args, {"decision": "baseline", "reason": f"target {b['target']:.4f}", "seconds": b["seconds"],
                 "val_losses": b["val_losses"], "target": b["target"], "commit": b["commit"]})
    return 0


def cmd_try(args) -> int:
    text = sys.stdin.read() if args.patch == "-" else Path(args.patch).read_text()
    rows = experiment(_harness(args), text, proposer=args.proposer,
                      calibrate_length=False if args.no_calibrate else None)
    # the edit's fate: its accepted variant if calibration found one, else its own verdict
    out = _summary(next((r for r in rows if r["decision"] == "accepted"), rows[0]))
    out["experiments"] = [_summary(r) for r in rows]
    _emit(args, out)
    return 0


def cmd_replay(args) -> int:
    rows = replay(_harness(args), args.revs, onto=args.onto)
    for r in rows:
        err.print(f"{r['replay_of'][:10]} recorded {fmt(r['recorded_speedup'], '.1%')} "
                  f"reproduced {fmt(r['speedup'], '.1%')}: {r['decision']} ({r['reason']})")
    _emit(args, {"decision": "reproduced" if all(r["decision"] == "reproduced" for r in rows) else "not reproduced",
                 "reason": "; ".join(f"{r['replay_of'][:10]}: {r['reason']}" for r in rows),
                 "commits": [_summary(r) for r in rows]})
    return 0


def cmd_log(args) -> int:
    rows = Ledger(repo_root(Path.cwd()) / "runs" / args.tag).rows()
    table = Table("id", "kind", "decision", "stage", "runs", "reason", "speedup", "val loss", "hypothesis",
                  title=f"ratchet/{args.tag}")
    for r in rows:
        table.add_row(r["id"], r["kind"], r["decision"], r.get("stage", ""), str(len(r.get("runs", []))),
                      (r.get("reason") or "").splitlines()[0][:60] if r.get("reason") else "",
                      fmt(r.get("speedup"), "+.1%"), fmt(r.get("val_loss"), ".4f"), (r.get("hypothesis") or "")[:60])
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: no 80-column wrapping
    return 0


def cmd_status(args) -> int:
    root = repo_root(Path.cwd())
    ledger = Ledger(root / "runs" / args.tag)
    state, rows = ledger.load_state(), ledger.rows()
    ws = Workspace(root, args.tag)
    lines = [f"tag          {args.tag}",
             f"branch       {ws.branch} @ {ws.head()[:10] if ws.branch_exists() else '(not created yet)'}"]
    if "baseline" in state:
        b, inc = Arm.from_state(state["baseline"]), Arm.from_state(state["incumbent"])
        lines += [f"baseline     {b.mean_seconds:.2f}s, val loss {b.mean_val_loss:.4f}, target {state['baseline']['target']:.4f}",
                  f"incumbent    {inc.commit[:10]}: {inc.mean_seconds:.2f}s ({inc.mean_seconds / b.mean_seconds - 1:+.1%} vs baseline)"]
    else:
        lines.append("baseline     none yet (`ratchet baseline`)")
    decided = [r for r in rows if r["kind"] not in ("baseline", "replay")]
    lines.append(f"experiments  {len(decided)}: {sum(r['decision'] == 'accepted' for r in decided)} accepted, "
                 f"{sum(r['decision'] == 'rejected' for r in decided)} rejected")
    if state.get("inflight"):
        lines.append(f"in flight    experiment {state['inflight']['id']} (resumes on the next command)")
    print("\n".join(lines))
    return 0


def cmd_run(args) -> int:
    from agent.loop import Budgets, Loop
    from agent.propose import default_kind, make_proposer
    from agent.ui.report import write_report

    kind = args.proposer or default_kind()
    if kind == "catalog":
        reason = "chosen with --proposer" if args.proposer else "no ANTHROPIC_API_KEY or OPENAI_API_KEY set"
        err.print(f"proposer: catalog (offline, built-in speedrun ideas; {reason})")
    proposer = make_proposer(kind, model=args.model, base_url=args.base_url, tools=not args.no_tools,
                             api_key_env=args.api_key_env, price=args.price, thinking=args.thinking)
    _check_priced(proposer, args.budget_usd)
    h = _harness(args)
    if h.devices.nproc == 1 and not _has_gpu():
        err.print(f"device: CPU only, config {h.settings.train.config} (no GPU found)")
    budgets = Budgets(max_experiments=args.max_experiments, hours=args.hours, budget_usd=args.budget_usd)
    reason = Loop(h, proposer, budgets, console=err).run()
    report = write_report(h.ledger.dir)
    err.print(f"report: {report}")
    _emit(args, {"decision": "stopped", "reason": reason})
    return 0


def _check_priced(proposer, budget_usd: float | None) -> None:
    """A spend budget needs a price: a model without one would count as free, and the budget would never stop."""
    from agent.propose.llm_proposer import LLMProposer
    if budget_usd is not None and isinstance(proposer, LLMProposer) and not proposer.priced:
        raise UsageError(f"--budget-usd: model {proposer.model!r} has no price in the built-in table, so its spend "
                         "cannot be counted; give one with --price INPUT,OUTPUT (USD per million input and output "
                         "tokens, e.g. --price 3,15)")


def _price(text: str) -> dict:
    """--price INPUT,OUTPUT -> {"input", "output"} in USD per million tokens."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected INPUT,OUTPUT in USD per million tokens, e.g. 3,15")
    return {"input": values[0], "output": values[1]}


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def cmd_stop(args) -> int:
    tag_dir = repo_root(Path.cwd()) / "runs" / args.tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / "STOP").write_text("stop requested\n")
    err.print(f"asked ratchet/{args.tag} to stop after its current run")
    return 0


def cmd_report(args) -> int:
    from agent.ui.report import write_report
    print(write_report(repo_root(Path.cwd()) / "runs" / args.tag))
    return 0


def cmd_bench(args) -> int:
    import importlib
    return importlib.import_module(f"agent.bench.{args.what}").main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratchet", description="Commit only the patches that make training faster.")
    parser.add_argument("--version", action="version", version="ratchet 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        if name not in ("init", "bench", "doctor"):
            p.add_argument("--tag", default="default", help="research session: branch ratchet/<tag>, folder runs/<tag>")
        if name in ("baseline", "try", "replay", "run"):
            p.add_argument("--require-sandbox", action="store_true",
                           help="fail instead of running unsandboxed when bubblewrap is unavailable")
        return p

    p = command("init", cmd_init, "write ratchet.toml (fitted to this box's GPUs), prepare data, run the doctor")
    p.add_argument("--preset", choices=sorted(settings_mod.PRESETS))
    p.add_argument("--force", action="store_true", help="overwrite an existing ratchet.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one setting of the ratchet.toml written, as TOML (judge.max_pairs=2, "
                        "train.data='\"~/data\"'); repeatable")
    p = command("doctor", cmd_doctor, "check that runs can start here: GPUs, driver, box shape, compiler, sandbox, "
                                      "NCCL/gloo and Triton inside it, disk, data")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: {ok, checks: [{name, ok, skipped, detail, fix}]}")
    p = command("baseline", cmd_baseline, "measure the incumbent n times and set the val-loss target")
    p.add_argument("--force", action="store_true", help="measure again even if the tag has a baseline")
    p.add_argument("--json", action="store_true")
    p = command("try", cmd_try, "take one edit file (SEARCH/REPLACE or unified diff) through the whole pipeline")
    p.add_argument("patch", help="edit file, or - for stdin")
    p.add_argument("--proposer", default="manual", help="recorded in the ledger and the commit trailer")
    p.add_argument("--no-calibrate", action="store_true", help="judge the edit at its own length only")
    p.add_argument("--json", action="store_true")
    p = command("replay", cmd_replay, "re-measure commits against their parents (or --onto another base)")
    p.add_argument("revs", nargs="+")
    p.add_argument("--onto", help="cherry-pick the commits onto this base and verify each in turn")
    p.add_argument("--json", action="store_true")
    p = command("run", cmd_run, "the autonomous loop: propose, measure, judge, commit, until a budget is spent")
    p.add_argument("--proposer", choices=["catalog", "anthropic", "openai"],
                   help="default: anthropic or openai if its API key is set, else catalog")
    p.add_argument("--model", help="LLM model name")
    p.add_argument("--base-url", help="API endpoint (OpenAI-compatible servers: vLLM, llama.cpp, Ollama)")
    p.add_argument("--no-tools", action="store_true", help="plain-text mode, for models without tool use")
    p.add_argument("--api-key-env", default="", metavar="NAME",
                   help="the variable holding the API key (default: ANTHROPIC_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--price", type=_price, metavar="INPUT,OUTPUT",
                   help="the model's price, USD per million input and output tokens (e.g. 3,15): needed with "
                        "--budget-usd for a model the built-in price table lacks")
    p.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                   help="extended thinking (Anthropic) or high reasoning effort (OpenAI); auto: on for models that "
                        "think, once the incumbent's run takes 10 minutes or more")
    p.add_argument("--max-experiments", type=int, help="experiments for this tag (failed proposals do not count)")
    p.add_argument("--hours", type=float)
    p.add_argument("--budget-usd", type=float, help="LLM spend for this tag, in USD")
    p.add_argument("--json", action="store_true")
    command("stop", cmd_stop, "ask a running `ratchet run` to stop after its current training run")
    command("report", cmd_report, "write runs/<tag>/report.html and progress.png")
    command("log", cmd_log, "the experiments as a table")
    command("status", cmd_status, "where the session stands")
    p = command("bench", cmd_bench, "benchmarks: judge (simulation), night (a simulated night of verdicts), model (training speed here), loop (overhead)")
    p.add_argument("what", choices=["judge", "night", "model", "loop"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ERRORS as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")  # escaped: "[train] nproc" is no markup
        return 2
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: the same command resumes the interrupted experiment (the run in progress "
                  "is measured again)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
