"""bench/efficiency.py end to end on CPU: a tiny Llama against itself pruned by launch/prune.py."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, subprocess_env


def test_efficiency_bench_measures_original_and_pruned(tmp_path):
    out = tmp_path / "eff.json"
    cmd = [sys.executable, str(ROOT / "bench" / "efficiency.py"), "--tiny-pair", "--tiny-layers", "4",
           "--tiny-hidden", "64", "--tiny-remove", "2", "--batch-sizes", "1", "3", "--output-lens", "5",
           "--prompt-len", "7", "--json", str(out)]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speedup" in result.stdout and "tiny-2L" in result.stdout
    records = json.loads(out.read_text())["records"]
    assert sorted((r["layers"], r["batch"]) for r in records) == [(2, 1), (2, 3), (4, 1), (4, 3)]
    for r in records:
        assert r["status"] == "ok" and r["output_len"] == 5 and r["memory_kind"] == "process_peak_rss"
        assert abs(r["tokens_per_s"] - r["batch"] * 5 / r["latency_s"]) < 1e-6 and r["peak_mem_gib"] > 0
    params = {r["layers"]: r["params"] for r in records}
    assert params[2] < params[4]
