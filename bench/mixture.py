"""Natural mixture vs dynamic batch loading, side by side in one run, on the demo's pruned model; and the loader's
sequences/s with mixtures on against the global order.

    python bench/mixture.py --demo-out DIR [--work DIR] [--steps 96] [--every 8] [--points 4]
                            [--update-sequences 32] [--eval-sequences 64] [--repeats 5] [--json FILE]
    python bench/mixture.py --demo-out demo_out --source models/smollm2-135m --lr 1e-4 --work bench_out/mixture_smollm2

DIR is the output of `python launch/demo.py --quick --out DIR` (or without --quick): its `source/` model (the
unpruned reference; --source names it where the demo used a model outside DIR, as the full demo does with
SmolLM2-135M) and `pruned/` model are used; the shards are this bench's own, because the demo's mix sources inside a
sequence, tokenized with the source model's own tokenizer (the LLaMA tokenizer for a toy source without one).

(1) Recovery per domain. The shared sample's train and validation splits are prepared by source (`--pack-by-source`)
    at the demo's sequence length. Two runs of `launch/cpt.py` from the pruned model, built by launch/demo.py's own
    `deepspeed_cmd` (tiny-cpu.yaml, 2 CPU ranks, ZeRO-2, the same seed, tokens and lr schedule):
    - global: the global sample order over every source, today's default (the natural mixture on average);
    - natural: `data.mixture` at the natural weights (each source's share of the samples), read through the mixture
      sampler: the same batches as the dynamic run until its first update, so the two differ by the updates alone;
    - dynamic: `data.dynamic.every_steps=--every`, `reference=model` with the unpruned source as the reference model,
      each update scoring `--update-sequences` validation sequences of each domain, spread over the domain's.
    Each run saves a Hugging Face model `--points` times. This process scores every point (and step 0, the pruned
    model) on `--eval-sequences` validation sequences of every domain, spread the same way (a domain's whole split
    when it has fewer; when --eval-sequences is a multiple of --update-sequences the updates' sequences are among
    them, as in Sheared-LLaMA, whose updates and reports share one validation set), and the source model on the same
    sequences; reported per point: each domain's gap (loss - source's loss), their mean and their max. (Runs measured
    before 2026-12-07's change scored each domain's first sequences.)
(2) Loader throughput. One process (one core, num_workers 0, torch at one thread) reads micro-batches of the
    by-source training shards at the recipe's global batch of 512: in the global order (today's loader), under the
    natural mixture, and under a skewed mixture (the dynamic run's last weights), alternated, the median of
    `--repeats` rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))  # demo.py's command construction, so the runs train as the demo's do

import demo  # noqa: E402

RUNS = ("global", "natural", "dynamic")
GLOBAL_BATCH, MICRO_BATCH = 512, 8  # the loader measurement: the Vicuna recipes' global batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", type=Path, required=True, help="launch/demo.py's --out")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out" / "mixture")
    parser.add_argument("--steps", type=int, default=96, help="optimizer steps of each run (8 sequences each)")
    parser.add_argument("--every", type=int, default=8, help="data.dynamic.every_steps of the dynamic run")
    parser.add_argument("--points", type=int, default=4, help="saved models per run, evenly spaced")
    parser.add_argument("--update-sequences", type=int, default=32,
                        help="data.dynamic.eval_sequences: validation sequences per domain at each update")
    parser.add_argument("--eval-sequences", type=int, default=64,
                        help="validation sequences per domain each reported point is scored on")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the loader measurement")
    parser.add_argument("--loader-steps", type=int, default=20, help="global batches per loader round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="which runs (natural and dynamic are the comparison; global shows today's default)")
    parser.add_argument("--source", type=Path, help="the unpruned reference model (default: DIR/source)")
    parser.add_argument("--lr", type=float, help="optim.lr of every run (default: the recipe's 1e-3, for the toy "
                                                  "model; a pretrained model wants the paper's 1e-4)")
    args = parser.parse_args()
    source, pruned = args.source or args.demo_out / "source", args.demo_out / "pruned"
    demo_manifest = args.demo_out / "shards" / "train" / "manifest.json"
    missing = [str(p) for p in (source / "config.json", pruned / "config.json", demo_manifest) if not p.is_file()]
    if missing:
        raise SystemExit(f"--demo-out {args.demo_out} lacks {', '.join(missing)}; make them with\n"
                         f"  python launch/demo.py --quick --out {args.demo_out}   (about 5-8 minutes on 2 cores)")
    seq_len = json.loads(demo_manifest.read_text())["seq_len"]  # the length the demo's models were trained at
    shards = prepare(args.work / "shards", seq_len, tokenizer_of(source))
    run_dirs = {name: args.work / name for name in args.runs}
    for name, run_dir in run_dirs.items():
        train(name, run_dir, pruned, source, shards, seq_len, args)
    sizes = source_sizes(shards["train"])
    from shortened.train.plan import natural_mixture  # the weights dynamic loading starts from
    figures: dict[str, Any] = {"steps": args.steps, "every": args.every, "seq_len": seq_len,
                               "update_sequences": args.update_sequences, "eval_sequences": args.eval_sequences}
    figures["reference"] = domain_losses(source, shards["validation"], args.eval_sequences)
    figures["gaps"] = recovery(run_dirs, pruned, figures["reference"], shards["validation"], seq_len,
                               args.eval_sequences)
    last_weights = read_log(run_dirs["dynamic"])[-1]["domain_weights"]
    figures["dynamic_final_weights"] = last_weights
    figures["natural_weights"] = natural_mixture(sizes)
    if "global" in run_dirs:
        figures["global_read"] = read_shares(run_dirs["global"])
    figures["loader"] = loader_rates(shards["train"], last_weights, args.repeats, args.loader_steps)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def tokenizer_of(source: Path) -> Path:
    """The source model's own tokenizer; the LLaMA tokenizer for a toy source saved without one."""
    from shortened.tokenizer import TokenizerNotFound, load_tokenizer

    try:
        load_tokenizer(source)
        return source
    except TokenizerNotFound:
        return demo.TOKENIZER


def prepare(out: Path, seq_len: int, tokenizer: Path) -> dict[str, Path]:
    shards = {split: out / f"{split}-{seq_len}" for split in ("train", "validation")}
    for split, path in shards.items():
        demo.step(f"prepare the {split} split by source as {seq_len}-token shards",
                  [sys.executable, "data_prep/slimpajama.py", "--input", demo.SAMPLE, "--split", split,
                   "--tokenizer", tokenizer, "--output", path, "--seq-len", seq_len, "--workers", 2,
                   "--pack-by-source", "--no-progress"], done=path / "manifest.json")
    return shards


def train(name: str, run_dir: Path, pruned: Path, source: Path, shards: dict[str, Path], seq_len: int,
          args: argparse.Namespace) -> None:
    settings = {"steps": args.steps, "every": args.every, "points": args.points, "seq_len": seq_len,
                "update_sequences": args.update_sequences, "pruned": str(pruned.resolve()), "lr": args.lr}
    marker = run_dir / "bench_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings and finished(run_dir, args.steps):
        print(f"\n==> {name}: already finished in {run_dir}, reading it")
        return
    shutil.rmtree(run_dir, ignore_errors=True)  # a run of other settings would resume instead of starting afresh
    every = max(1, args.steps // args.points)
    mixture = {
        "global": (),
        # whole counts: normalised by the config exactly as plan.natural_mixture normalises them for dynamic loading
        "natural": ("data.mixture={" + ", ".join(f"{s}: {n}" for s, n in source_sizes(shards["train"]).items())
                    + "}",),
        "dynamic": (f"data.dynamic.every_steps={args.every}", "data.dynamic.reference=model",
                    f"data.dynamic.reference_model={source}", f"data.dynamic.eval_sequences={args.update_sequences}"),
    }[name]
    sizes = dataclasses.replace(demo.QUICK, seq_len=seq_len, lr=args.lr or 0.0)  # what deepspeed_cmd reads
    demo.step(f"{name}: {args.steps} steps from the pruned model",
              demo.deepspeed_cmd(run_dir, pruned, shards["train"], sizes, args.steps,
                                 f"checkpoint.every_steps={every}", f"checkpoint.keep_last={args.points + 1}",
                                 "checkpoint.save_hf=true", f"data.validation_path={shards['validation']}",
                                 "log.tensorboard=false", *mixture))
    marker.write_text(json.dumps(settings) + "\n")


def source_sizes(train: Path) -> dict[str, int]:
    from shortened.data.mixture import SourceIndex
    from shortened.data.shards import read_manifest

    index = SourceIndex.from_manifest(read_manifest(train))
    assert index is not None
    return index.sizes()


def finished(run_dir: Path, steps: int) -> bool:
    log = run_dir / "train_log.jsonl"
    return log.is_file() and any(json.loads(line)["step"] == steps for line in log.read_text().splitlines())


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def domain_losses(model_dir: Path, validation: Path, limit: int) -> dict[str, float]:
    """`limit` validation sequences of every domain (spread over its own), scored in fp32 on this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortened.data.mixture import SourceIndex
    from shortened.data.shards import PackedShards
    from shortened.eval.validation import domain_validation_losses

    shards = PackedShards(validation)
    index = SourceIndex.from_manifest(shards.manifest)
    assert index is not None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return domain_validation_losses(model, shards, index, index.sources, batch_size=16, limit=limit)


def recovery(run_dirs: dict[str, Path], pruned: Path, reference: dict[str, float], validation: Path, seq_len: int,
             limit: int) -> list[dict[str, Any]]:
    """Per point of each run: tokens, each domain's gap to the source model, mean and max."""
    start = domain_losses(pruned, validation, limit)
    points = []
    for name, run_dir in run_dirs.items():
        points.append(gap_row(name, 0, 0, start, reference))
        for model in sorted((run_dir / "checkpoints").glob("step_*/model")):
            step = int(model.parent.name.split("_")[1])
            points.append(gap_row(name, step, step * 8 * seq_len, domain_losses(model, validation, limit), reference))
    return points


def gap_row(run: str, step: int, tokens: int, losses: dict[str, float], reference: dict[str, float]
            ) -> dict[str, Any]:
    gaps = {source: losses[source] - reference[source] for source in reference}
    worst = max(gaps, key=lambda s: gaps[s])
    return {"run": run, "step": step, "tokens": tokens, "gaps": gaps, "mean_gap": statistics.mean(gaps.values()),
            "max_gap": gaps[worst], "max_domain": worst}


def read_shares(run_dir: Path) -> dict[str, float]:
    """Each source's share of the samples a run read (from its logged domain_samples)."""
    totals: dict[str, int] = {}
    for row in read_log(run_dir):
        for source, count in row.get("domain_samples", {}).items():
            totals[source] = totals.get(source, 0) + count
    return {source: count / sum(totals.values()) for source, count in totals.items()}


def loader_rates(train: Path, skewed: dict[str, float], repeats: int, steps: int) -> dict[str, float]:
    """Sequences/s of one process reading micro-batches: global order, natural mixture, skewed mixture."""
    import torch

    from shortened.data.loader import build_train_loader
    from shortened.data.mixture import MixtureState, SourceIndex
    from shortened.data.shards import read_manifest
    from shortened.train.plan import natural_mixture

    torch.set_num_threads(1)
    index = SourceIndex.from_manifest(read_manifest(train))
    assert index is not None
    states = {"global order": None, "natural mixture": MixtureState.start(natural_mixture(index.sizes()),
                                                                          index.sources),
              "skewed mixture": MixtureState.start(skewed, index.sources)}
    batches = steps * GLOBAL_BATCH // MICRO_BATCH
    rates: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(repeats):
        for name, state in states.items():
            loader = iter(build_train_loader(train, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH,
                                             dp_rank=0, dp_world_size=1, seed=1234, mixture=state))
            next(loader)  # the first batch opens the shards
            started = time.perf_counter()
            for _ in range(batches):
                next(loader)
            rates[name].append(batches * MICRO_BATCH / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def report(figures: dict[str, Any]) -> None:
    print(f"\n(1) validation-loss gap to the unpruned source, per domain ({figures['eval_sequences']} sequences "
          f"each, or all a domain has); {figures['steps']} steps of 8 x {figures['seq_len']} tokens, dynamic update "
          f"every {figures['every']} steps on {figures['update_sequences']} sequences per domain")
    print("source's losses: " + ", ".join(f"{s} {v:.3f}" for s, v in figures["reference"].items()))
    sources = sorted(figures["gaps"][0]["gaps"])
    print(f"{'run':8} {'step':>5} {'tokens':>7} {'mean':>7} {'max':>7}  "
          + " ".join(f"{s.removeprefix('RedPajama'):>13}" for s in sources))
    for row in figures["gaps"]:
        print(f"{row['run']:8} {row['step']:5d} {row['tokens']:7d} {row['mean_gap']:7.3f} {row['max_gap']:7.3f}  "
              + " ".join(f"{row['gaps'][s]:13.3f}" for s in sources))
    print("\ndynamic run's last weights: " + ", ".join(f"{s} {w:.3f}" for s, w in
                                                       figures["dynamic_final_weights"].items()))
    print("natural weights: " + ", ".join(f"{s} {w:.3f}" for s, w in figures["natural_weights"].items()))
    if "global_read" in figures:
        print("global run's read shares: " + ", ".join(f"{s} {w:.3f}" for s, w in figures["global_read"].items()))
    base = figures["loader"]["global order"]
    print(f"\n(2) loader, one core, global batch {GLOBAL_BATCH}, micro batch {MICRO_BATCH}, seq {figures['seq_len']}:")
    for name, rate in figures["loader"].items():
        print(f"  {name:16} {rate:10,.0f} sequences/s  ({rate / base:.2f}x the global order)")


if __name__ == "__main__":
    sys.exit(main())
