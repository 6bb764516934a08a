"""Write the offline evaluation mirror from the Hugging Face hub (needs a network; evaluation never does).

    python launch/prepare_eval_data.py --data-dir DIR [--tasks boolq,piqa,...] [--limit N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shortened import cli
from shortened.config import ConfigError
from shortened.eval.mirror import MirrorError, prepare
from shortened.eval.tasks import load_task_table, select_tasks


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="where the mirror is written")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task of the table)")
    parser.add_argument("--task-file", help="task table (default shortened/eval/tasks.yaml)")
    parser.add_argument("--limit", type=int, default=0, help="keep the first N rows of each split (0: all)")
    args = parser.parse_args(argv)
    table = load_task_table(args.task_file)
    specs = select_tasks(table, args.tasks.split(",") if args.tasks else list(table), source="--tasks")
    for file, rows in prepare(args.data_dir, specs, limit=args.limit).items():
        print(f"{rows:8d} rows  {Path(args.data_dir) / file}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, (ConfigError, MirrorError)))
