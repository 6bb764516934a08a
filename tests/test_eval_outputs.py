"""results.jsonl I/O, curves.png from several runs, and the one-model CLI (launch/evaluate.py)."""
from __future__ import annotations

import json
import math
import runpy
import sys

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from shortened.eval.curves import collect, curves_figure, mixed_validation_sequences
from shortened.eval.report import paper_table, summary, write_summary
from shortened.eval.results import append_rows, failed_row, mean_row, ok_row, read_results, stamp
from shortened.model_dir import ModelDirError, resolve_model_dir
from shortened.modeling import build_tiny_llama, save_with_tokenizer

import warm_start
from conftest import EVAL_DATA, ROOT, TOKENIZER_MODEL, subprocess_env


def test_a_torn_line_costs_only_itself(tmp_path):
    path = tmp_path / "results.jsonl"
    append_rows(path, stamp([ok_row("piqa", "acc", 0.5, primary=True)], run="r", step=1, tokens=10, source="watch"))
    with open(path, "a") as handle:
        handle.write('{"run": "r", "step": 2, "tok')  # a writer killed mid-line (not by append_rows)
    append_rows(path, stamp([ok_row("piqa", "acc", 0.6, primary=True)], run="r", step=3, tokens=30, source="watch"))
    assert [(r["step"], r["value"]) for r in read_results(path)] == [(1, 0.5), (3, 0.6)]


def _zero_shot(boolq: float, hellaswag: float, boolq_se: float | None = 0.01) -> list[dict]:
    """Two mean members' rows (every metric lm-eval reports, one of them primary) and their mean row."""
    members = [ok_row("boolq", "acc", boolq, boolq_se, primary=True),
               ok_row("hellaswag", "acc_norm", hellaswag, 0.02, primary=True)]
    return [*members, ok_row("hellaswag", "acc", hellaswag - 0.05, 0.02, primary=False), mean_row(members)]


def _write_run(run_dir, shift: float) -> None:
    for step, tokens in ((100, 1_000_000), (200, 2_000_000), (300, 3_000_000)):
        rows = [*_zero_shot(0.5 + shift + step / 1e4, 0.35 + shift, boolq_se=None if step == 300 else 0.01),
                ok_row("wikitext2", "ppl", 30.0 - step / 100, primary=True),
                ok_row("ptb", "ppl", 50.0 - step / 100, primary=True)]
        if step == 300:
            rows.append(failed_row("openbookqa", "acc_norm", "Traceback: OOM"))
        append_rows(run_dir / "results.jsonl", stamp(rows, run=run_dir.name, step=step, tokens=tokens, source="inline"))
    # the watcher re-evaluated step 200 later: the newer row is the one drawn
    append_rows(run_dir / "results.jsonl", stamp([ok_row("boolq", "acc", 0.9, 0.03, primary=True)],
                                                 run=run_dir.name, step=200, tokens=2_000_000, source="watch"))


def _runs_and_reference(tmp_path, reference_rows=None):
    runs = [tmp_path / "cpt", tmp_path / "cpt-kd"]
    for shift, run in zip((0.0, -0.1), runs):
        run.mkdir()
        _write_run(run, shift)
    reference = tmp_path / "source_eval.json"  # what launch/evaluate.py --output writes for the unpruned model
    write_summary(reference, stamp(reference_rows or [*_zero_shot(0.8, 0.6), ok_row("wikitext2", "ppl", 12.0,
                                                                                    primary=True)],
                                   run="source", step=0, tokens=0, source="evaluate"))
    return runs, reference


def _panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def _dashed(ax) -> list[float]:
    return [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]


def _spans(ax) -> list[tuple[float, float]]:
    """The (low, high) of each horizontal band across the panel (the reference's ±stderr)."""
    return [(patch.get_y(), patch.get_y() + patch.get_height()) for patch in ax.patches]


def _legend(fig) -> list[str]:
    assert len(fig.legends) == 1, fig.legends
    return [text.get_text() for text in fig.legends[0].get_texts()]


def test_mean_row_names_its_members_and_combines_their_stderr():
    members = [ok_row("boolq", "acc", 0.6, 0.03, primary=True), ok_row("piqa", "acc", 0.7, 0.04, primary=True)]
    row = mean_row(members, seconds=2.0)
    assert (row["task"], row["metric"], row["primary"], row["samples"]) == ("zero_shot_mean", "mean", True, 2)
    assert row["value"] == pytest.approx(0.65) and row["stderr"] == pytest.approx(0.025)  # sqrt(.03²+.04²)/2
    assert row["members"] == {"boolq": "acc", "piqa": "acc"}
    members[1]["stderr"] = None
    assert mean_row(members)["stderr"] is None  # a partial sum would understate it


def test_curves_compare_runs_against_the_reference_model(tmp_path):
    runs, reference = _runs_and_reference(tmp_path)
    curves = collect(runs, ["pruned + CPT", "pruned + CPT + KD"])
    assert set(curves.series) == {("boolq", "acc"), ("hellaswag", "acc_norm"), ("zero_shot_mean", "mean"),
                                  ("wikitext2", "ppl"), ("ptb", "ppl")}  # failed and non-reported metrics: not drawn
    assert curves.series[("boolq", "acc")]["pruned + CPT"] == [(1_000_000, 0.51, 0.01), (2_000_000, 0.9, 0.03),
                                                              (3_000_000, 0.53, None)]
    assert curves.mean_members == {(("boolq", "acc"), ("hellaswag", "acc_norm"))}

    fig = curves_figure(runs, ["pruned + CPT", "pruned + CPT + KD"], reference, "source (unpruned)")
    panels = _panels(fig)
    assert list(panels) == ["boolq (acc)", "hellaswag (acc_norm)", "zero_shot_mean (mean)", "wikitext2 (ppl)",
                            "ptb (ppl)"]  # in the order the suite ran them, the mean after its tasks
    # one legend under the panels, none inside them (a panel's legend covered the lines it named)
    assert all(ax.get_legend() is None for ax in panels.values())
    assert _legend(fig) == ["pruned + CPT", "pruned + CPT + KD", "source (unpruned)"]
    assert _dashed(panels["boolq (acc)"]) == [0.8] and _dashed(panels["hellaswag (acc_norm)"]) == [0.6]
    assert _dashed(panels["wikitext2 (ppl)"]) == [12.0] and _dashed(panels["ptb (ppl)"]) == []
    source = json.loads(reference.read_text())
    # the reference's mean over the runs' members is the one its own evaluation wrote (same tasks)
    assert _dashed(panels["zero_shot_mean (mean)"]) == [source["zero_shot_mean"]["mean"]] == [pytest.approx(0.7)]

    # the band of "pruned + CPT" on boolq: value ± stderr at 1M and 2M, none at 3M (no stderr there)
    boolq = panels["boolq (acc)"]
    line, band = boolq.get_lines()[0], boolq.collections[0]
    assert band.get_facecolor()[0][:3] == pytest.approx(matplotlib.colors.to_rgb(line.get_color()))
    assert band.get_alpha() == pytest.approx(0.2)
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    for x, low, high in ((1e6, 0.50, 0.52), (2e6, 0.87, 0.93)):
        at = vertices[vertices[:, 0] == x][:, 1]
        assert (at.min(), at.max()) == (pytest.approx(low), pytest.approx(high))
    assert not (vertices[:, 0] == 3e6).any()
    # the mean's band is the members' stderr combined (sqrt(.01² + .02²) / 2), where both have one
    mean_band = panels["zero_shot_mean (mean)"].collections[0]
    at = np.concatenate([p.vertices for p in mean_band.get_paths()])
    assert np.ptp(at[at[:, 0] == 1e6][:, 1]) == pytest.approx(2 * math.sqrt(0.01**2 + 0.02**2) / 2)
    assert not panels["wikitext2 (ppl)"].collections  # perplexities carry no stderr
    assert fig.get_suptitle() == "shaded: ±1 stderr (lm-eval)"
    # the two runs keep their colours across panels
    assert [ln.get_color() for ln in panels["ptb (ppl)"].get_lines()] == [ln.get_color() for ln in boolq.get_lines()
                                                                          if ln.get_linestyle() != "--"]
    plt.close(fig)


def test_no_reference_mean_when_the_reference_lacks_a_member_task(tmp_path):
    runs, reference = _runs_and_reference(tmp_path, [ok_row("boolq", "acc", 0.8, 0.01, primary=True),
                                                     failed_row("hellaswag", "acc_norm", "Traceback: OOM")])
    fig = curves_figure(runs, reference=reference)
    panels = _panels(fig)
    assert _dashed(panels["boolq (acc)"]) == [0.8]
    assert _dashed(panels["zero_shot_mean (mean)"]) == [] and _dashed(panels["hellaswag (acc_norm)"]) == []
    assert _legend(fig) == ["cpt", "cpt-kd", "source (unpruned)"]
    plt.close(fig)


def test_a_reference_given_as_rows_is_shaded_by_its_stderr(tmp_path):
    """The rows `launch/evaluate.py --results` writes carry each value's stderr: the reference line gets its band,
    and the mean panel the members' stderr combined as mean_row combines them."""
    runs, _ = _runs_and_reference(tmp_path)
    reference = tmp_path / "source_eval.jsonl"
    append_rows(reference, stamp([*_zero_shot(0.7, 0.5), ok_row("wikitext2", "ppl", 12.0, primary=True)],
                                 run="source", step=0, tokens=0, source="evaluate"))
    append_rows(reference, stamp([ok_row("boolq", "acc", 0.8, 0.03, primary=True)],  # evaluated again: newest wins
                                 run="source", step=0, tokens=0, source="evaluate"))
    fig = curves_figure(runs, reference=reference)
    panels = _panels(fig)
    assert _dashed(panels["boolq (acc)"]) == [0.8] and _spans(panels["boolq (acc)"]) == [
        (pytest.approx(0.77), pytest.approx(0.83))]
    mean_se = math.sqrt(0.03**2 + 0.02**2) / 2
    assert _dashed(panels["zero_shot_mean (mean)"]) == [pytest.approx(0.65)]
    assert _spans(panels["zero_shot_mean (mean)"]) == [(pytest.approx(0.65 - mean_se), pytest.approx(0.65 + mean_se))]
    assert _dashed(panels["wikitext2 (ppl)"]) == [12.0] and _spans(panels["wikitext2 (ppl)"]) == []  # no stderr
    assert _legend(fig) == ["cpt", "cpt-kd", "source (unpruned)"]
    plt.close(fig)


def test_a_reference_far_below_a_log_perplexity_axis_is_drawn_inside_it(tmp_path):
    """A severely pruned model's perplexity (15,000 -> 2,000) goes on a log axis; the unpruned reference at 50 must
    widen it in decades, not by a linear margin that fell below zero and left the panel empty."""
    run = tmp_path / "cpt"
    for tokens, ppl in ((0, 15_000.0), (10_000, 4_000.0), (20_000, 2_000.0)):
        append_rows(run / "results.jsonl", stamp([ok_row("wikitext2", "ppl", ppl, primary=True)], run="cpt",
                                                 step=tokens // 1000, tokens=tokens, source="inline"))
    reference = tmp_path / "source.jsonl"
    append_rows(reference, stamp([ok_row("wikitext2", "ppl", 50.0, primary=True)], run="source", step=0, tokens=0,
                                 source="evaluate"))
    fig = curves_figure([run], reference=reference)
    ax = _panels(fig)["wikitext2 (ppl)"]
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log" and 0 < low < 50 and high > 15_000 and _dashed(ax) == [50.0]
    plt.close(fig)


def test_a_validation_curve_spanning_the_change_to_spread_sequences_is_named(tmp_path, caplog):
    """A run resumed across the change that spread a limit's validation sequences has losses on two sets of text in
    one curve: collect says which points are which instead of drawing the step as the model's."""
    from shortened.eval.validation import loss_row

    run = tmp_path / "kd"
    first = ok_row("validation", "loss", 5.5, primary=True, samples=50)  # written before the mark existed
    for tokens, row in ((0, first), (51_200, first), (102_400, loss_row("validation", 5.6, samples=50)),
                        (102_400, ok_row("wikitext2", "ppl", 900.0, primary=True))):
        append_rows(run / "results.jsonl", stamp([row], run="kd", step=tokens // 2048, tokens=tokens, source="inline"))
    with caplog.at_level("WARNING", logger="shortened.eval.curves"):
        collect([run])
    [record] = caplog.records
    assert str(run / "results.jsonl") in record.getMessage()
    assert "first sequences at 0-51,200 tokens; spread sequences at 102,400-102,400 tokens" in record.getMessage()
    # the same spans for the bench's report, from every row; a failed evaluation (no loss, no mark) is no set of text
    append_rows(run / "results.jsonl", stamp([failed_row("validation", "loss", "Traceback: OOM")], run="kd", step=60,
                                             tokens=122_880, source="inline"))
    assert mixed_validation_sequences(read_results(run / "results.jsonl")) == {
        "validation": "first sequences at 0-51,200 tokens; spread sequences at 102,400-102,400 tokens"}

    caplog.clear()
    clean = tmp_path / "cpt"
    for tokens in (0, 51_200):
        append_rows(clean / "results.jsonl", stamp([loss_row("validation", 5.5, samples=50)], run="cpt",
                                                   step=tokens // 2048, tokens=tokens, source="inline"))
    with caplog.at_level("WARNING", logger="shortened.eval.curves"):
        collect([clean])
    assert not caplog.records


def test_plot_curves_cli(tmp_path):
    runs, reference = _runs_and_reference(tmp_path)
    out = warm_start.run([ROOT / "launch/plot_curves.py", *runs, "--output", tmp_path / "curves.png",
                          "--reference", reference, "--label", "pruned + CPT", "--label", "pruned + CPT + KD"],
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "curves.png")
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.shape[0] > 300 and image.shape[1] > 1000  # 5 panels in a 4-wide grid: two rows


@pytest.mark.parametrize("argv, fragment", [
    (["{run}", "--reference", "missing.json"], "missing.json: no such reference file; write it with "
                                               "`launch/evaluate.py"),
    (["{run}", "--reference", "list.json"], "list.json: not the {task: {metric: value}} JSON"),
    (["{run}", "--reference", "torn.json"], "torn.json: cannot read the reference as JSON"),
    (["{run}", "--reference", "failed.jsonl"], "failed.jsonl: no ok rows of `launch/evaluate.py --results`"),
    (["{run}", "{run}", "--label", "only one"], "1 label(s) for 2 run director(ies)"),
    (["{run}", "{run}"], "run label(s) cpt given to more than one run"),
    (["{run}", "{run}", "--label", "a", "--label", "b", "--label", "c"], "3 label(s) for 2 run director(ies)"),
])
def test_plot_curves_bad_input(argv, fragment, tmp_path, monkeypatch, capsys):
    runs, _ = _runs_and_reference(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "torn.json").write_text('{"boolq": {"acc"')
    append_rows(tmp_path / "failed.jsonl", stamp([failed_row("boolq", "acc", "Traceback: OOM")], run="source", step=0,
                                                 tokens=0, source="evaluate"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "launch/plot_curves.py"),
                                      *(arg.format(run=runs[0]) for arg in argv)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "launch/plot_curves.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and fragment in err, err
    assert not (tmp_path / "curves.png").exists()


def test_paper_table_and_summary():
    rows = [ok_row("boolq", "acc", 0.625, primary=True), ok_row("piqa", "acc_norm", 0.7, primary=False),
            ok_row("piqa", "acc", 0.71, primary=True), ok_row("wikitext2", "ppl", 17.456, primary=True),
            failed_row("ptb", "ppl", "Traceback ...\nMirrorError: no ptb"),
            ok_row("zero_shot_mean", "mean", 0.6675, primary=True), ok_row("validation", "loss", 2.34567, primary=True)]
    head, values, failure = paper_table(rows).splitlines()
    assert head.split() == ["boolq(acc)", "piqa(acc)", "zero_shot_mean(mean)", "wikitext2(ppl)", "ptb(ppl)",
                            "validation(loss)"]
    assert values.split() == ["62.50", "71.00", "66.75", "17.46", "FAILED", "2.3457"]  # a loss is not a fraction
    assert failure == "FAILED ptb: MirrorError: no ptb"
    assert summary(rows)["piqa"] == {"acc_norm": 0.7, "acc": 0.71} and summary(rows)["ptb"] == {"ppl": None}


def test_evaluate_cli(tmp_path):
    model_dir = save_with_tokenizer(build_tiny_llama(seed=2, num_layers=2), tmp_path / "model", TOKENIZER_MODEL)
    out = warm_start.run([ROOT / "launch/evaluate.py", "--model", model_dir, "--tasks", "piqa,arc_challenge,wikitext2",
                          "--data-dir", EVAL_DATA, "--limit", "4", "--output", tmp_path / "res.json"],
                         env=subprocess_env(), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "piqa(acc)  arc_challenge(acc_norm)  zero_shot_mean(mean)  wikitext2(ppl)" in out.stdout
    result = json.loads((tmp_path / "res.json").read_text())
    assert set(result) == {"piqa", "arc_challenge", "wikitext2", "zero_shot_mean"}
    assert set(result["piqa"]) == {"acc", "acc_norm"} and result["wikitext2"]["ppl"] > 1
    mean = (result["piqa"]["acc"] + result["arc_challenge"]["acc_norm"]) / 2
    assert result["zero_shot_mean"]["mean"] == pytest.approx(mean)


def test_model_id_not_in_the_local_cache_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelDirError, match="huggingface-cli download lmsys/vicuna-7b-v1.3"):
        resolve_model_dir("lmsys/vicuna-7b-v1.3", "--model")
