"""LoRA retraining of a (pruned) model on Alpaca-format data; resumes from its last checkpoint when re-run.

    python launch/lora.py --model DIR --data alpaca.json --out DIR

Defaults are the Shortened LLaMA v1 recipe: r=8, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down, 2 epochs,
lr 1e-4, batch 64 (micro 4 x grad-accum 16), cutoff 256 tokens. The merged fp16 model is written to OUT/merged.
"""
from __future__ import annotations

import argparse
import sys

from shortened.config import LoraTrainConfig, from_dict
from shortened.prune import cli
from shortened.prune.lora import train_lora


def parse_args(argv: list[str]) -> dict:
    defaults = LoraTrainConfig.__dataclass_fields__
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory (the pruned model)")
    parser.add_argument("--data", required=True, help="Alpaca-format .json list or .jsonl")
    parser.add_argument("--out", required=True, help="run directory; re-running with it resumes")
    for name, kind in (("r", int), ("alpha", int), ("dropout", float), ("epochs", int), ("lr", float),
                       ("micro_batch_size", int), ("grad_accum", int), ("cutoff_len", int), ("warmup_steps", int),
                       ("max_grad_norm", float), ("seed", int), ("save_every_steps", int), ("keep_last", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name].default)
    parser.add_argument("--target-modules", nargs="+", default=None, help="module names that get LoRA adapters")
    parser.add_argument("--train-on-inputs", action="store_true", help="also train on the prompt tokens")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model or directory if the model has none")
    args = vars(parser.parse_args(argv))
    if args["target_modules"] is None:
        del args["target_modules"]
    return args


def main(argv: list[str]) -> int:
    config = from_dict(LoraTrainConfig, parse_args(argv), source="command line")
    print(f"merged model: {train_lora(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:])))
