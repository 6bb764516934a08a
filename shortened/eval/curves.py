"""`curves.png`: each task's reported metric against training tokens, one line per run, runs overlaid.

A reference model (the unpruned source, evaluated once by `launch/evaluate.py`) is a dashed horizontal line in
every panel it has a value for, shaded ±1 stderr when it is given as rows (`--results`); zero-shot points are shaded
±1 stderr as lm-eval reports it. One legend under the panels names the runs and the reference (a legend in each
panel covered the lines it names). A run trained
under a mixture (data.mixture, data.dynamic) also gets a panel of its domain weights over tokens, from the
`domain_weights` of its train_log.jsonl; dynamic loading's per-domain validation losses (validation/SOURCE rows) are
panels beside the validation loss.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Sequence

from shortened.eval.results import RESULTS_FILE, ZERO_SHOT_MEAN, read_results
from shortened.eval.tasks import PERPLEXITY_METRIC

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MEAN_PANEL = (ZERO_SHOT_MEAN, "mean")
VALIDATION_TASK = "validation"  # shortened.eval.validation.TASK; not imported, that module loads torch
TRAIN_LOG = "train_log.jsonl"  # shortened.train.metrics writes it
DEFAULT_REFERENCE_LABEL = "source (unpruned)"
SHADING_NOTE = "shaded: ±1 stderr (lm-eval)"

Panel = tuple[str, str]  # (task, metric)
LEGEND_ROW_INCHES = 0.3


class CurvesInputError(ValueError):
    """Labels that do not fit the runs, or a reference file that is not launch/evaluate.py's JSON."""


class Point(NamedTuple):
    tokens: int
    value: float
    stderr: float | None  # None where lm-eval gave none, and for perplexities and losses


@dataclass
class Curves:
    runs: list[str]  # labels, in the order given
    series: dict[Panel, dict[str, list[Point]]] = field(default_factory=dict)  # panel -> run label -> points
    mean_members: set[tuple[tuple[str, str], ...]] = field(default_factory=set)  # of every mean row drawn
    weights: dict[str, dict[str, list[Point]]] = field(default_factory=dict)  # run label -> source -> weights


@dataclass
class Reference:
    """One model's figures: each panel's value and, where its rows carried one, lm-eval's stderr."""
    values: dict[Panel, float]
    stderr: dict[Panel, float] = field(default_factory=dict)


def collect(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> Curves:
    """The reported metric of every ok row, per panel and run (labelled by `labels`, else the directory name);
    the newest row per point wins."""
    curves = Curves(_labels(run_dirs, labels))
    for run_dir, label in zip(map(Path, run_dirs), curves.runs):
        rows = read_results(run_dir / RESULTS_FILE)
        if not rows:
            raise FileNotFoundError(f"{run_dir / RESULTS_FILE}: no results to plot (is this a run directory?)")
        latest = _newest_ok(rows, lambda r: (r["task"], r["metric"], r["tokens"]), lambda r: bool(r.get("primary")))
        _warn_mixed_sequences(run_dir, latest)
        for (task, metric, tokens), row in latest.items():
            curves.series.setdefault((task, metric), {}).setdefault(label, []).append(
                Point(tokens, row["value"], row.get("stderr")))
            if (task, metric) == MEAN_PANEL:
                # rows written before the mean named its members have none: no reference mean for them
                curves.mean_members.add(tuple(sorted((row.get("members") or {}).items())))
        weights = domain_weights(run_dir / TRAIN_LOG)
        if weights:
            curves.weights[label] = weights
    for runs in curves.series.values():
        for points in runs.values():
            points.sort()
    return curves


def _warn_mixed_sequences(run_dir: Path, latest: dict[tuple, dict]) -> None:
    """A run resumed across the change that spread a limit's validation sequences over the split (docs/evaluation.md)
    has losses on two sets of sequences in one curve; the step between them is the text's, not the model's: say so."""
    for task, spans in mixed_validation_sequences(latest.values()).items():
        log.warning("%s: the %s loss was scored on two sets of sequences (%s): the run spans the change that spread a "
                    "limit's sequences over the split (docs/evaluation.md), so the step between them is the text's, "
                    "not the model's", run_dir / RESULTS_FILE, task, spans)


def mixed_validation_sequences(rows: Iterable[dict]) -> dict[str, str]:
    """Each validation task (validation, validation/SOURCE) whose rows were scored on more than one set of sequences
    -> which tokens were scored on which ("first sequences at 0-256,000 tokens; spread sequences at ..."); failed
    rows are left out."""
    marks: dict[str, dict[str, list[int]]] = {}  # task -> sequences mark ("first" for unmarked rows) -> tokens
    for row in rows:
        task = row["task"]
        if row.get("status") == "ok" and (task == VALIDATION_TASK or task.startswith(VALIDATION_TASK + "/")):
            marks.setdefault(task, {}).setdefault(row.get("sequences", "first"), []).append(row["tokens"])
    return {task: "; ".join(f"{mark} sequences at {_token_span(tokens)} tokens" for mark, tokens in sorted(by.items()))
            for task, by in marks.items() if len(by) > 1}


def _token_span(tokens: list[int]) -> str:
    return f"{min(tokens):,}-{max(tokens):,}"


def domain_weights(train_log: Path) -> dict[str, list[Point]]:
    """Each source's mixture weight at every step of the log that has them (rows in step order; a torn last line,
    from a job killed while writing, is skipped)."""
    if not train_log.is_file():
        return {}
    weights: dict[str, list[Point]] = {}
    for line in train_log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for source, weight in (row.get("domain_weights") or {}).items():
            weights.setdefault(source, []).append(Point(row["tokens"], weight, None))
    return weights


def load_reference(path: str | Path) -> Reference:
    """A model's figures from either file `launch/evaluate.py` writes: the rows of `--results FILE.jsonl` (each value
    with its stderr; the newest ok row of a task and metric wins) or the `{task: {metric: value}}` JSON of
    `--output` (values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such reference file; write it with "
                                "`launch/evaluate.py --model SOURCE_MODEL ... --results FILE.jsonl`")
    return _reference_rows(path) if path.suffix == ".jsonl" else _reference_json(path)


def _newest_ok(rows: list[dict], key: Callable[[dict], tuple], keep: Callable[[dict], bool]) -> dict[tuple, dict]:
    """The newest ok row of each key among the rows `keep` accepts (a point evaluated again, e.g. after a resume,
    has several)."""
    return {key(row): row for row in sorted(rows, key=lambda r: r.get("time") or 0)
            if row.get("status") == "ok" and keep(row)}


def _reference_rows(path: Path) -> Reference:
    latest = _newest_ok(read_results(path), lambda r: (r["task"], r["metric"]), lambda r: _finite(r.get("value")))
    if not latest:
        raise CurvesInputError(f"{path}: no ok rows of `launch/evaluate.py --results` to draw as the reference")
    return Reference({panel: float(row["value"]) for panel, row in latest.items()},
                     {panel: float(row["stderr"]) for panel, row in latest.items() if _finite(row.get("stderr"))})


def _reference_json(path: Path) -> Reference:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CurvesInputError(f"{path}: cannot read the reference as JSON ({err})") from None
    if not (isinstance(data, dict) and all(isinstance(metrics, dict) for metrics in data.values())):
        raise CurvesInputError(f"{path}: not the {{task: {{metric: value}}}} JSON `launch/evaluate.py --output` "
                               "writes (or rows of --results, named *.jsonl)")
    return Reference({(task, metric): float(value) for task, metrics in data.items()
                      for metric, value in metrics.items() if _finite(value)})


def reference_values(reference: Reference, curves: Curves) -> dict[Panel, tuple[float, float | None]]:
    """(value, stderr or None) of the reference for each panel of `curves` it has; the mean panel gets the reference's
    mean over the runs' mean members, taken as `results.mean_row` takes it (value and stderr), and nothing when it
    cannot be the same mean."""
    values = {panel: (reference.values[panel], reference.stderr.get(panel)) for panel in curves.series
              if panel != MEAN_PANEL and panel in reference.values}
    if MEAN_PANEL not in curves.series:
        return values
    if len(curves.mean_members) != 1 or () in curves.mean_members:
        log.warning("no reference line for %s: the runs' mean rows do not all name the same member tasks",
                    ZERO_SHOT_MEAN)
        return values
    members = next(iter(curves.mean_members))
    missing = [f"{task} ({metric})" for task, metric in members if (task, metric) not in reference.values]
    if missing:
        log.warning("no reference line for %s: the reference has no %s", ZERO_SHOT_MEAN, ", ".join(missing))
        return values
    stderrs = [reference.stderr[member] for member in members if member in reference.stderr]
    stderr = math.sqrt(sum(se * se for se in stderrs)) / len(members) if len(stderrs) == len(members) else None
    values[MEAN_PANEL] = (sum(reference.values[member] for member in members) / len(members), stderr)
    return values


def curves_figure(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
                  reference: str | Path | None = None, reference_label: str = DEFAULT_REFERENCE_LABEL) -> Figure:
    """Every panel (zero-shot tasks, their mean, then perplexities on a log axis and the validation loss), runs
    in the order given, each in one colour across panels; the caller saves and closes the figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    ref = load_reference(reference) if reference is not None else None  # a bad reference fails before the runs
    curves = collect(run_dirs, labels)
    ref_values = reference_values(ref, curves) if ref is not None else {}
    colours = {label: f"C{i}" for i, label in enumerate(curves.runs)}
    # zero-shot tasks in the order the suite ran them, then their mean, then perplexities and losses
    panels = sorted(curves.series, key=lambda p: (_is_perplexity(p) or _is_validation(p), p == MEAN_PANEL))
    columns = min(4, len(panels) + len(curves.weights))
    rows = math.ceil((len(panels) + len(curves.weights)) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    shaded = False
    for ax, panel in zip(axes.flat, panels):
        values = [p.value for points in curves.series[panel].values() for p in points]
        log_axis = _is_perplexity(panel) and min(values) > 0 and max(values) / min(values) > 3
        if log_axis:
            ax.set_yscale("log")  # a pruned model starts at a PPL many times its final one
        for label, points in curves.series[panel].items():
            tokens = np.array([p.tokens for p in points], dtype=float)
            value = np.array([p.value for p in points], dtype=float)
            ax.plot(tokens, value, marker="o", markersize=3, color=colours[label], label=label)
            stderr = np.array([np.nan if p.stderr is None else p.stderr for p in points], dtype=float)
            if not np.isnan(stderr).all():  # fill_between leaves a gap at a point without a stderr
                ax.fill_between(tokens, value - stderr, value + stderr, color=colours[label], alpha=0.2, linewidth=0)
                shaded = True
        if panel in ref_values:
            level, level_stderr = ref_values[panel]
            ax.axhline(level, color="black", linestyle="--", linewidth=1, label=reference_label)
            spread = level_stderr or 0.0
            if spread:
                ax.axhspan(level - spread, level + spread, color="black", alpha=0.1, linewidth=0)
                shaded = True
            # a reference at the data's edge sat on the frame, where it cannot be seen
            ax.set_ylim(*_with_margin(ax.get_ylim(), level - spread, level + spread, log_axis))
        ax.set_title(f"{panel[0]} ({panel[1]})", fontsize=10)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _tokens(x)))
        ax.grid(alpha=0.3)
    for ax, (label, weights) in zip(list(axes.flat)[len(panels):], curves.weights.items()):
        for source, points in weights.items():
            ax.step([p.tokens for p in points], [p.value for p in points], where="post", label=source)
        ax.set_title(f"domain weights: {label}", fontsize=10)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _tokens(x)))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) + len(curves.weights):]:
        ax.set_visible(False)
    if shaded:
        fig.suptitle(SHADING_NOTE, fontsize=8)
    legend_rows = _figure_legend(fig, list(axes.flat)[:len(panels)])
    # room under the panels for the legend, and above them for the note
    fig.tight_layout(rect=(0, legend_rows * LEGEND_ROW_INCHES / fig.get_figheight(), 1, 0.97 if shaded else 1))
    return fig


def _with_margin(limits: tuple[float, float], low_level: float, high_level: float,
                 log_axis: bool) -> tuple[float, float]:
    """Axis limits that also hold [low_level, high_level] with 5 % of the axis to spare, measured in decades on a log
    axis (a linear margin there went below zero under a perplexity reference far below the runs)."""
    scale, unscale = (math.log10, lambda x: 10**x) if log_axis else (float, float)
    low, high = map(scale, limits)
    pad = 0.05 * (high - low)
    return unscale(min(low, scale(low_level) - pad)), unscale(max(high, scale(high_level) + pad))


def _figure_legend(fig: Figure, axes: Sequence[Any]) -> int:
    """One legend under the panels for every run and the reference (each drawn in one style across panels); returns
    its rows."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        return 0
    columns = min(len(entries), 4)
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=columns, fontsize=8, frameon=False)
    return math.ceil(len(entries) / columns)


def plot_curves(run_dirs: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None,
                reference: str | Path | None = None, reference_label: str = DEFAULT_REFERENCE_LABEL) -> Path:
    """`curves_figure(...)` saved as `output` (a PNG by its suffix)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dirs, labels, reference, reference_label)
    try:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=110)
    finally:
        plt.close(fig)
    return output


def _labels(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    if labels is not None and len(labels) != len(run_dirs):
        raise CurvesInputError(f"{len(labels)} label(s) for {len(run_dirs)} run director(ies): give one --label per "
                               "run directory, in the same order, or none")
    names = list(labels) if labels is not None else [Path(run_dir).name for run_dir in run_dirs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CurvesInputError(f"run label(s) {', '.join(repeated)} given to more than one run (their lines would "
                               "merge); give each run its own --label")
    return names


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tokens(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def _is_validation(panel: Panel) -> bool:
    return panel[0] == VALIDATION_TASK or panel[0].startswith(VALIDATION_TASK + "/")


def _is_perplexity(panel: Panel) -> bool:
    return panel[1] == PERPLEXITY_METRIC
