"""The experiments so far as the model reads them: one line each in the prompt, and one whole on show_experiment.

Each line carries the evidence behind its decision: the stage that decided, the time ratio with its interval, the
pairs and p, the val loss against the target; a calibrated variant is shown under its parent with its step
counts; a crash or an abort with the last lines of its log; a run of failed proposals as one line. Accepted edits
are condensed to the files they changed (their code is in the files the model is shown; show_experiment has the
diff). The rows are views built by the loop's services (agent/proposer_services.py), plain dicts:
  id, kind, hypothesis, decision, stage, reason, proposer, calibrates, steps_before, steps_after,
  verdict (the judge's numbers, or None), runs [{arm, seconds, val_loss, status}], diff, log_tail [lines], notes
"""
import re

FIELD_CHARS = 240      # a hypothesis or a reason is cut here
LOG_LINES = 3          # a failed run's log lines on its history line
DETAIL_DIFF_CHARS = 12_000  # show_experiment's diff is cut here
DETAIL_LOG_LINES = 30  # show_experiment's log tail
DIFF_FILE = re.compile(r"^diff --git a/(\S+) b/")


def cut(text, limit: int) -> str:
    """text on one line (whitespace runs made single spaces), at most limit characters."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def diffstat(diff: str) -> str:
    """'path (+a -r), ...' for a git diff: what an accepted edit changed, in a few words."""
    files: dict[str, list[int]] = {}
    current = None
    for line in diff.splitlines():
        if m := DIFF_FILE.match(line):
            current = files.setdefault(m[1], [0, 0])
        elif current is not None and line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
            current[line.startswith("-")] += 1
    return ", ".join(f"{path} (+{a} -{r})" for path, (a, r) in files.items()) or "no files"


def judge_numbers(verdict: dict | None) -> str:
    """The time comparison behind a verdict: ratio, speedup interval, pairs, p; '' without one."""
    if not verdict or verdict.get("speedup") is None:
        return ""
    text = f"time x{1 - verdict['speedup']:.3f} (speedup {verdict['speedup']:+.1%}"
    if verdict.get("speedup_lower") is not None and verdict.get("speedup_upper") is not None:
        text += f", interval [{verdict['speedup_lower']:+.1%}, {verdict['speedup_upper']:+.1%}]"
    text += f") over {verdict.get('n_pairs', 0)} pairs"
    if verdict.get("p_value") is not None:
        text += f", p {verdict['p_value']:.3g}"
    return text


def loss_numbers(verdict: dict | None) -> str:
    if not verdict or verdict.get("val_loss_mean") is None:
        return ""
    val, target = verdict["val_loss_mean"], verdict["target_val_loss"]
    return f"val loss {val:.4f} vs target {target:.4f} ({'meets' if val <= target else 'misses'} it)"


def experiment_line(row: dict, indent: str = "") -> str:
    """One experiment on one line (plus its log lines when a run failed)."""
    stage = f" at {row['stage']}" if row.get("stage") else ""
    head = f"{indent}- {row.get('id', '?')} {row.get('decision', '?')}{stage}"
    if row.get("calibrates"):
        head += f" (variant of {row['calibrates']}: steps {row.get('steps_before')} -> {row.get('steps_after')})"
        parts = [head]
    else:
        parts = [f"{head}: {cut(row.get('hypothesis'), FIELD_CHARS)}"]
    verdict = row.get("verdict") or {"speedup": row.get("speedup"), "val_loss_mean": row.get("val_loss"),
                                     "target_val_loss": row.get("target")}
    if verdict.get("target_val_loss") is None:  # a row written without its target: the loss alone
        verdict = {**verdict, "val_loss_mean": None}
        if row.get("val_loss") is not None:
            parts.append(f"val loss {row['val_loss']:.4f}")
    parts += [text for text in (judge_numbers(verdict), loss_numbers(verdict)) if text]
    if row.get("reason"):
        parts.append(cut(row["reason"], FIELD_CHARS))
    if row.get("decision") == "accepted" and row.get("diff"):
        parts.append("changed " + diffstat(row["diff"]))
    line = " | ".join(parts)
    for log_line in row.get("log_tail", [])[-LOG_LINES:]:
        line += f"\n{indent}    > {cut(log_line, FIELD_CHARS)}"
    return line


def history_lines(rows: list[dict]) -> list[str]:
    """The history, oldest first: calibrated variants under their parent, consecutive failed proposals as one."""
    ids = {row.get("id") for row in rows}
    variants: dict[str, list[dict]] = {}  # parent id -> its variants; a variant whose parent is older stays in place
    for row in rows:
        if row.get("calibrates") in ids:
            variants.setdefault(row["calibrates"], []).append(row)
    lines, failed = [], []

    def flush():
        if len(failed) == 1:
            lines.append(experiment_line(failed[0]))
        elif failed:
            lines.append(f"- {failed[0]['id']}..{failed[-1]['id']}: {len(failed)} failed proposals "
                         f"(nothing ran; last: {cut(failed[-1].get('reason'), FIELD_CHARS)})")
        failed.clear()

    for row in rows:
        if row.get("calibrates") in ids:
            continue  # shown under its parent
        if row.get("decision") == "failed":
            failed.append(row)
            continue
        flush()
        lines.append(experiment_line(row))
        lines += [experiment_line(v, indent="  ") for v in variants.pop(row.get("id"), [])]
    flush()
    return lines


def experiment_detail(row: dict) -> str:
    """show_experiment's answer: everything the ledger knows of one experiment, for the model."""
    lines = [experiment_line({**row, "log_tail": []}),
             f"proposer: {row.get('proposer', '?')}; kind: {row.get('kind', '?')}"]
    if row.get("notes"):
        lines.append(f"notes: {cut(row['notes'], 2 * FIELD_CHARS)}")
    runs = row.get("runs") or []
    if runs:
        lines.append("runs (our clock; val loss by the evaluator):")
        for i, r in enumerate(runs):
            val = "-" if r.get("val_loss") is None else f"{r['val_loss']:.4f}"
            lines.append(f"  {i:2d} {r.get('arm', '?'):9s} {r.get('seconds', 0):8.2f}s  val {val}  {r.get('status', '?')}")
    if row.get("curve"):
        lines.append("candidate's training loss (self-reported), step: loss")
        lines.append("  " + ", ".join(f"{step}: {loss:.3f}" for step, loss in row["curve"]))
    if row.get("log_tail"):
        lines.append("end of the failed run's log:")
        lines += [f"  {line}" for line in row["log_tail"][-DETAIL_LOG_LINES:]]
    diff = row.get("diff") or ""
    if diff:
        if len(diff) > DETAIL_DIFF_CHARS:
            diff = diff[:DETAIL_DIFF_CHARS] + "\n... (diff cut)"
        lines += ["diff:", diff.rstrip()]
    else:
        lines.append("no diff recorded (the edit did not apply, or nothing ran)")
    return "\n".join(lines)
