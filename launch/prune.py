"""Depth-prune a Llama-layout Hugging Face model: score blocks, remove the least important, save model + report.

    python launch/prune.py --model DIR --criterion ppl --ratio 0.2 --calib FILE --out DIR

See docs/pruning.md for the criteria, the ratio -> block-count rule and the calibration protocol.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from shortened import cli
from shortened.config import ConfigError, PruneConfig
from shortened.prune.errors import PruneInputError
from shortened.tokenizer import TokenizerNotFound, TokenizerUnreadable

BAD_INPUT = (ConfigError, PruneInputError, TokenizerNotFound, TokenizerUnreadable)


def parse_args(argv: list[str]) -> tuple[PruneConfig, bool]:
    """The config and whether --overwrite was given."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_dataclass_arguments(parser, PruneConfig)
    parser.add_argument("--overwrite", action="store_true", help="replace the model directory --out names")
    parser.add_argument("--no-protect", action="store_true", help="same as --protect-first 0 --protect-last 0")
    args = parser.parse_args(argv)
    if args.no_protect:
        args.protect_first = args.protect_last = 0
    return cli.config_from_args(args, PruneConfig), args.overwrite


def main(argv: list[str]) -> int:
    config, overwrite = parse_args(argv)
    from shortened.prune.pruner import prune  # after parsing: --help and usage errors need no torch

    report = prune(config, command=shlex.join([sys.executable, *sys.argv]), overwrite=overwrite)
    summary = {k: report[k] for k in ("removed_blocks", "num_blocks_after", "params_after",
                                      "calib_ppl_before", "calib_ppl_after")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:]), BAD_INPUT))
