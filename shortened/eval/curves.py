"""`curves.png`: each task's reported metric against training tokens, one line per run, runs overlaid."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from shortened.eval.results import RESULTS_FILE, ZERO_SHOT_MEAN, read_results
from shortened.eval.tasks import PERPLEXITY_METRIC

Series = dict[str, dict[str, list[tuple[int, float]]]]  # panel -> run -> [(tokens, value)]


def collect(run_dirs: Sequence[str | Path]) -> Series:
    """The reported metric of every ok row, per panel ("task (metric)") and run; the newest row per point wins."""
    series: Series = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        rows = read_results(run_dir / RESULTS_FILE)
        if not rows:
            raise FileNotFoundError(f"{run_dir / RESULTS_FILE}: no results to plot (is this a run directory?)")
        latest: dict[tuple[str, str, int], dict] = {}
        for row in sorted(rows, key=lambda r: r.get("time") or 0):
            if row.get("status") == "ok" and row.get("primary"):
                latest[(row["task"], row["metric"], row["tokens"])] = row
        for (task, metric, tokens), row in latest.items():
            series.setdefault(f"{task} ({metric})", {}).setdefault(run_dir.name, []).append((tokens, row["value"]))
    for runs in series.values():
        for points in runs.values():
            points.sort()
    return series


def plot_curves(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Draw every panel (zero-shot tasks, their mean, then perplexities on a log axis) into `output`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series = collect(run_dirs)
    # zero-shot tasks in the order the suite ran them, then their mean, then perplexities and losses
    panels = sorted(series, key=lambda p: (_is_perplexity(p) or p.startswith("validation"),
                                           p.startswith(ZERO_SHOT_MEAN)))
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for run, points in sorted(series[panel].items()):
            ax.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=3, label=run)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _tokens(x)))
        values = [v for points in series[panel].values() for _, v in points]
        if _is_perplexity(panel) and min(values) > 0 and max(values) / min(values) > 3:
            ax.set_yscale("log")  # a pruned model starts at a PPL many times its final one
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _tokens(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def _is_perplexity(panel: str) -> bool:
    return panel.endswith(f"({PERPLEXITY_METRIC})")
