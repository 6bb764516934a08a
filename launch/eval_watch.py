"""Evaluate every complete checkpoint of a run exactly once, on this machine's GPU (or CPU), while it trains.

    python launch/eval_watch.py --run RUN_DIR [--every-tokens T] [--once] [eval.data_dir=DIR ...]

Settings come from the `eval:` section (and data.validation_path) of RUN_DIR/config.yaml or --config, then the
eval.key=value / data.validation_path=DIR overrides.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from shortened import cli
from shortened.config import ConfigError, EvalConfig
from shortened.eval.mirror import MirrorError
from shortened.eval.suite import ModelFileError
from shortened.eval.watch import WatchError, clean_launcher_env, load_watch_config, watch

BAD_INPUT = (ConfigError, MirrorError, ModelFileError, WatchError)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="eval keys (of the run's config.yaml, or eval.key=value overrides):\n"
                                       + cli.config_help(EvalConfig))
    parser.add_argument("--run", required=True, help="the trainer's run directory")
    parser.add_argument("--every-tokens", type=float, default=0,
                        help="evaluate the first checkpoint of every interval of this many tokens (default: all)")
    parser.add_argument("--once", action="store_true", help="evaluate what is there now, then exit")
    parser.add_argument("--config", help="YAML with an eval: section (default RUN_DIR/config.yaml)")
    cli.add_device_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="eval.key=value (the keys below), data.validation_path=DIR")
    args = parser.parse_args(argv)
    # Never a rank of a job, even when started from inside one (torchtitan's async eval does the same).
    for name in set(os.environ) - set(clean_launcher_env()):
        del os.environ[name]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, validation_path = load_watch_config(args.run, args.config, args.overrides)
    watch(args.run, config, every_tokens=int(args.every_tokens), once=args.once, device=args.device, dtype=args.dtype,
          validation_path=validation_path)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, BAD_INPUT))
