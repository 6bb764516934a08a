"""Evaluate one model (a directory or a hub id already in the local cache): `launch/evaluate.py`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shortened.config import EvalConfig
from shortened.eval.mirror import check_mirror
from shortened.eval.report import paper_table, write_summary
from shortened.eval.results import stamp
from shortened.eval.suite import EvalSuite
from shortened.fsutil import atomic_write_text
from shortened.model_dir import resolve_model_dir


def evaluate_model(model_ref: str, config: EvalConfig, device: str | None = None, dtype: str = "auto",
                   output: str | Path | None = None, validation_path: str = "",
                   results: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the suite on one model, print the paper-style table, write `{task: {metric: value}}` to `output` and
    the rows themselves (with each value's stderr and sample count) to `results`, in results.jsonl's format."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(model_ref, "--model")
    # Bad task names and a missing mirror fail now, before the model is loaded.
    suite = EvalSuite(config, model_dir, validation_path=validation_path)
    check_mirror(config.data_dir, suite.specs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)  # transformers' .to() is mistyped
    model = model.to(device)
    rows = stamp(suite.run(model), run=str(model_ref), step=0, tokens=0, source="evaluate")
    print(paper_table(rows))
    if output:
        write_summary(output, rows)
    if results:
        atomic_write_text("".join(json.dumps(row) + "\n" for row in rows), Path(results))
    return rows
