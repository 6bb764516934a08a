"""results.jsonl I/O, curves.png from several runs, and the one-model CLI (launch/evaluate.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import pytest

from shortened.eval.curves import collect
from shortened.eval.report import paper_table, summary
from shortened.eval.results import append_rows, failed_row, ok_row, read_results, stamp
from shortened.eval.single import resolve_model_dir
from shortened.modeling import build_tiny_llama, save_with_tokenizer

from conftest import EVAL_DATA, ROOT, TOKENIZER_MODEL, subprocess_env


def test_a_torn_line_costs_only_itself(tmp_path):
    path = tmp_path / "results.jsonl"
    append_rows(path, stamp([ok_row("piqa", "acc", 0.5, primary=True)], run="r", step=1, tokens=10, source="watch"))
    with open(path, "a") as handle:
        handle.write('{"run": "r", "step": 2, "tok')  # a writer killed mid-line (not by append_rows)
    append_rows(path, stamp([ok_row("piqa", "acc", 0.6, primary=True)], run="r", step=3, tokens=30, source="watch"))
    assert [(r["step"], r["value"]) for r in read_results(path)] == [(1, 0.5), (3, 0.6)]


def _write_run(run_dir, shift: float) -> None:
    for step, tokens in ((100, 1_000_000), (200, 2_000_000), (300, 3_000_000)):
        rows = [ok_row("boolq", "acc", 0.5 + shift + step / 1e4, 0.01, primary=True),
                ok_row("hellaswag", "acc", 0.3, primary=False),
                ok_row("hellaswag", "acc_norm", 0.35 + shift, primary=True),
                ok_row("zero_shot_mean", "mean", 0.4 + shift, primary=True),
                ok_row("wikitext2", "ppl", 30.0 - step / 100, primary=True),
                ok_row("ptb", "ppl", 50.0 - step / 100, primary=True)]
        if step == 300:
            rows.append(failed_row("openbookqa", "acc_norm", "Traceback: OOM"))
        append_rows(run_dir / "results.jsonl", stamp(rows, run=run_dir.name, step=step, tokens=tokens, source="inline"))
    # the watcher re-evaluated step 200 later: the newer row is the one drawn
    append_rows(run_dir / "results.jsonl", stamp([ok_row("boolq", "acc", 0.9, primary=True)], run=run_dir.name,
                                                 step=200, tokens=2_000_000, source="watch"))


def test_curves_png_from_several_checkpoints_and_runs(tmp_path):
    runs = [tmp_path / "ratio20", tmp_path / "ratio35"]
    for shift, run in zip((0.0, -0.1), runs):
        run.mkdir()
        _write_run(run, shift)
    series = collect(runs)
    assert set(series) == {"boolq (acc)", "hellaswag (acc_norm)", "zero_shot_mean (mean)", "wikitext2 (ppl)",
                           "ptb (ppl)"}  # failed and non-reported metrics are not drawn
    assert series["boolq (acc)"]["ratio20"] == [(1_000_000, 0.51), (2_000_000, 0.9), (3_000_000, 0.53)]
    assert set(series["wikitext2 (ppl)"]) == {"ratio20", "ratio35"}

    out = subprocess.run([sys.executable, str(ROOT / "launch/plot_curves.py"), *map(str, runs),
                          "--output", str(tmp_path / "curves.png")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.shape[0] > 300 and image.shape[1] > 1000  # 5 panels in a 4-wide grid: two rows


def test_paper_table_and_summary():
    rows = [ok_row("boolq", "acc", 0.625, primary=True), ok_row("piqa", "acc_norm", 0.7, primary=False),
            ok_row("piqa", "acc", 0.71, primary=True), ok_row("wikitext2", "ppl", 17.456, primary=True),
            failed_row("ptb", "ppl", "Traceback ...\nMirrorError: no ptb"),
            ok_row("zero_shot_mean", "mean", 0.6675, primary=True)]
    head, values, failure = paper_table(rows).splitlines()
    assert head.split() == ["boolq(acc)", "piqa(acc)", "zero_shot_mean(mean)", "wikitext2(ppl)", "ptb(ppl)"]
    assert values.split() == ["62.50", "71.00", "66.75", "17.46", "FAILED"]
    assert failure == "FAILED ptb: MirrorError: no ptb"
    assert summary(rows)["piqa"] == {"acc_norm": 0.7, "acc": 0.71} and summary(rows)["ptb"] == {"ppl": None}


def test_evaluate_cli(tmp_path):
    model_dir = save_with_tokenizer(build_tiny_llama(seed=2, num_layers=2), tmp_path / "model", TOKENIZER_MODEL)
    out = subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), "--model", str(model_dir),
                          "--tasks", "piqa,arc_challenge,wikitext2", "--data-dir", str(EVAL_DATA), "--limit", "4",
                          "--output", str(tmp_path / "res.json")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "piqa(acc)  arc_challenge(acc_norm)  zero_shot_mean(mean)  wikitext2(ppl)" in out.stdout
    result = json.loads((tmp_path / "res.json").read_text())
    assert set(result) == {"piqa", "arc_challenge", "wikitext2", "zero_shot_mean"}
    assert set(result["piqa"]) == {"acc", "acc_norm"} and result["wikitext2"]["ppl"] > 1
    mean = (result["piqa"]["acc"] + result["arc_challenge"]["acc_norm"]) / 2
    assert result["zero_shot_mean"]["mean"] == pytest.approx(mean)


def test_model_id_not_in_the_local_cache_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download lmsys/vicuna-7b-v1.3"):
        resolve_model_dir("lmsys/vicuna-7b-v1.3")
