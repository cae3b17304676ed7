"""The night at a glance: runs/<tag>/progress.png and report.html, rebuilt from the ledger alone."""
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from agent.records.ledger import Ledger  # noqa: E402
from agent.guard.redaction import redact  # noqa: E402
from agent.ui.view import fmt  # noqa: E402

DECIDED = ("try", "run")


def incumbent_series(rows: list[dict]) -> list[tuple[str, float]]:
    """(experiment id, incumbent mean seconds after it): the staircase the branch walked down."""
    series, current = [], None
    for r in rows:
        if r["kind"] == "baseline":
            current = r.get("incumbent_s")
        elif r["kind"] in DECIDED and r.get("decision") == "accepted" and r.get("candidate_s"):
            current = r["candidate_s"]
        if current is not None and r["kind"] in DECIDED + ("baseline",):
            series.append((r["id"], current))
    return series


def plot_progress(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = incumbent_series(rows)
    if steps:
        ax.step(range(len(steps)), [s for _, s in steps], where="post", color="black", label="incumbent")
    for i, (exp_id, _) in enumerate(steps):
        r = next(r for r in rows if r["id"] == exp_id)
        cand = [m["seconds"] for m in r.get("runs", []) if m["arm"] == "candidate" and m["status"] == "ok"]
        if r["kind"] in DECIDED and cand:
            colour = "tab:green" if r["decision"] == "accepted" else "tab:gray"
            ax.scatter([i] * len(cand), cand, s=12, color=colour, alpha=0.7)
    ax.set_xticks(range(len(steps)), [exp_id for exp_id, _ in steps], rotation=90 if len(steps) > 20 else 0)
    ax.set_xlabel("experiment")
    ax.set_ylabel("wall-clock per run (s)")
    ax.set_title("incumbent time (line); candidate runs: accepted green, rejected grey")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(tag_dir: Path) -> Path:
    ledger = Ledger(tag_dir)
    rows = ledger.rows()
    plot_progress(rows, ledger.dir / "progress.png")
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    steps = incumbent_series(rows)
    decided = [r for r in rows if r["kind"] in DECIDED]
    accepted = [r for r in decided if r.get("decision") == "accepted"]
    spend = sum((r.get("usage") or {}).get("cost_usd", 0.0) for r in decided)
    head = ""
    if base and steps:
        start, now = base.get("incumbent_s"), steps[-1][1]
        head = (f"<p>Baseline {start:.2f}s &rarr; incumbent {now:.2f}s ({now / start - 1:+.1%}); "
                f"target val loss {base.get('target', 0):.4f}. {len(decided)} experiments, {len(accepted)} accepted; "
                f"LLM spend ${spend:.2f}.</p>")
    e = lambda x: html.escape(str(x if x is not None else ""))
    lines = [f"<tr><td>{e(r['id'])}</td><td>{e(r['kind'])}</td><td class='{e(r.get('decision'))}'>{e(r.get('decision'))}</td>"
             f"<td>{e((r.get('reason') or '').splitlines()[0] if r.get('reason') else '')}</td>"
             f"<td>{fmt(r.get('speedup'), '+.1%', '')}</td><td>{fmt(r.get('val_loss'), '.4f', '')}</td>"
             f"<td>{e(r.get('proposer'))}</td><td>{e(r.get('hypothesis'))}"
             + (f"<details><summary>diff</summary><pre>{e(r.get('diff'))}</pre></details>" if r.get("diff") else "")
             + "</td></tr>" for r in rows]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Ratchet report: {e(tag_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px 8px;vertical-align:top;font-size:14px}} .accepted,.reproduced{{color:green;font-weight:bold}}
.rejected,.failed{{color:#a60}} pre{{font-size:12px;max-width:900px;overflow:auto}}</style></head><body>
<h1>Ratchet: ratchet/{e(tag_dir.name)}</h1>
{head}
<img src="progress.png" alt="progress">
<table><tr><th>id</th><th>kind</th><th>decision</th><th>reason</th><th>speedup</th><th>val loss</th><th>proposer</th>
<th>hypothesis</th></tr>
{''.join(lines)}
</table></body></html>
"""
    path = ledger.dir / "report.html"
    path.write_text(redact(page))
    return path
