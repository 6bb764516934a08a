"""Evaluate one model: zero-shot tasks (lm-eval), perplexities; prints the paper-style table, writes JSON.

    python launch/evaluate.py --model DIR|ID --data-dir DIR \
        --tasks boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,wikitext2,ptb [--output FILE.json]
"""
from __future__ import annotations

import argparse
import logging
import sys

from shortened import cli
from shortened.config import ConfigError, EvalConfig, load_config
from shortened.eval.mirror import MirrorError
from shortened.eval.single import evaluate_model
from shortened.eval.suite import ModelFileError
from shortened.eval.watch import WatchError

BAD_INPUT = (ConfigError, MirrorError, ModelFileError, WatchError)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory, or a hub id in the local cache")
    parser.add_argument("--tasks", help="comma-separated task names (default: eval.tasks)")
    parser.add_argument("--data-dir", help="the evaluation mirror (see launch/prepare_eval_data.py)")
    parser.add_argument("--output", help="write {task: {metric: value}} here")
    parser.add_argument("--limit", type=int, help="rows per task / windows per perplexity set (smoke tests)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--task-file", help="task table (default shortened/eval/tasks.yaml)")
    parser.add_argument("--config", help="YAML of eval settings (the keys of EvalConfig)")
    parser.add_argument("--validation-shards", default="", help="held-out token shards: adds the validation loss")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, ...")
    args = parser.parse_args(argv)
    overrides = [f"{key}={value}" for key, value in (
        ("tasks", f"[{args.tasks}]" if args.tasks else None), ("data_dir", args.data_dir), ("limit", args.limit),
        ("batch_size", args.batch_size), ("task_file", args.task_file)) if value is not None]
    config = load_config(EvalConfig, args.config, overrides)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = evaluate_model(args.model, config, args.device, args.dtype, args.output, args.validation_shards)
    return 1 if any(row["status"] != "ok" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(cli.run(main, BAD_INPUT))
