"""Evaluate one model (a directory or a hub id already in the local cache): `launch/evaluate.py`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shortened.config import EvalConfig
from shortened.eval.mirror import check_mirror
from shortened.eval.report import paper_table, write_summary
from shortened.eval.results import stamp
from shortened.eval.suite import EvalSuite, ModelFileError


def resolve_model_dir(ref: str) -> Path:
    """A model directory, or the local Hugging Face cache's copy of a hub id (never downloaded here)."""
    if Path(ref).is_dir():
        if not (Path(ref) / "config.json").is_file():
            raise ModelFileError(f"--model {ref}: {Path(ref) / 'config.json'} is missing, so this is not a Hugging "
                                 "Face model directory; pass the directory save_pretrained wrote")
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as err:
        raise ModelFileError(
            f"--model {ref}: not a directory, and not in the local Hugging Face cache ({type(err).__name__}); "
            f"where a network exists run `huggingface-cli download {ref}` first, or pass the model's directory"
        ) from None


def evaluate_model(model_ref: str, config: EvalConfig, device: str | None = None, dtype: str = "auto",
                   output: str | Path | None = None, validation_path: str = "") -> list[dict[str, Any]]:
    """Run the suite on one model, print the paper-style table, write `{task: {metric: value}}` to `output`."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(model_ref)
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
    return rows
