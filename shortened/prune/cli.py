"""What launch/prune.py and launch/lora.py share: bad input ends in one `error: ...` line and exit 2.

A count out of range, a protected block, a calibration file too short, a model directory that is not one are the
user's to fix, so they get the message (what, where, the fix) and no traceback; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

from shortened.config import ConfigError, PruneConfig, from_dict
from shortened.prune.errors import PruneInputError
from shortened.tokenizer import TokenizerNotFound

BAD_INPUT = (ConfigError, PruneInputError, TokenizerNotFound)
EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage + error pair replaced by the one `error:` line every bad input gets."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def prune_config(args: dict[str, Any]) -> PruneConfig:
    """PruneConfig from parsed arguments (a size flag not given is None).

    PruneConfig reads 0 as "not given", so `--remove 0` would be reported as no size flag at all; a given flag
    is checked here first.
    """
    for flag, key in (("--remove", "remove"), ("--keep-blocks", "keep_blocks")):
        if args.get(key) is not None and args[key] < 1:
            raise ConfigError(f"prune.{key}: {flag} {args[key]}: must be >= 1 (a number of blocks)")
    if args.get("ratio") is not None and not 0.0 < args["ratio"] < 1.0:
        raise ConfigError(f"prune.ratio: --ratio {args['ratio']}: must lie strictly between 0 and 1 "
                          "(a fraction of all parameters)")
    given = {key: value for key, value in args.items() if value is not None}
    return from_dict(PruneConfig, given, source="command line")


def error_line(err: BaseException) -> str:
    return "error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def run(main: Callable[[], int]) -> int:
    """`main()`'s exit status, or 2 with one `error:` line on stderr for bad input."""
    try:
        return main()
    except BAD_INPUT as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_BAD_INPUT
