"""Draw curves.png from one or more run directories' results.jsonl (runs overlaid, one line each), optionally
against a reference model (the unpruned source) as a dashed line per panel.

    python launch/plot_curves.py RUN_DIR [RUN_DIR ...] [--output curves.png] [--label NAME ...]
        [--reference source_eval.jsonl [--reference-label "source (unpruned)"]]

The reference is what `launch/evaluate.py --model SOURCE` writes: the rows of `--results source_eval.jsonl` (the
line shaded ±1 stderr) or the values JSON of `--output source_eval.json` (a line only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shortened import cli
from shortened.eval.curves import DEFAULT_REFERENCE_LABEL, CurvesInputError, plot_curves  # matplotlib only once drawing


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories holding results.jsonl")
    parser.add_argument("--output", help="default: RUN_DIR/curves.png for one run, ./curves.png for several")
    parser.add_argument("--label", action="append", dest="labels", metavar="NAME",
                        help="legend name of a run, once per RUN_DIR in the same order (default: the directory name)")
    parser.add_argument("--reference", metavar="FILE.jsonl",
                        help="launch/evaluate.py --results rows (or --output JSON) of a model, drawn as a dashed line "
                             "per panel")
    parser.add_argument("--reference-label", default=DEFAULT_REFERENCE_LABEL, metavar="NAME",
                        help=f"legend name of the reference (default: {DEFAULT_REFERENCE_LABEL})")
    args = parser.parse_args(argv)
    output = args.output or (str(Path(args.runs[0]) / "curves.png") if len(args.runs) == 1 else "curves.png")
    print(plot_curves(args.runs, output, args.labels, args.reference, args.reference_label))
    return 0


if __name__ == "__main__":
    # a folder without results.jsonl, a missing or malformed reference, labels that do not fit the runs
    sys.exit(cli.run(main, (FileNotFoundError, CurvesInputError)))
