"""`make demo` in its quick variant: every real command end to end, then a second run that resumes; the summary
table with the CPT => LoRA column (`--cpt-lora`, whose chain tests/test_lora.py runs end to end) and its data."""
from __future__ import annotations

import importlib.util
import json
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
    runs = {"pruned + CPT": tmp_path / "cpt", "pruned + CPT + KD": tmp_path / "cpt_kd"}
    for offset, run in enumerate(runs.values()):
        run.mkdir()
        rows = [{"step": step, "task": task, "metric": metric, "value": value + step / 100 + offset / 10,
                 "status": "ok"} for step in (0, 16) for task, metric, value in (("piqa", "acc", 0.5),
                                                                                  ("wikitext2", "ppl", 900.0))]
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "prune_report.json").write_text(json.dumps({"removed_blocks": [2]}))
    source_eval, tuned_eval = tmp_path / "source_eval.json", tmp_path / "cpt_lora_eval.json"
    source_eval.write_text(json.dumps({"piqa": {"acc": 0.61, "acc_norm": 0.6}, "wikitext2": {"ppl": 800.0}}))
    tuned_eval.write_text(json.dumps({"piqa": {"acc": 0.7, "acc_norm": 0.2}, "wikitext2": {"ppl": 700.5}}))
    merged = tmp_path / "cpt_lora" / "merged"
    demo.print_summary(tmp_path, tmp_path / "source", tmp_path / "pruned", runs, source_eval, demo.QUICK,
                       {"pruned + CPT + LoRA (4 steps)": (merged, tuned_eval)})
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("task"))
    assert header.split()[-6:] == ["+", "CPT", "+", "LoRA", "(4", "steps)"]
    table = {line.split()[0]: line.split()[2:] for line in lines if line.split()[:1] in (["piqa"], ["wikitext2"])}
    assert table == {"piqa": ["0.6100", "0.5000", "0.6600", "0.7600", "0.7000"],
                     "wikitext2": ["800.0000", "900.0000", "900.1600", "900.2600", "700.5000"]}
    assert any(str(merged) in line for line in lines) and any(str(tuned_eval) in line for line in lines)


def test_the_cpt_then_lora_conversations_are_rows_the_evaluation_does_not_read(demo, tmp_path):
    chats = tmp_path / "chats.jsonl"
    demo.write_conversations(chats, 10, skip=8)
    records = read_alpaca(chats)  # the conversation checks of launch/lora.py
    assert len(records) == 10
    scored = [json.loads(line) for task in ("boolq", "piqa")
              for line in (EVAL_DATA / task / "validation.jsonl").read_text().splitlines()[:8]]
    asked = {r["conversations"][0]["value"] for r in records}
    assert not any(row.get("goal", row.get("question")) in question for row in scored for question in asked)
