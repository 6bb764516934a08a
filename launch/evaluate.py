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


# The eval settings a one-model evaluation takes as flags; the rest of EvalConfig is about when to evaluate.
EVAL_FLAGS = ("tasks", "data_dir", "limit", "batch_size", "task_file", "ppl_seq_len")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, EvalConfig]:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory, or a hub id in the local cache")
    parser.add_argument("--config", help="YAML of eval settings (the keys of EvalConfig); the flags below override it")
    cli.add_dataclass_arguments(parser, EvalConfig, only=EVAL_FLAGS, overrides=True)
    parser.add_argument("--output", help="write {task: {metric: value}} here")
    parser.add_argument("--results", help="write the rows here, one JSON line each as in results.jsonl: value, "
                                          "stderr, samples, primary metric")
    parser.add_argument("--validation-shards", default="", help="held-out token shards: adds the validation loss")
    cli.add_device_arguments(parser)
    args = parser.parse_args(argv)
    return args, load_config(EvalConfig, args.config, cli.given_arguments(args, EVAL_FLAGS))


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = evaluate_model(args.model, config, args.device, args.dtype, args.output, args.validation_shards,
                          args.results)
    return 1 if any(row["status"] != "ok" for row in rows) else 0

if __name__ == "__main__":
    sys.exit(cli.run(main, BAD_INPUT))
