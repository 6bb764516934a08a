"""Prepare SlimPajama (or any jsonl / jsonl.zst corpus) as packed token shards.

    python data_prep/slimpajama.py --input DIR --tokenizer PATH --output DIR --seq-len 2048 --workers N
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened import cli  # noqa: E402
from shortened.config import ConfigError, PrepareConfig  # noqa: E402
from shortened.data.prepare import BadInputError, prepare_shards  # noqa: E402
from shortened.data.shards import ShardFormatError  # noqa: E402
from shortened.data.sources import InputError  # noqa: E402
from shortened.tokenizer import TokenizerNotFound, TokenizerUnreadable  # noqa: E402

BAD_INPUT = (InputError, TokenizerNotFound, TokenizerUnreadable, ConfigError, ShardFormatError)


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_dataclass_arguments(parser, PrepareConfig)
    args = parser.parse_args(argv)
    return cli.config_from_args(args, PrepareConfig)


def prepare(argv: list[str] | None) -> int:
    try:
        prepare_shards(parse_args(argv))
    except OSError as err:  # a full disk, an unreadable input file: the path and the reason say what to fix
        raise InputError(f"{err.filename or ''}: {err.strerror or err}; check that path (permissions, free space)") \
            from None
    except BadInputError as err:  # exit 1, not 2: the input was read as asked, and --strict found it bad
        print(f"error: {err} (--strict stops at the first bad line; drop --strict to count and skip bad input)",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: prepare(argv), BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
