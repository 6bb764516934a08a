"""bench/efficiency.py on CPU: a tiny trained Llama against itself pruned, each measured in its own process."""
from __future__ import annotations

import importlib.util
import json

from shortened.config import PruneConfig, from_dict
from shortened.prune.pruner import prune

from conftest import ROOT
from prune_fixtures import CALIB, CALIB_LEN, CALIB_SAMPLES, NUM_LAYERS


def load_bench():
    spec = importlib.util.spec_from_file_location("efficiency", ROOT / "bench" / "efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficiency_bench_measures_original_and_pruned(model_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    prune(from_dict(PruneConfig, dict(model=str(model_dir), out=str(pruned), calib=str(CALIB), remove=2,
                                      criterion="magnitude", protect_first=0, protect_last=0,
                                      calib_samples=CALIB_SAMPLES, calib_len=CALIB_LEN)))
    out = tmp_path / "eff.json"
    argv = ["--model", str(model_dir), "--model", str(pruned), "--batch-sizes", "1", "3", "--output-lens", "5",
            "--prompt-len", "7", "--json", str(out)]
    assert load_bench().main(argv) == 0
    assert "speedup" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    layers = NUM_LAYERS - 2
    assert sorted((r["layers"], r["batch"]) for r in records) == [(layers, 1), (layers, 3), (NUM_LAYERS, 1),
                                                                   (NUM_LAYERS, 3)]
    for r in records:
        assert r["status"] == "ok" and r["output_len"] == 5 and r["memory_kind"] == "process_peak_rss"
        assert abs(r["tokens_per_s"] - r["batch"] * 5 / r["latency_s"]) < 1e-6 and r["peak_mem_gib"] > 0
    params = {r["layers"]: r["params"] for r in records}
    assert params[layers] < params[NUM_LAYERS]


def test_efficiency_bench_needs_two_models(capsys):
    assert load_bench().main(["--model", "only-one"]) == 2
    assert "at least two --model" in capsys.readouterr().err
