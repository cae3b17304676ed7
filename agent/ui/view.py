"""What a person sees while Ratchet works: one line per event, a live bar for the run in progress.

Everything goes to stderr, so that `--json` keeps stdout for the one JSON object of the contract.
"""
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agent.harness import Events
from agent.measure.devices import Measurement


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


class ConsoleEvents(Events):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bar = None
        self.task = None

    def _stop_bar(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def experiment(self, exp_id, hypothesis):
        self.console.rule(f"[bold]experiment {exp_id}[/bold]: {hypothesis or '(no hypothesis)'}")

    def stage(self, text):
        self.console.print(f"  {text}")

    def run_started(self, arm, index, total_steps_hint):
        self._stop_bar()
        self.bar = Progress(TextColumn(f"  run {index:2d} {arm:<9}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.bar.add_task("run", total=total_steps_hint or 1, info="starting")
        self.bar.start()

    def progress(self, arm, p):
        if self.bar is not None:
            self.bar.update(self.task, total=p.total, completed=p.step, info=f"step {p.step}/{p.total} loss {p.loss:.3f}")

    def run_finished(self, m: Measurement):
        self._stop_bar()
        tail = f"val {m.val_loss:.4f}" if m.val_loss is not None else (m.reason or m.status)
        style = "" if m.ok else "red"
        self.console.print(f"  {m.arm:<9} seed {m.seed:<4} {m.seconds:7.2f}s  {tail}", style=style)

    def decided(self, row):
        self._stop_bar()
        colour = "green" if row["decision"] in ("accepted", "reproduced") else "yellow"
        speed = f" speedup {fmt(row.get('speedup'), '+.1%')}" if row.get("speedup") is not None else ""
        stage = f" [dim]({row['stage']}, {len(row.get('runs', []))} timed runs)[/dim]" if row.get("stage") else ""
        self.console.print(f"  [{colour}]{row['decision']}[/{colour}]: {row['reason']}{speed}{stage}")
