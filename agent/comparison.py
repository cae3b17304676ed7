"""One experiment's timed comparison: the candidate's opening run, then interleaved timed runs of both arms until
the judge decides.

What is timed: every timed run is one whole training command, measured from outside by the runner
(agent/measure/runner.py) and evaluated in a process of its own; the opening run is never timed for the judge.
Both arms of a pair train with the same seed (100 + pair), so a pair differs only by the edit. Each finished run
goes to the experiment's journal the moment it is measured: a resume takes those runs as measured and runs only
the rest, in the same order (the judge's coin flips are seeded per experiment).
"""
from dataclasses import asdict, replace
from pathlib import Path

from agent.measure.devices import Measurement, failure_reason
from agent.measure.runner import AbortPolicy, Progress
from agent.records.experiments import order_seed
from agent.records.types import Arm, Decision, Experiment, Stage
from agent.verdict.judge import CANDIDATE, INCUMBENT, Judge
from agent.verdict.screen import ScreenMonitor

OPENING_SEED = 0  # the opening run's seed, which marks it in an experiment's journal (timed runs: 100 + pair)


class HarnessError(RuntimeError):
    """A broken setup (not a verdict on an edit): no baseline, the incumbent itself fails, data missing."""


class Stopped(Exception):
    """A clean stop was requested between two runs; the unfinished experiment resumes with the runs it finished."""


class Comparison:
    """The runs of one experiment (`exp`, filled in as they finish) between the candidate's worktree and the
    incumbent's. `incumbent`: state.json's arm, the reference until this experiment's own incumbent runs; `target`:
    the val-loss target. `calibrate_noise`: step calibration follows; the judge may stop a candidate that learns
    clearly better than it needs to at its first look (Judge's learns_better_noise). `should_stop` is asked between
    runs: when it says yes, Stopped is raised and the experiment stays in flight."""

    def __init__(self, h, exp: Experiment, cand_wt: Path, inc_wt: Path, incumbent: dict, target: float,
                 calibrate_noise: float | None = None, should_stop=lambda: False):
        self.h, self.exp, self.cand_wt, self.inc_wt = h, exp, cand_wt, inc_wt
        self.exp_dir = h.ledger.exp_dir(exp.id)  # the runs' folders
        self.should_stop = should_stop
        self.inc_seconds = Arm.from_state(incumbent).mean_seconds
        self.inc_curve = incumbent["curve"]  # the abort rules' reference: the incumbent's latest run
        exp.order_seed = order_seed(h.ws.tag, exp.id)
        prior = h.noise_prior()
        exp.prior = None if prior is None else {"var": prior.var, "df": prior.df}
        self.judge = Judge(h.judge_params(), target, exp.order_seed, prior, learns_better_noise=calibrate_noise)
        self.first_screen: ScreenMonitor | None = None  # built by the opening for a block that opens with the candidate

    def run(self, done: list[dict] = ()) -> tuple[Decision, str, dict | None, Stage]:
        """-> (decision, reason, verdict dict, stage). `done`: the runs this experiment finished before an
        interruption (its journal), in order."""
        h, exp, judge = self.h, self.exp, self.judge
        done = list(done)
        if done and done[0]["seed"] == OPENING_SEED:  # a resume: the opening run was measured before
            exp.smoke = done.pop(0)
            h.events.stage(f"resuming: the opening run and {len(done)} timed runs were measured before")
        elif done:  # a resume of an experiment that had no opening run (C I I C on a GPU preset)
            h.events.stage(f"resuming: {len(done)} timed runs were measured before")
        elif rejected := self.opening():
            return rejected
        for entry in done:
            m = Measurement(**entry)
            exp.runs.append(entry)
            judge.add(m.arm, m.seconds, m.val_loss)
            self.inc_curve = m.curve if m.arm == INCUMBENT else self.inc_curve
        while (verdict := judge.verdict()).state == "continue":
            if self.should_stop():
                raise Stopped()
            arm = judge.next_arm()
            m, screen = self.timed_run(arm, index=len(exp.runs))
            if not m.ok:
                if arm == INCUMBENT:
                    raise HarnessError(f"the incumbent failed ({m.status}: {m.reason}); log: {m.log}")
                screened = screen is not None and bool(screen.last and screen.last["reject"])
                if screened:
                    exp.screen = screen.last
                return (Decision.REJECTED, failure_reason(m), asdict(judge.verdict()),
                        Stage.SCREEN if screened else Stage.RUN)
            if arm == INCUMBENT:
                self.inc_curve = m.curve
            h.ledger.add_to_journal(exp.id, asdict(m))
            judge.add(arm, m.seconds, m.val_loss)
        return Decision(verdict.state), verdict.reason, asdict(verdict), Stage.JUDGE

    def timed_run(self, arm: str, index: int) -> tuple[Measurement, ScreenMonitor | None]:
        """Run `arm` as the experiment's run `index`: the incumbent with the NaN checks only; the candidate under
        the abort rules, its first run under the screen (after the NaN rule) when there is one."""
        h, s, exp = self.h, self.h.settings, self.exp
        recent = [r["seconds"] for r in exp.runs if r["arm"] == INCUMBENT]
        ref_seconds = sum(recent) / len(recent) if recent else self.inc_seconds
        policy, screen = AbortPolicy(), None
        if arm == CANDIDATE:
            policy = AbortPolicy(ref_seconds, [Progress(**p) for p in self.inc_curve], pace_slack=s.abort.pace_slack,
                                 loss_slack=s.abort.loss_slack, min_fraction=s.abort.min_fraction)
            if not any(r["arm"] == CANDIDATE for r in exp.runs):
                screen = self.first_screen or h.screen(exp.to_row(), first=AbortPolicy())
                policy = screen or policy
        h.events.run_started(arm, index, None)
        wt = self.cand_wt if arm == CANDIDATE else self.inc_wt
        m = h.measure(arm, wt, self.exp_dir / f"run-{index:02d}-{arm}", seed=100 + index // 2,
                      timeout=s.train.timeout_factor * ref_seconds, policy=policy)
        exp.runs.append(asdict(m))
        return m, screen

    def opening(self) -> tuple | None:
        """The candidate's untimed run in front of the first block, which catches a crash before it costs timed runs.
        When the screen has the incumbent's recent runs ([screen] recent_runs, the GPU presets) and opening_fraction
        is above 0:
        - a block that opens with the candidate (C I I C) needs none: that first timed run is the screen's against
          those runs, and its evaluation, like every evaluation, runs the causality probe first;
        - a block that opens with the incumbent gets a screen run: the full command under the screen against those
          runs, stopped at opening_fraction of its steps. A candidate that cannot win then costs part of a run,
          not the lead incumbent run and a candidate run.
        Otherwise (the CPU presets): the smoke run, a few steps and the causality probe.
        -> a rejection (decision, reason, None, stage), or None to go on. It is journaled with seed OPENING_SEED."""
        h, exp = self.h, self.exp
        fraction = h.settings.screen.opening_fraction
        screen = h.screen(exp.to_row(), first=AbortPolicy(), until=fraction) if fraction > 0 else None
        if screen is not None and self.judge.order[0] == CANDIDATE:
            self.first_screen = replace(screen, until=1.0)  # the same reference, for the whole first timed run
            return None
        timeout = h.settings.train.timeout_factor * self.inc_seconds
        if screen is None:
            h.events.stage("smoke run")
            m = h.measure(CANDIDATE, self.cand_wt, self.exp_dir / "smoke", seed=OPENING_SEED, smoke=True,
                          policy=AbortPolicy(), timeout=timeout)
        else:
            h.events.stage(f"screen run (to {fraction:.0%} of the steps, against the incumbent's recent runs)")
            m = h.measure(CANDIDATE, self.cand_wt, self.exp_dir / "screen-run", seed=OPENING_SEED, policy=screen,
                          timeout=timeout)
            if screen.passed:
                m.status = "ok"  # stopped by us where the screen had seen enough: not a failure
        exp.smoke = asdict(m)
        if m.ok:
            h.ledger.add_to_journal(exp.id, asdict(m))
            return None
        if screen is not None and screen.last and screen.last["reject"]:
            exp.screen = screen.last
            return Decision.REJECTED, failure_reason(m), None, Stage.SCREEN
        return Decision.REJECTED, failure_reason(m), None, Stage.SMOKE
