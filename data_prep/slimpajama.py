"""Prepare SlimPajama (or any jsonl / jsonl.zst corpus) as packed token shards.

    python data_prep/slimpajama.py --input DIR --tokenizer PATH --output DIR --seq-len 2048 --workers N
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened.config import ConfigError  # noqa: E402
from shortened.data.prepare import BadInputError, PrepareConfig, prepare_shards  # noqa: E402
from shortened.data.shards import ShardFormatError  # noqa: E402
from shortened.data.sources import InputError  # noqa: E402
from shortened.tokenizer import TokenizerNotFound  # noqa: E402


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="SlimPajama tree (chunkN/*.jsonl.zst), a folder of .jsonl/.jsonl.zst, one file, or "
                             "hf://DATASET_ID to stream a Hugging Face dataset (e.g. hf://cerebras/SlimPajama-627B)")
    parser.add_argument("--hf-data-files", nargs="*", default=None,
                        help="data files for an hf:// builder input such as hf://json")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, or a model directory holding it")
    parser.add_argument("--output", required=True, help="output directory for manifest.json and shards")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (the output does not depend on it)")
    parser.add_argument("--split", default=None, help="sub-folder of --input to read, e.g. train or validation")
    parser.add_argument("--sources", default=None,
                        help="comma-separated meta.redpajama_set_name values to keep, e.g. RedPajamaC4,Github")
    parser.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: all)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line with file:line: reason")
    parser.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    parser.add_argument("--unit-bytes", type=int, default=0, help="decompressed bytes per work unit (0: auto)")
    parser.add_argument("--verify", action="store_true",
                        help="on a finished output, also check every shard's sha256 (reads all shards) and rebuild "
                             "the damaged ones; without it a rerun checks presence, size and header")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return PrepareConfig(
        input=args.input, tokenizer=args.tokenizer, output=args.output, seq_len=args.seq_len, workers=args.workers,
        split=args.split, sources=args.sources.split(",") if args.sources else None, max_tokens=args.max_tokens,
        strict=args.strict, shard_tokens=args.shard_tokens, unit_bytes=args.unit_bytes, verify=args.verify,
        hf_data_files=args.hf_data_files,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        prepare_shards(parse_args(argv))
    except (InputError, TokenizerNotFound, ConfigError, ShardFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, an unreadable input file: the path and the reason say what to fix
        print(f"error: {err.filename or ''}: {err.strerror or err}; check that path (permissions, free space)",
              file=sys.stderr)
        return 2
    except BadInputError as err:
        print(f"error: {err} (--strict stops at the first bad line; drop --strict to count and skip bad input)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
