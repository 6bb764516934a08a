"""Draw curves.png from one or more run directories' results.jsonl (runs overlaid, one line each).

    python launch/plot_curves.py RUN_DIR [RUN_DIR ...] [--output curves.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shortened import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories holding results.jsonl")
    parser.add_argument("--output", help="default: RUN_DIR/curves.png for one run, ./curves.png for several")
    args = parser.parse_args(argv)
    from shortened.eval.curves import plot_curves  # after parsing: --help needs no matplotlib

    output = args.output or (str(Path(args.runs[0]) / "curves.png") if len(args.runs) == 1 else "curves.png")
    print(plot_curves(args.runs, output))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, (FileNotFoundError,)))  # a folder without results.jsonl
