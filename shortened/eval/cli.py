"""What launch/evaluate.py and launch/eval_watch.py share: bad input ends in one `error: ...` line and exit 2.

A typo in a task name, a negative limit, a model or mirror that is not there are the user's to fix, so they get
the message (what, where, the fix) and no traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from shortened.config import ConfigError
from shortened.eval.mirror import MirrorError
from shortened.eval.suite import ModelFileError
from shortened.eval.watch import WatchError

BAD_INPUT = (ConfigError, MirrorError, ModelFileError, WatchError)
EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage + error pair replaced by the one `error:` line every bad input gets."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def error_line(err: BaseException) -> str:
    """`error: <message>` on one line (YAML errors, for one, span several)."""
    return "error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def run(main: Callable[[], int]) -> int:
    """`main()`'s exit status, or 2 with one `error:` line on stderr for bad input."""
    try:
        return main()
    except BAD_INPUT as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_BAD_INPUT
