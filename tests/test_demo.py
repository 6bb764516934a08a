"""`make demo` in its quick variant: every real command end to end, then a second run that resumes."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, subprocess_env

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
