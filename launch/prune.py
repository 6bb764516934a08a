"""Depth-prune a Llama-layout Hugging Face model: score blocks, remove the least important, save model + report.

    python launch/prune.py --model DIR --criterion ppl --ratio 0.2 --calib FILE --out DIR

See docs/pruning.md for the criteria, the ratio -> block-count rule and the calibration protocol.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from shortened.prune import cli
from shortened.prune.pruner import prune


def parse_args(argv: list[str]) -> dict:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory (or a cached hub id)")
    parser.add_argument("--out", required=True, help="output directory for the pruned model and prune_report.json "
                        "(new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model directory --out names")
    parser.add_argument("--criterion", choices=["ppl", "taylor", "magnitude", "bi", "angular"], default="ppl")
    size = parser.add_mutually_exclusive_group(required=True)
    # default None, not 0: argparse counts a flag given its default as not given ("--remove 0" would be "missing").
    size.add_argument("--remove", type=int, help="number of blocks to remove")
    size.add_argument("--ratio", type=float, help="fraction of all parameters to remove")
    size.add_argument("--keep-blocks", type=int, help="number of blocks to keep")
    parser.add_argument("--calib", required=True, help=".txt/.jsonl/.jsonl.zst file or directory, or token shards")
    parser.add_argument("--calib-field", default="text", help="JSON field with the text (jsonl input)")
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--protect-first", type=int, default=4, help="never remove the first N blocks")
    parser.add_argument("--protect-last", type=int, default=2, help="never remove the last N blocks")
    parser.add_argument("--no-protect", action="store_true", help="same as --protect-first 0 --protect-last 0")
    parser.add_argument("--iterative", action="store_true", help="remove one block, re-score, repeat")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model or directory if the model has none")
    args = vars(parser.parse_args(argv))
    if args.pop("no_protect"):
        args["protect_first"] = args["protect_last"] = 0
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    overwrite = args.pop("overwrite")
    config = cli.prune_config(args)
    report = prune(config, command=shlex.join([sys.executable, *sys.argv]), overwrite=overwrite)
    summary = {k: report[k] for k in ("removed_blocks", "num_blocks_after", "params_after",
                                      "calib_ppl_before", "calib_ppl_after")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:])))
