"""What limits one node's data prep: the main process's CPU per MB of text against a worker's.

    python bench/prep_scaling.py [--copies 2 16] [--workers 2] [--node-cores 64] [--nodes 8] [--corpus-tb 2.3]

The workers tokenize in parallel; the main process alone packs every token into shards, in unit order. A prep
scales with workers until the main process's share of the work fills its core. Each prep runs in a fresh child
that reports its own CPU time (`getrusage(RUSAGE_SELF)`, the main process) and its reaped workers'
(`RUSAGE_CHILDREN`). Two corpus sizes (the shared sample repeated) give the marginal cost per MB, without the
fixed start-up (imports, tokenizer load, planning). From them:
    saturation workers = worker CPU per MB / main CPU per MB,
    node MB/s = min(workers / worker CPU per MB, 1 / main CPU per MB),
and the hours for `--corpus-tb` of text on one node of `--node-cores` cores (one core left to the main process)
and on `--nodes` nodes running `--num-partitions` parts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data_prep import SAMPLE, SEQ_LEN, TOKENIZER, make_corpus, raw_tokenizer_mb_s, read_texts  # noqa: E402

CHILD = """
import json, resource, sys, time
started = time.perf_counter()
from shortened.data.prepare import PrepareConfig, prepare_shards
manifest = prepare_shards(PrepareConfig(input=sys.argv[1], tokenizer=sys.argv[2], output=sys.argv[3],
                                        seq_len=int(sys.argv[4]), workers=int(sys.argv[5]), progress=False,
                                        verbose=False))
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"main": me.ru_utime + me.ru_stime, "workers": kids.ru_utime + kids.ru_stime,
                  "wall": time.perf_counter() - started,
                  "bytes": sum(s["bytes"] for s in manifest["sources"].values())}))
"""


def measure(corpus: Path, out: Path, workers: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(TOKENIZER), str(out), str(SEQ_LEN),
                             str(workers)], capture_output=True, text=True, check=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs=2, default=[2, 16], help="the two corpus sizes (sample copies)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--node-cores", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--corpus-tb", type=float, default=2.3, help="text to prepare (SlimPajama-627B: ~2.3 TB)")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for copies in args.copies:
            corpus = Path(tmp) / f"corpus{copies}"
            make_corpus(corpus, copies)
            run = measure(corpus, Path(tmp) / f"out{copies}", args.workers)
            runs.append(run)
            print(f"x{copies}: {run['bytes'] / 1e6:7.1f} MB of text   main {run['main']:6.2f} CPU-s   "
                  f"workers {run['workers']:6.2f} CPU-s   wall {run['wall']:5.1f} s ({args.workers} workers, "
                  f"{run['bytes'] / 1e6 / run['wall']:.2f} MB/s)", flush=True)
    raw = raw_tokenizer_mb_s(read_texts(sorted(SAMPLE.rglob("*.jsonl.zst"))))
    small, large = runs
    mb = (large["bytes"] - small["bytes"]) / 1e6
    main_per_mb = (large["main"] - small["main"]) / mb
    worker_per_mb = (large["workers"] - small["workers"]) / mb
    saturation = worker_per_mb / main_per_mb
    workers = args.node_cores - 1
    node_mb_s = min(workers / worker_per_mb, 1 / main_per_mb)
    bound = "the workers" if workers / worker_per_mb < 1 / main_per_mb else "the main process"
    hours = args.corpus_tb * 1e6 / node_mb_s / 3600
    print(f"\nmarginal cost per MB of text: main {main_per_mb * 1e3:.1f} CPU-ms, workers {worker_per_mb * 1e3:.0f} "
          f"CPU-ms ({1 / worker_per_mb:.2f} MB/s per worker core; raw SentencePiece encode on one core here: "
          f"{raw:.2f} MB/s, so a worker runs at {1 / worker_per_mb / raw:.0%} of it)")
    print(f"the main process fills its core at {saturation:.0f} workers ({1 / main_per_mb:.0f} MB/s)")
    print(f"one {args.node_cores}-core node, {workers} workers: {node_mb_s:.1f} MB/s, bound by {bound}; "
          f"{args.corpus_tb} TB in {hours:.1f} h")
    print(f"{args.nodes} nodes, --num-partitions {args.nodes}: {args.nodes * node_mb_s:.0f} MB/s, "
          f"{args.corpus_tb} TB in {hours / args.nodes:.1f} h (input and output on a file system that keeps up)")


if __name__ == "__main__":
    main()
