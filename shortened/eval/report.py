"""The paper-style table of one model's results and the `{task: {metric: value}}` summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from shortened.eval.results import ZERO_SHOT_MEAN
from shortened.eval.tasks import PERPLEXITY_METRIC
from shortened.eval.validation import METRIC as VALIDATION_METRIC


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """`{task: {metric: value}}` of every row; a failed task has its metric mapped to None."""
    out: dict[str, dict[str, float | None]] = {}
    for row in rows:
        out.setdefault(row["task"], {})[row["metric"]] = row["value"] if row["status"] == "ok" else None
    return out


def write_summary(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """`summary(rows)` as the JSON `launch/evaluate.py --output` writes (and `plot_curves --reference` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary(rows), indent=1) + "\n")


def paper_table(rows: Sequence[dict[str, Any]]) -> str:
    """One header and one value line in the order of the rows: each task's reported metric (accuracies in %, as
    the paper prints them), then the zero-shot mean, then perplexities and the validation loss; failures and
    skipped rows underneath."""
    primary = [r for r in rows if r["primary"]]
    unscaled = (PERPLEXITY_METRIC, VALIDATION_METRIC)  # printed as they are, after the fractions printed in %
    order = [r for r in primary if r["metric"] not in unscaled and r["task"] != ZERO_SHOT_MEAN]
    order += [r for r in primary if r["task"] == ZERO_SHOT_MEAN]
    order += [r for r in primary if r["metric"] in unscaled]
    heads, cells = [], []
    for row in order:
        heads.append(f"{row['task']}({row['metric']})")
        if row["status"] != "ok":
            cells.append("FAILED")
        elif row["metric"] in unscaled:
            cells.append(f"{row['value']:.2f}" if row["metric"] == PERPLEXITY_METRIC else f"{row['value']:.4f}")
        else:
            cells.append(f"{100 * row['value']:.2f}")
    widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths)), "  ".join(c.rjust(w) for c, w in zip(cells, widths))]
    for row in rows:
        if row["status"] != "ok":
            last = (row.get("error") or "").strip().splitlines()[-1:] or [""]
            lines.append(f"FAILED {row['task']}: {last[0]}")
        elif row["primary"] and row.get("skipped_rows"):
            lines.append(f"SKIPPED {row['task']}: {row['skipped_rows']} malformed row(s) not scored, first: "
                         f"{row['skipped'][0]}")
    return "\n".join(lines)
