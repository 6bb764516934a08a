"""Distillation (KD) against plain continued pretraining, side by side in one run, on the demo's pruned model.

    python bench/distill.py --demo-out DIR [--steps 240] [--evals 6] [--eval-limit 64] [--json FILE]

DIR is the output of `python launch/demo.py --quick --out DIR` (or without --quick): it holds the pretrained
`source/` model, the `pruned/` model made from it by `launch/prune.py --criterion ppl`, and the token shards
`shards/train` and `shards/validation`.

(1) Recovery per token. Two runs of `launch/cpt.py` from the same pruned model, built by launch/demo.py's own
    `deepspeed_cmd` (tiny-cpu.yaml, 2 CPU ranks, ZeRO-2, same seed, same tokens in the same order, same lr schedule):
    plain, and distilled from the unpruned source (`distill.teacher`, Minitron's defaults kd_weight 1, ce_weight 0,
    T 1). Both evaluate inline `--evals` times plus at step 0: validation loss on the held-out shards and WikiText-2
    perplexity. Reported: both curves against tokens, and the tokens each run needs to reach plain CPT's final
    validation loss (linear interpolation between evaluation points). Goal: KD needs <= 2/3 of plain's tokens.
(2) Step time of KD over plain against the FLOP bound 1 + F_teacher / F_student, where F_student is the student's
    training FLOPs per token (`train_flops_per_token`, 6 x matmul parameters + attention: the MFU convention) and
    F_teacher the teacher's forward (`teacher_flops_per_token`, a third of its training FLOPs). Measured twice:
    the median `step_time_s` of the two runs of (1) (first steps left out), and in process on one thread without
    DeepSpeed (`NextTokenObjective` vs `DistillationObjective` forward + backward + AdamW on one micro-batch,
    alternated, best and median of `--repeats`). At tiny sizes the 32k-vocabulary LM head is most of N, so the
    bound is not the 7B one: the 2.7B-student-of-Vicuna-7B bound is printed beside it.

Peak memory of the chunked vs the full-logit loss is bench/distill_memory.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))  # demo.py's command construction, so both benches train alike

import demo  # noqa: E402

GOAL = 2 / 3  # KD should reach plain CPT's final validation loss in at most this share of plain's tokens
STEP_SKIP = 5  # first steps of a run left out of its median step time (allocator and thread-pool warm-up)
RUNS = {"plain": "cpt", "kd": "cpt_kd"}


@dataclasses.dataclass(frozen=True)
class DemoInputs:
    source: Path
    pruned: Path
    train: Path
    validation: Path
    seq_len: int


@dataclasses.dataclass(frozen=True)
class Point:
    """One inline evaluation of one run."""
    step: int
    tokens: int
    validation_loss: float | None
    wikitext2_ppl: float | None


def demo_inputs(demo_out: Path) -> DemoInputs:
    """The demo's models and shards, or an exit that says how to make them."""
    inputs = DemoInputs(source=demo_out / "source", pruned=demo_out / "pruned", train=demo_out / "shards" / "train",
                        validation=demo_out / "shards" / "validation", seq_len=0)
    missing = [str(path) for path, marker in [(inputs.source, "config.json"), (inputs.pruned, "config.json"),
                                              (inputs.train, "manifest.json"), (inputs.validation, "manifest.json")]
               if not (path / marker).is_file()]
    if missing:
        raise SystemExit(f"--demo-out {demo_out} lacks {', '.join(missing)}; make them with\n"
                         f"  python launch/demo.py --quick --out {demo_out}   (about 5-8 minutes on 2 cores)\n"
                         "or without --quick for the 8-block demo (about 16 minutes)")
    seq_len = json.loads((inputs.train / "manifest.json").read_text())["seq_len"]
    return dataclasses.replace(inputs, seq_len=seq_len)


def cpt_command(run_dir: Path, inputs: DemoInputs, args: argparse.Namespace, *extra: str) -> list:
    """demo.py's deepspeed command at this bench's budget, inline evaluation every 1/evals of it."""
    sizes = dataclasses.replace(demo.QUICK, seq_len=inputs.seq_len)  # deepspeed_cmd reads only seq_len
    every = max(1, args.steps // args.evals)
    return demo.deepspeed_cmd(
        run_dir, inputs.pruned, inputs.train, sizes, args.steps,
        "checkpoint.every_steps=" + str(args.steps),  # one save, at the end: saves are no part of what is compared
        "eval.mode=inline", f"eval.every_steps={every}", f"eval.data_dir={demo.EVAL_DATA}", "eval.tasks=[wikitext2]",
        f"eval.limit={args.eval_limit}", f"data.validation_path={inputs.validation}", "log.tensorboard=false", *extra)


def prepare_work(work: Path, inputs: DemoInputs, args: argparse.Namespace) -> None:
    """Keep what --work holds only if it was made with these settings: a finished run is reused, not redone."""
    settings = {"demo_out": str(inputs.source.parent), "steps": args.steps, "evals": args.evals,
                "eval_limit": args.eval_limit}
    marker = work / "bench_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) != settings:
        for stale in [*RUNS.values(), "source_eval.json"]:
            path = work / stale
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings) + "\n")


def finished(run_dir: Path, steps: int) -> bool:
    log = run_dir / "train_log.jsonl"
    return log.is_file() and any(json.loads(line)["step"] == steps for line in log.read_text().splitlines())


def run_both(work: Path, inputs: DemoInputs, args: argparse.Namespace) -> dict[str, float]:
    """Train plain and KD (skipped when --work already holds a finished run); wall seconds of each."""
    walls: dict[str, float] = {}
    for name, teacher in [("plain", ()), ("kd", (f"distill.teacher={inputs.source}",))]:
        run_dir = work / RUNS[name]
        if finished(run_dir, args.steps):
            print(f"\n==> {name}: already finished in {run_dir}, reading it")
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # a partial run would resume with other evaluation points
        started = time.perf_counter()
        demo.step(f"{name} CPT: {args.steps} steps", cpt_command(run_dir, inputs, args, *teacher))
        walls[name] = time.perf_counter() - started
    return walls


def teacher_reference(work: Path, inputs: DemoInputs, args: argparse.Namespace) -> Point:
    """The unpruned source model on the same validation sequences and WikiText-2 windows: the level KD is pulled to."""
    out = work / "source_eval.json"
    if not out.is_file():
        demo.step("evaluate the teacher (the unpruned source model) on the same data",
                  [sys.executable, "launch/evaluate.py", "--model", inputs.source, "--data-dir", demo.EVAL_DATA,
                   "--tasks", "wikitext2", "--limit", args.eval_limit, "--validation-shards", inputs.validation,
                   "--device", "cpu", "--output", out])
    metrics = json.loads(out.read_text())
    return Point(step=0, tokens=0, validation_loss=metrics["validation"]["loss"],
                 wikitext2_ppl=metrics["wikitext2"]["ppl"])


def eval_points(run_dir: Path) -> list[Point]:
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["status"] == "ok" and r.get("primary", True)]
    points = []
    for step in sorted({r["step"] for r in rows}):
        at = {r["task"]: r for r in rows if r["step"] == step}
        points.append(Point(step=step, tokens=next(iter(at.values()))["tokens"],
                            validation_loss=at["validation"]["value"] if "validation" in at else None,
                            wikitext2_ppl=at["wikitext2"]["value"] if "wikitext2" in at else None))
    return points


def tokens_to_reach(points: list[Point], target: float) -> float | None:
    """The first token count at which the validation loss reaches `target`, interpolated linearly between the two
    evaluation points around the crossing; None when it never does."""
    curve = [(p.tokens, p.validation_loss) for p in points if p.validation_loss is not None]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l0 <= target:
            return float(t0)
        if l1 <= target:
            return t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return float(curve[-1][0]) if curve and curve[-1][1] <= target else None


def train_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows if r["step"] > STEP_SKIP)


def kd_bound(student_config: Any, teacher: Any, seq_len: int) -> float:
    """1 + teacher forward FLOPs / student training FLOPs per token, in the MFU convention."""
    from shortened.modeling import train_flops_per_token
    from shortened.train.teacher import teacher_flops_per_token

    return 1 + teacher_flops_per_token(teacher, seq_len) / train_flops_per_token(student_config, seq_len)


def vicuna_bound() -> tuple[float, float]:
    """The 2.7B student (12 blocks) of Vicuna-7B (32) at seq 2048: MFU-convention bound and all-parameter bound."""
    import torch
    from transformers import LlamaForCausalLM

    from shortened.modeling import param_count, vicuna_7b_config

    with torch.device("meta"):  # the config's shape only, no weights allocated
        teacher = LlamaForCausalLM(vicuna_7b_config(32))
    student = vicuna_7b_config(12)
    return kd_bound(student, teacher, 2048), 1 + param_count(teacher.config) / (3 * param_count(student))


class _Engine:
    """The two things of a DeepSpeed engine the objectives use: calling it, and `.module`."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)


def alternate(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each variant, run in turn `repeats` times after two warm-up rounds, so drift hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(repeats + 2):
        for name, variant in variants.items():
            started = time.perf_counter()
            variant()
            if index >= 2:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def inprocess_step_times(inputs: DemoInputs, repeats: int, micro_batch: int) -> dict[str, Any]:
    """One micro-batch's forward + backward + AdamW step, plain vs KD, alternated on one thread; and the two losses
    alone (HF's LM head + cross-entropy vs the chunked KD loss) from fixed final hidden states: where KD's extra
    time goes.

    Same model, batch and precision as the runs, without DeepSpeed's gradient reduction (which both pay alike and
    which dilutes the ratio on 2 CPU ranks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortened.config import DistillConfig, TrainConfig
    from shortened.data.shards import PackedShards
    from shortened.train.chunked_loss import next_token_loss
    from shortened.train.distill_loss import distillation_losses
    from shortened.train.metrics import PhaseTimer
    from shortened.train.objective import DistillationObjective, NextTokenObjective

    torch.set_num_threads(1)  # as each rank of the runs (OMP_NUM_THREADS=1), and the box is shared
    dtype = torch.bfloat16 if demo.train_precision() == "bf16" else torch.float32
    distill = DistillConfig(teacher=str(inputs.source))
    shards = PackedShards(inputs.train)
    ids = torch.stack([torch.as_tensor(shards[i], dtype=torch.long) for i in range(micro_batch)])
    batch = {"input_ids": ids, "use_cache": False}  # as loop.model_inputs gives it
    teacher = AutoModelForCausalLM.from_pretrained(inputs.source, dtype=dtype).eval().requires_grad_(False)
    timer = PhaseTimer(torch.device("cpu"), sync=False)
    engines, objectives, optimizers = {}, {}, {}
    for name in RUNS:  # a student each: KD's forward hook must not touch the plain student
        engines[name] = _Engine(AutoModelForCausalLM.from_pretrained(inputs.pruned, dtype=dtype).train())
        objectives[name] = (NextTokenObjective(engines[name], TrainConfig.loss_chunk_size) if name == "plain" else
                            DistillationObjective(engines[name], teacher, distill))
        optimizers[name] = torch.optim.AdamW(engines[name].module.parameters(), lr=1e-4)

    def train_step(name: str) -> Callable[[], None]:
        def run() -> None:
            timer.start()
            objectives[name](engines[name], batch, timer).total.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            timer.pop()
        return run

    student = engines["plain"].module
    with torch.no_grad():
        hidden = student.base_model(input_ids=ids).last_hidden_state
        teacher_hidden = teacher.base_model(input_ids=ids).last_hidden_state
    head = student.get_output_embeddings().weight

    def head_ce() -> None:  # what NextTokenObjective's loss is: the chunked LM head + shifted cross-entropy
        h = hidden.detach().requires_grad_()
        next_token_loss(h, head, ids, chunk_size=TrainConfig.loss_chunk_size).backward()

    def chunked_kd() -> None:
        h = hidden.detach().requires_grad_()
        distillation_losses(h, head, teacher_hidden, teacher.get_output_embeddings().weight, ids,
                            kd_weight=distill.kd_weight, ce_weight=distill.ce_weight,
                            temperature=distill.temperature, chunk_size=distill.chunk_size).total.backward()

    seconds = alternate({"plain": train_step("plain"), "kd": train_step("kd"), "head_ce": head_ce,
                         "chunked_kd": chunked_kd}, repeats)
    head.grad = None
    # Best of the alternated runs, as the other benches here: on a shared box the minimum is the least disturbed.
    return {"best_s": {name: min(values) for name, values in seconds.items()},
            "median_s": {name: statistics.median(values) for name, values in seconds.items()},
            "bound": kd_bound(student.config, teacher, inputs.seq_len), "student": student.config,
            "teacher": teacher.config}


def param_summary(config: Any, seq_len: int) -> str:
    from shortened.modeling import matmul_param_count, param_count, train_flops_per_token

    head, matmul = config.vocab_size * config.hidden_size, matmul_param_count(config)
    return (f"{config.num_hidden_layers} blocks, N {param_count(config) / 1e6:.2f}M all params, "
            f"{matmul / 1e6:.2f}M matmul params ({head / matmul:.0%} of them the LM head), "
            f"{train_flops_per_token(config, seq_len) / 1e6:.1f} MFLOP/token trained")


def machine() -> str:
    """CPU model, cores, load and library versions: what the figures were measured on (the box may be shared)."""
    import os
    import platform

    import deepspeed
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {model}, {os.cpu_count()} cores, load average {load}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(points: dict[str, list[Point]], reach: dict[str, float | None], target: float, teacher: Point,
           first_kl: float) -> dict[str, Any]:
    """The recovery table and verdict; returns them for --json."""
    print("\n(1) recovery per token: validation loss (held-out SlimPajama shards) and WikiText-2 perplexity")
    print(f"{'step':>6} {'tokens':>9} | {'val loss plain':>14} {'val loss KD':>12} | {'wt2 ppl plain':>13} "
          f"{'wt2 ppl KD':>11}")
    kd_at = {p.step: p for p in points["kd"]}
    for p in points["plain"]:
        k = kd_at.get(p.step, Point(step=p.step, tokens=p.tokens, validation_loss=None, wikitext2_ppl=None))
        print(f"{p.step:>6} {p.tokens:>9,} | {fmt(p.validation_loss, '.4f'):>14} "
              f"{fmt(k.validation_loss, '.4f'):>12} | {fmt(p.wikitext2_ppl, '.1f'):>13} "
              f"{fmt(k.wikitext2_ppl, '.1f'):>11}")
    print(f"{'teacher (unpruned source)':>26}   val loss {teacher.validation_loss:.4f}, wt2 ppl "
          f"{teacher.wikitext2_ppl:.1f}; KL(teacher || student) at KD's first step: {first_kl:.4g} nats/token")
    plain_tokens, kd_tokens = reach["plain"], reach["kd"]
    ratio = kd_tokens / plain_tokens if kd_tokens is not None and plain_tokens else None
    print(f"tokens to reach plain CPT's final validation loss {target:.4f}: plain {fmt(plain_tokens, ',.0f')}, "
          f"KD {fmt(kd_tokens, ',.0f') if kd_tokens is not None else 'not reached'}")
    verdict = ("met" if ratio is not None and ratio <= GOAL else "missed")
    print(f"KD / plain tokens: {fmt(ratio, '.2f') if ratio is not None else 'not reached'} "
          f"(goal <= {GOAL:.2f}: {verdict})")
    return {"points": {name: [dataclasses.asdict(p) for p in rows] for name, rows in points.items()},
            "target_validation_loss": target, "tokens_to_target": reach, "kd_over_plain_tokens": ratio,
            "goal": GOAL, "goal_met": verdict == "met", "teacher": dataclasses.asdict(teacher),
            "first_step_kl": first_kl}


def report_speed(medians: dict[str, float], teacher_s: float, inproc: dict[str, Any], seq_len: int
                 ) -> dict[str, Any]:
    vicuna_mfu, vicuna_all = vicuna_bound()
    bound = inproc["bound"]
    runs_ratio = medians["kd"] / medians["plain"]
    inproc_ratio = inproc["best_s"]["kd"] / inproc["best_s"]["plain"]
    print("\n(2) step time, KD over plain CPT, against the FLOP bound 1 + F_teacher_fwd / F_student_train "
          "(MFU convention: 6 x matmul params + attention)")
    print(f"  student: {param_summary(inproc['student'], seq_len)}")
    print(f"  teacher: {param_summary(inproc['teacher'], seq_len)}")
    print(f"  runs of (1), 2 ranks, median step_time_s of steps > {STEP_SKIP}: plain {medians['plain']:.3f} s, "
          f"KD {medians['kd']:.3f} s: {runs_ratio:.2f}x (bound {bound:.2f}x); of KD's step, the teacher's "
          f"blocks take {teacher_s:.3f} s (its LM head runs inside the chunked loss, in fwd_bwd_s)")
    best, median = inproc["best_s"], inproc["median_s"]
    print(f"  in process, 1 thread, one micro-batch fwd+bwd+AdamW, best of the alternated steps: plain "
          f"{best['plain'] * 1e3:.1f} ms, KD {best['kd'] * 1e3:.1f} ms: {inproc_ratio:.2f}x (bound {bound:.2f}x; "
          f"medians {median['plain'] * 1e3:.1f} / {median['kd'] * 1e3:.1f} ms: {median['kd'] / median['plain']:.2f}x)")
    print(f"  the losses alone, fwd+bwd from fixed final hidden states: chunked LM head + cross-entropy (plain) "
          f"{best['head_ce'] * 1e3:.1f} ms, chunked KD loss (both heads) {best['chunked_kd'] * 1e3:.1f} ms: "
          f"{best['chunked_kd'] / best['head_ce']:.2f}x, for 4 vocabulary matmuls against 3 (1.33x the FLOPs)")
    print(f"  at these sizes the LM head is most of N on both sides, so the bound is ~1 + 1/3; the 2.7B student of "
          f"Vicuna-7B (12 of 32 blocks, seq 2048): {vicuna_mfu:.2f}x in the MFU convention, {vicuna_all:.2f}x counting "
          "all parameters (docs/training.md's 1.83x)")
    return {"median_step_s": medians, "median_teacher_s": teacher_s, "runs_ratio": runs_ratio,
            "inprocess_best_s": inproc["best_s"], "inprocess_median_s": inproc["median_s"],
            "inprocess_ratio": inproc_ratio,
            "bound": bound, "vicuna_2.7b_bound_mfu": vicuna_mfu, "vicuna_2.7b_bound_all_params": vicuna_all}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", required=True, type=Path, help="a launch/demo.py --out directory")
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps of each run (8 sequences a step)")
    parser.add_argument("--evals", type=int, default=6, help="inline evaluations per run, besides step 0")
    parser.add_argument("--eval-limit", type=int, default=64,
                        help="validation sequences and WikiText-2 windows per evaluation")
    parser.add_argument("--repeats", type=int, default=30, help="alternated in-process steps timed per variant")
    parser.add_argument("--work", type=Path, help="where the runs go, kept (a finished run there is reused); "
                                                  "default: a temporary directory, deleted afterwards")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.steps % args.evals:
        parser.error(f"--steps {args.steps} must be a multiple of --evals {args.evals}: the last evaluation is the "
                     "final step's")
    inputs = demo_inputs(args.demo_out.resolve())
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench_distill_"))
    started = time.perf_counter()
    print(machine(), flush=True)
    try:
        prepare_work(work, inputs, args)
        walls = run_both(work, inputs, args)
        teacher = teacher_reference(work, inputs, args)
        points = {name: eval_points(work / run) for name, run in RUNS.items()}
        logs = {name: train_log(work / run) for name, run in RUNS.items()}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    target = points["plain"][-1].validation_loss
    if target is None:
        raise SystemExit("the plain run has no final validation loss: see its results.jsonl")
    reach = {name: tokens_to_reach(rows, target) for name, rows in points.items()}
    inproc = inprocess_step_times(inputs, args.repeats, micro_batch=2)  # tiny-cpu.yaml's micro batch

    print(f"\n{machine()}")
    print(f"source {inputs.source}, pruned {inputs.pruned}, seq_len {inputs.seq_len}, {args.steps} steps x 8 "
          f"sequences per run, precision {demo.train_precision()}, eval.limit {args.eval_limit}")
    figures = report(points, reach, target, teacher, first_kl=logs["kd"][0]["kd_loss"])
    medians = {name: median_of(rows, "step_time_s") for name, rows in logs.items()}
    figures.update(report_speed(medians, median_of(logs["kd"], "teacher_s"), inproc, inputs.seq_len))
    figures["run_wall_s"] = walls
    runs = ", ".join(f"{name} {wall:.0f} s" for name, wall in walls.items()) or "reused from --work"
    print(f"\nbench finished in {time.perf_counter() - started:.0f} s (runs: {runs})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
