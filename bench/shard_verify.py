"""What the shard integrity checks cost, side by side in one run on shards of the shared SlimPajama sample.

    python bench/shard_verify.py [--seconds 2] [--repeats 5]

(a) the loader's read of one sample, `PackedShards[i]` (mmap row, CRC32 check, int64 copy), in a random order;
(b) the same read with the CRC32 check patched out (the row and the copy only: what format 1 did);
(c) / (d) `build_train_loader` end to end (Feistel order, collate, micro batch 8, one thread), CRC32 on / off;
(e) zlib.crc32 of one 4 KiB row alone; (f) `check_shards` (the start-up check) per shard.
seq_len 2048, uint16. On and off alternate, best of `--repeats`, because a core of a shared machine drifts.
The result is set against a training step: a rank's GPU consumes one 2048-token sample every
2048 / (tokens/s per GPU) seconds, which the CRC32 must stay far below.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "data" / "slimpajama-sample"
TOKENIZER = ROOT.parent / "shared" / "data" / "llama-tokenizer" / "tokenizer.model"
SEQ_LEN = 2048
GPU_TOKENS_PER_S = 8_000  # one GPU training a 2.7B model (8 such GPUs: 64k tokens/s for the job)


def timed_reads(read, order: np.ndarray, seconds: float) -> float:
    """Samples per second of `read` over `order`, repeated for about `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for index in order:
            read(int(index))
        count += len(order)
    return count / (time.perf_counter() - start)


@contextlib.contextmanager
def crc_off():
    from shortened.data.shards import Shard

    checked = Shard.sequence
    Shard.sequence = lambda self, row: self.tokens[row]
    try:
        yield
    finally:
        Shard.sequence = checked


def loader_rate(loader, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(loader)["input_ids"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as the loader runs beside a training process: one core's worth
    from shortened.data.loader import build_train_loader
    from shortened.data.prepare import PrepareConfig, prepare_shards
    from shortened.data.shards import PackedShards, check_shards

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        prepare_shards(PrepareConfig(input=str(SAMPLE), split="train", tokenizer=str(TOKENIZER), output=str(out),
                                     seq_len=SEQ_LEN, workers=2, shard_tokens=64 * SEQ_LEN, progress=False,
                                     verbose=False))
        shards = PackedShards(out)
        order = np.random.default_rng(0).permutation(len(shards))
        loader = iter(build_train_loader(out, global_batch_size=8, micro_batch_size=8, dp_rank=0, dp_world_size=1,
                                         seed=0))
        timed_reads(shards.__getitem__, order, 0.5)  # open every shard and warm the page cache
        best = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}
        for _ in range(args.repeats):
            best["a"] = max(best["a"], timed_reads(shards.__getitem__, order, args.seconds))
            best["c"] = max(best["c"], loader_rate(loader, args.seconds))
            with crc_off():
                best["b"] = max(best["b"], timed_reads(shards.__getitem__, order, args.seconds))
                best["d"] = max(best["d"], loader_rate(loader, args.seconds))
        crc_s = min(timeit_crc(np.asarray(shards._locate(0)[0].tokens[0])) for _ in range(args.repeats))

        n_shards = len(shards.manifest["shards"])
        start = time.perf_counter()
        for _ in range(20):
            check_shards(out)
        check_s = (time.perf_counter() - start) / 20 / n_shards

    us = {key: 1e6 / rate for key, rate in best.items()}
    step_us = SEQ_LEN / GPU_TOKENS_PER_S * 1e6
    cost_us = max(us["a"] - us["b"], crc_s * 1e6)  # the difference can drown in noise; the CRC alone cannot
    print(f"{len(shards):,} samples of {SEQ_LEN} uint16 tokens in {n_shards} shards; best of {args.repeats}")
    for key, what in [("a", "PackedShards[i], CRC32 on "), ("b", "PackedShards[i], CRC32 off"),
                      ("c", "build_train_loader, CRC32 on "), ("d", "build_train_loader, CRC32 off")]:
        print(f"({key}) {what}: {best[key]:>9,.0f} samples/s = {us[key]:6.2f} us/sample")
    print(f"(e) zlib.crc32 of one 4 KiB row: {crc_s * 1e6:.2f} us ({4096 / crc_s / 1e9:.2f} GB/s); a - b = "
          f"{us['a'] - us['b']:.2f} us, c - d = {us['c'] - us['d']:.2f} us")
    print(f"(f) check_shards: {check_s * 1e6:.0f} us per shard")
    print(f"one GPU at {GPU_TOKENS_PER_S:,} tokens/s consumes a {SEQ_LEN}-token sample every {step_us / 1e3:.0f} ms; "
          f"the CRC32 ({cost_us:.2f} us) is {cost_us / step_us:.5%} of that (budget 1 %)")


def timeit_crc(row: np.ndarray, n: int = 20_000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        zlib.crc32(row)
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()
