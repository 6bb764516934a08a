"""LoRA retraining of a (pruned) model on instruction data (Alpaca records or conversations); resumes from its
last checkpoint when re-run.

    python launch/lora.py --model DIR --data alpaca.json --out DIR

Defaults are the Shortened LLaMA v1 recipe: r=8, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down, 2 epochs,
lr 1e-4, batch 64 (micro 4 x grad-accum 16), cutoff 256 tokens. The merged fp16 model is written to OUT/merged.
"""
from __future__ import annotations

import argparse
import sys

from shortened import cli
from shortened.config import ConfigError, LoraTrainConfig
from shortened.prune.errors import PruneInputError
from shortened.tokenizer import TokenizerNotFound, TokenizerUnreadable

BAD_INPUT = (ConfigError, PruneInputError, TokenizerNotFound, TokenizerUnreadable)


def parse_args(argv: list[str]) -> LoraTrainConfig:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_dataclass_arguments(parser, LoraTrainConfig)
    args = parser.parse_args(argv)
    return cli.config_from_args(args, LoraTrainConfig)


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    from shortened.prune.lora import train_lora  # after parsing: --help and usage errors need no torch

    print(f"merged model: {train_lora(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:]), BAD_INPUT))
