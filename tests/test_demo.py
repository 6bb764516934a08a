"""`make demo` in its quick variant: every real command end to end, then a second run that resumes; the summary
table with the CPT => LoRA column (`--cpt-lora`, whose chain tests/test_lora.py runs end to end) and its data."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from types import ModuleType

import pytest

from shortened.prune.instruct import read_alpaca

from conftest import EVAL_DATA, ROOT, subprocess_env

pytestmark = pytest.mark.timeout(900)


def run_demo(out) -> tuple[str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--quick", "--out", str(out)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=800)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout, time.monotonic() - started


def test_quick_demo_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "demo"
    first, first_seconds = run_demo(out)
    assert (out / "curves.png").stat().st_size > 10_000
    for artifact in ("shards/train/manifest.json", "source/config.json", "pruned/prune_report.json",
                     "cpt/train_log.jsonl", "cpt/results.jsonl", "cpt_kd/train_log.jsonl", "cpt_kd/results.jsonl"):
        assert (out / artifact).is_file(), artifact
    assert "a small model pretrained briefly" in first
    assert "pruned + CPT + KD" in first and str(out / "curves.png") in first

    for run in ("cpt", "cpt_kd"):
        rows = [json.loads(line) for line in (out / run / "results.jsonl").read_text().splitlines()]
        validation = sorted((r["step"], r["value"]) for r in rows if r["task"] == "validation" and r["status"] == "ok")
        assert validation[0][0] == 0 and len(validation) >= 3
        assert validation[-1][1] < validation[0][1], (run, validation)  # training lowers the validation loss
    plain, distilled = ([json.loads(line) for line in (out / run / "train_log.jsonl").read_text().splitlines()]
                        for run in ("cpt", "cpt_kd"))
    assert [r["tokens"] for r in plain] == [r["tokens"] for r in distilled]  # the same budget
    assert all(r["kd_loss"] is None for r in plain) and all(r["kd_loss"] > 0 for r in distilled)
    report = json.loads((out / "pruned" / "prune_report.json").read_text())
    assert report["criterion"] == "ppl" and len(report["removed_blocks"]) == 1

    logs_before = [(out / run / "train_log.jsonl").read_text() for run in ("cpt", "cpt_kd")]
    second, second_seconds = run_demo(out)
    assert second.count("already complete") == 2  # the shards (data prep's own check)
    assert second.count("already done") == 7  # the other steps but the plot; no DeepSpeed job is started
    assert "nothing to train" not in second and "DeepSpeed ZeRO-2" in second
    assert [(out / run / "train_log.jsonl").read_text() for run in ("cpt", "cpt_kd")] == logs_before
    assert second_seconds < first_seconds


@pytest.fixture
def demo(monkeypatch) -> ModuleType:
    """launch/demo.py as a module; its dataclasses need it in sys.modules while it loads."""
    spec = importlib.util.spec_from_file_location("demo_under_test", ROOT / "launch" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_summary_table_shows_the_cpt_then_lora_model_beside_the_runs(demo, tmp_path, capsys):
    """Each zero-shot figure with its stderr, from the runs' results.jsonl and from `evaluate.py --results` rows (the
    source and the CPT => LoRA model); a perplexity has none; the metric not reported (acc_norm) stays out."""
    def rows(piqa: tuple[float, float], ppl: float, **extra) -> list[dict]:
        return [{"task": "piqa", "metric": "acc", "value": piqa[0], "stderr": piqa[1], "status": "ok", "primary": True,
                 **extra},
                {"task": "piqa", "metric": "acc_norm", "value": 0.2, "stderr": 0.01, "status": "ok", "primary": False,
                 **extra},
                {"task": "wikitext2", "metric": "ppl", "value": ppl, "stderr": None, "status": "ok", "primary": True,
                 **extra}]

    def write(path, lines: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    runs = {"pruned + CPT": tmp_path / "cpt", "pruned + CPT + KD": tmp_path / "cpt_kd"}
    for offset, run in enumerate(runs.values()):
        run.mkdir()
        write(run / "results.jsonl", [row for step in (0, 16) for row in rows(
            (0.5 + step / 100 + offset / 10, 0.08 - step / 1000), 900.0 + step / 100 + offset / 10, step=step)])
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "prune_report.json").write_text(json.dumps({"removed_blocks": [2]}))
    source_rows, tuned_rows = tmp_path / "source_eval.jsonl", tmp_path / "cpt_lora_eval.jsonl"
    write(source_rows, rows((0.61, 0.0487), 800.0))
    write(tuned_rows, rows((0.7, 0.0458), 700.5) + [{"task": "piqa", "metric": "acc", "value": None, "stderr": None,
                                                     "status": "failed", "primary": True}])
    merged = tmp_path / "cpt_lora" / "merged"
    demo.print_summary(tmp_path, tmp_path / "source", tmp_path / "pruned", runs, source_rows, demo.QUICK,
                       {"pruned + CPT + LoRA (4 steps)": (merged, tuned_rows)})
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("task"))
    assert re.split(r"\s{2,}", header.strip()) == ["task", "metric", "source (4 blocks)", "pruned (3)",
                                                   "pruned + CPT (16 steps)", "pruned + CPT + KD (16 steps)",
                                                   "pruned + CPT + LoRA (4 steps)"]
    table = {line.split()[0]: re.split(r"\s{2,}", line.strip())[2:] for line in lines
             if line.split()[:1] in (["piqa"], ["wikitext2"])}
    assert table == {"piqa": ["0.6100 ± 0.0487", "0.5000 ± 0.0800", "0.6600 ± 0.0640", "0.7600 ± 0.0640",
                              "0.7000 ± 0.0458"],
                     "wikitext2": ["800.0000", "900.0000", "900.1600", "900.2600", "700.5000"]}
    assert any("stderr" in line and "8 rows per task" in line for line in lines)
    assert any(str(merged) in line for line in lines) and any(str(tuned_rows) in line for line in lines)


def test_the_cpt_then_lora_conversations_are_rows_the_evaluation_does_not_read(demo, tmp_path):
    chats = tmp_path / "chats.jsonl"
    demo.write_conversations(chats, 10, skip=8)
    records = read_alpaca(chats)  # the conversation checks of launch/lora.py
    assert len(records) == 10
    scored = [json.loads(line) for task in ("boolq", "piqa")
              for line in (EVAL_DATA / task / "validation.jsonl").read_text().splitlines()[:8]]
    asked = {r["conversations"][0]["value"] for r in records}
    assert not any(row.get("goal", row.get("question")) in question for row in scored for question in asked)
