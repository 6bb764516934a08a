"""Join prepared shard directories (the parts of a partitioned data prep) into one corpus, copying no token.

    python data_prep/merge_shards.py --inputs parts/part_0 parts/part_1 parts/part_2 --output corpus

The output holds one manifest.json listing the parts' shards where they lie; give it as data.path (or
data.validation_path). Keep the parts beside it: the manifest refers to them by relative path. The parts of a
partitioned prep are joined in partition order, other corpora in the order given; an existing merge is rewritten
but never renumbered (see docs/shard-format.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened import cli  # noqa: E402
from shortened.config import ConfigError, MergeConfig  # noqa: E402
from shortened.data.merge import merge_corpora  # noqa: E402
from shortened.data.shards import ShardFormatError  # noqa: E402
from shortened.data.sources import InputError  # noqa: E402

BAD_INPUT = (InputError, ConfigError, ShardFormatError)


def parse_args(argv: list[str] | None = None) -> MergeConfig:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_dataclass_arguments(parser, MergeConfig)
    args = parser.parse_args(argv)
    return cli.config_from_args(args, MergeConfig)


def merge(argv: list[str] | None) -> int:
    config = parse_args(argv)
    manifest = merge_corpora(config)
    print(f"{Path(config.output) / 'manifest.json'}: {len(config.inputs)} parts, {manifest['num_sequences']:,} "
          f"sequences of {manifest['seq_len']} tokens, {manifest['docs_total']:,} documents, "
          f"{len(manifest['shards'])} shard(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: merge(argv), BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
