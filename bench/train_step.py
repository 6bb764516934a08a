"""Training-step benchmarks of the real trainer (`deepspeed launch/cpt.py`), read from its train_log.jsonl.

    python bench/train_step.py breakdown                     # CPU: where a step's time goes, checkpoint share
    python bench/train_step.py throughput --geometry vicuna-2.7b --nproc 8   # GPU: tokens/s/GPU and MFU
    python bench/train_step.py distill --geometry vicuna-2.7b --nproc 8      # GPU: KD step vs plain step
    python bench/train_step.py kernels --geometry vicuna-2.7b --nproc 1 --grad-accum 16   # GPU: the fast path
    python bench/train_step.py kernels --geometry cpu-100m --nproc 1 --variants eager,compiled  # CPU compile ratio

breakdown: the shipped tiny-cpu recipe on 2 CPU ranks: data wait, forward/backward and optimizer per step
(device-synchronised timers), and the checkpoint save at the recipe's interval as a share of wall time.

distill: the same geometry's ZeRO-2 step without and with a frozen teacher (`distill.teacher`: the 32-block
Vicuna-7B geometry, random weights; for `--geometry tiny` a 6-block tiny Llama), side by side: tokens/s per GPU, MFU
(the teacher's forward counted), the teacher's forward time, peak memory, and the step-time ratio against the FLOP
bound 1 + N_teacher / (3 N_student) (train_flops_per_token of the student, a third of the teacher's).

kernels: the fast-path settings one at a time from the recipe's setting (eager, ZeRO-2, no document mask, plain),
side by side: eager / compiled (`train.compile`) / Liger (`model.liger`), ZeRO-2 / ZeRO-1, document mask off / on,
plain / KD (the geometry's teacher, as in distill), with tokens/s per GPU, eager's step time over the row's (above
1: faster), MFU, step time, peak memory, and for KD rows the step-time ratio to the plain row of the same kernels
against the FLOP bound.
A variant this machine refuses (Liger without CUDA or the package) is a row with its `error:` line, not a stop.
`--geometry cpu-100m` (8 blocks x 768, 106M parameters, seq 256) measures the compiled/eager ratio on a CPU.

throughput: ZeRO-2 against ZeRO-1, each with and without activation checkpointing, one run each, side by side:
tokens/s, tokens/s per GPU, MFU (bf16 dense peak of the device, see shortened/train/metrics.py), step time and
peak memory. `--geometry vicuna-2.7b` is 12 Vicuna-7B blocks with random weights at seq 2048, micro batch 2
(the issue's setting); `--geometry tiny` runs the same comparison on a CPU in seconds.
The first `--warmup` steps of every run are left out of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shortened.ports import free_port  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "slimpajama-sample"
TOKENIZER = ROOT.parent / "shared" / "data" / "llama-tokenizer" / "tokenizer.model"
RECIPE = ROOT / "configs" / "cpt" / "tiny-cpu.yaml"
GEOMETRIES = {  # seq_len, micro batch, model builder arguments
    "tiny": {"seq_len": 128, "micro": 2, "layers": 4},
    "cpu-100m": {"seq_len": 256, "micro": 1, "layers": 8},
    "vicuna-2.7b": {"seq_len": 2048, "micro": 2, "layers": 12},
    "vicuna-1.5b": {"seq_len": 2048, "micro": 2, "layers": 6},
}
TEACHERS = {"tiny": ("tiny-teacher", 6), "cpu-100m": ("cpu-100m", 12), "vicuna-2.7b": ("vicuna-7b", 32),
            "vicuna-1.5b": ("vicuna-7b", 32)}
# kernels: each variant's overrides on top of the base (eager, ZeRO-2, no document mask) and whether it distils;
# KD rows are compared with the plain row of the same kernels.
KERNEL_VARIANTS: dict[str, tuple[list[str], bool]] = {
    "eager": ([], False),
    "compiled": (["train.compile=true"], False),
    "liger": (["model.liger=true"], False),
    "zero1": (["deepspeed_config=ds_configs/zero1_bf16.json"], False),
    "mask": (["data.document_mask=true"], False),
    "compiled+mask": (["train.compile=true", "data.document_mask=true"], False),
    "kd": ([], True),
    "compiled+kd": (["train.compile=true"], True),
}


def shards(out: Path, seq_len: int) -> Path:
    from shortened.data.prepare import PrepareConfig, prepare_shards

    path = out / f"shards-{seq_len}"
    if not (path / "manifest.json").is_file():
        prepare_shards(PrepareConfig(input=str(SAMPLE), split="train", tokenizer=str(TOKENIZER), output=str(path),
                                     seq_len=seq_len, workers=2, progress=False, verbose=False))
    return path


def model(out: Path, geometry: str, layers: int | None = None) -> Path:
    """A saved model with random weights of the geometry (built once, on the GPU when there is one); `layers`
    overrides the geometry's block count (the teachers)."""
    import torch
    from transformers import LlamaForCausalLM

    from shortened.modeling import build_tiny_llama, save_with_tokenizer, vicuna_7b_config

    layers = layers or GEOMETRIES[geometry]["layers"]
    path = out / f"model-{geometry}-{layers}"
    if (path / "config.json").is_file():
        return path
    if geometry.startswith("tiny"):
        net = build_tiny_llama(seed=layers, num_layers=layers)
    elif geometry == "cpu-100m":  # GPT-2-small width over LLaMA's vocabulary: 8 blocks 56.6M + embedding/head 49.2M
        net = build_tiny_llama(seed=layers, num_layers=layers, hidden_size=768, intermediate_size=2048, num_heads=12,
                               num_kv_heads=12)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            net = LlamaForCausalLM(vicuna_7b_config(layers)).to(torch.bfloat16)
    save_with_tokenizer(net, path, TOKENIZER)
    return path


def run(name: str, out: Path, nproc: int, overrides: list[str], stop_after: int = 0) -> list[dict]:
    records = try_run(name, out, nproc, overrides, stop_after)
    if isinstance(records, str):
        sys.exit(f"{name} failed:\n{records}")
    return records


def try_run(name: str, out: Path, nproc: int, overrides: list[str], stop_after: int = 0) -> list[dict] | str:
    """The run's train-log records, or its output's tail when it failed. With `stop_after`, the job is killed once
    its log has that many steps (its train.max_steps lies beyond): a run that reaches its stop saves a checkpoint,
    38 GB for the 2.7B geometry's ZeRO-2 state, minutes of disk time and more than half of a 64 GB disk."""
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
           str(free_port()), str(ROOT / "launch" / "cpt.py"), "--config", str(RECIPE), f"run_dir={run_dir}",
           *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    started = time.monotonic()
    output = run_dir / "job.out"
    with open(output, "w") as handle:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        code = _wait(job, run_dir / "train_log.jsonl", stop_after)
    if code != 0:
        return output.read_text()[-6000:]
    # a line cut by the kill has no newline yet: only complete lines are records
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().split("\n")[:-1]]
    print(f"  {name}: {len(records)} steps in {time.monotonic() - started:.0f} s (including start-up)", flush=True)
    return records


def _wait(job: subprocess.Popen, train_log: Path, stop_after: int) -> int:
    """The job's exit status; 0 once its log holds `stop_after` steps, when the job (its whole session) is killed."""
    while job.poll() is None:
        if stop_after and train_log.is_file() and len(train_log.read_text().splitlines()) >= stop_after:
            os.killpg(job.pid, signal.SIGKILL)  # the session this bench started for the job, and only it
            job.wait()
            return 0
        time.sleep(0.5)
    return job.returncode


def breakdown(args: argparse.Namespace) -> None:
    from shortened.config import RunConfig, load_config

    recipe = load_config(RunConfig, RECIPE)
    every = recipe.checkpoint.every_steps
    steps = args.steps or 2 * every
    out = Path(args.out)
    common = [f"model.init_from={model(out, 'tiny')}", f"data.path={shards(out, recipe.data.seq_len)}",
              f"train.max_steps={steps}", "log.sync_timers=true", "log.tensorboard=false", *args.set]
    variants = {"as shipped": [], "2 loader workers": ["data.num_workers=2"]}
    rows = {name: run(name.replace(" ", "-"), out, 2, [*common, *extra]) for name, extra in variants.items()}
    print(f"\nCPU step-time breakdown, tiny-cpu recipe ({recipe.train.global_batch_size} x {recipe.data.seq_len} "
          f"tokens/step, 2 ranks, data.num_workers={recipe.data.num_workers}), "
          f"mean of steps {args.warmup + 1}..{steps} "
          "without a save:")
    print(f"  {'variant':<18} {'data wait':>16} {'fwd+bwd':>16} {'optimizer':>16} {'step':>9} {'tokens/s':>9} "
          f"{'save':>7} {'save share':>10}")
    for name, records in rows.items():
        timed = [r for r in records[args.warmup:] if "checkpoint_s" not in r]
        step = float(np.mean([r["step_time_s"] for r in timed]))
        phases = [float(np.mean([r[key] for r in timed])) for key in ("data_wait_s", "fwd_bwd_s", "optim_s")]
        save = float(np.mean([r["checkpoint_s"] for r in records if "checkpoint_s" in r]))
        cells = " ".join(f"{p * 1e3:7.1f} ms {p / step:5.1%}" for p in phases)
        print(f"  {name:<18} {cells} {step * 1e3:6.0f} ms {np.mean([r['tokens_per_s'] for r in timed]):9.0f} "
              f"{save * 1e3:4.0f} ms {save / (every * step + save):10.2%}")
    print(f"  (save share = one checkpoint save / (checkpoint.every_steps={every} steps + the save); "
          "targets: data wait < 1 % of a step, saves < 2 % of wall time)")


def common_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    geometry = GEOMETRIES[args.geometry]
    seq, micro = geometry["seq_len"], geometry["micro"]
    return [f"model.init_from={model(out, args.geometry)}", f"data.path={shards(out, seq)}", f"data.seq_len={seq}",
            f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * args.grad_accum * args.nproc}",
            f"train.max_steps={args.steps + 1}", "train.max_tokens=0", "checkpoint.every_steps=1000000",
            "checkpoint.save_hf=false", "log.tensorboard=false", "optim.warmup_steps=10", "optim.lr=1e-4",
            "data.num_workers=2", *args.set]


def distill(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from shortened.modeling import train_flops_per_token

    out = Path(args.out)
    seq = GEOMETRIES[args.geometry]["seq_len"]
    teacher_geometry, teacher_layers = TEACHERS[args.geometry]
    student, teacher = model(out, args.geometry), model(out, teacher_geometry, teacher_layers)
    common = [*common_overrides(args, out), "deepspeed_config=ds_configs/zero2_bf16.json"]
    plain = run("plain", out, args.nproc, common, args.steps)[args.warmup:args.steps]
    kd = run("kd", out, args.nproc, [*common, f"distill.teacher={teacher}"], args.steps)[args.warmup:args.steps]
    student_flops = train_flops_per_token(AutoConfig.from_pretrained(student), seq)
    teacher_flops = train_flops_per_token(AutoConfig.from_pretrained(teacher), seq) / 3
    bound = 1 + teacher_flops / student_flops
    print(f"\n{args.geometry} student, {teacher_layers}-block teacher: seq {seq}, grad-accum {args.grad_accum}, "
          f"{args.nproc} rank(s), mean of steps {args.warmup + 1}..{args.steps}")
    print(f"  {'variant':<8} {'tok/s/GPU':>10} {'MFU':>7} {'step s':>8} {'teacher s':>10} {'peak GB':>8}")
    for name, records in (("plain", plain), ("kd", kd)):
        mfu = [r["mfu"] for r in records if r["mfu"] is not None]
        print(f"  {name:<8} {np.mean([r['tokens_per_s_per_gpu'] for r in records]):10.0f} "
              f"{f'{np.mean(mfu):.1%}' if mfu else '-':>7} {np.mean([r['step_time_s'] for r in records]):8.3f} "
              f"{np.mean([r['teacher_s'] for r in records]):10.3f} {max(r['memory_gb'] for r in records):8.1f}")
    ratio = np.mean([r["step_time_s"] for r in kd]) / np.mean([r["step_time_s"] for r in plain])
    print(f"  KD step / plain step: {ratio:.2f}x measured, FLOP bound 1 + N_teacher/(3 N_student) = {bound:.2f}x")


def throughput(args: argparse.Namespace) -> None:
    geometry = GEOMETRIES[args.geometry]
    out = Path(args.out)
    seq, micro = geometry["seq_len"], geometry["micro"]
    common = common_overrides(args, out)
    rows = []
    for stage in (2, 1):
        for recompute in (False, True):
            name = f"zero{stage}-{'ckpt' if recompute else 'nockpt'}"
            records = run(name, out, args.nproc, [*common, f"deepspeed_config=ds_configs/zero{stage}_bf16.json",
                                                  f"model.activation_checkpointing={str(recompute).lower()}"],
                          args.steps)
            timed = records[args.warmup:args.steps]
            mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
            rows.append((name, np.mean([r["tokens_per_s"] for r in timed]),
                         np.mean([r["tokens_per_s_per_gpu"] for r in timed]), np.mean(mfu) if mfu else None,
                         np.mean([r["step_time_s"] for r in timed]), max(r["memory_gb"] for r in timed)))
    base = rows[0][2]
    print(f"\n{args.geometry}: seq {seq}, micro {micro}, grad-accum {args.grad_accum}, {args.nproc} rank(s), "
          f"mean of steps {args.warmup + 1}..{args.steps}")
    print(f"  {'variant':<14} {'tokens/s':>10} {'tok/s/GPU':>10} {'vs zero2':>9} {'MFU':>7} {'step s':>8} "
          f"{'peak GB':>8}")
    for name, tps, per_gpu, mfu, step, memory in rows:
        mfu_text = f"{mfu:.1%}" if mfu is not None else "-"
        print(f"  {name:<14} {tps:10.0f} {per_gpu:10.0f} {per_gpu / base:8.2f}x {mfu_text:>7} {step:8.3f} "
              f"{memory:8.1f}")


def kernels(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from shortened.modeling import train_flops_per_token

    out = Path(args.out)
    seq = GEOMETRIES[args.geometry]["seq_len"]
    teacher_geometry, teacher_layers = TEACHERS[args.geometry]
    common = [*common_overrides(args, out), "deepspeed_config=ds_configs/zero2_bf16.json"]
    names = args.variants.split(",") if args.variants else list(KERNEL_VARIANTS)
    teacher = model(out, teacher_geometry, teacher_layers) if any(KERNEL_VARIANTS[n][1] for n in names) else None
    results: dict[str, list[dict] | str] = {}
    for name in names:
        extra, distils = KERNEL_VARIANTS[name]
        results[name] = try_run(name, out, args.nproc,
                                [*common, *extra, *([f"distill.teacher={teacher}"] if distils else [])], args.steps)
    bound = None
    if teacher is not None:
        bound = 1 + (train_flops_per_token(AutoConfig.from_pretrained(teacher), seq) / 3
                     / train_flops_per_token(AutoConfig.from_pretrained(model(out, args.geometry)), seq))
    print(f"\n{args.geometry}: seq {seq}, micro {GEOMETRIES[args.geometry]['micro']}, grad-accum {args.grad_accum}, "
          f"{args.nproc} rank(s), mean of steps {args.warmup + 1}..{args.steps}; base: eager, ZeRO-2, no document "
          f"mask, plain" + (f"; KD: {teacher_layers}-block teacher, FLOP bound {bound:.2f}x" if bound else ""))
    print(f"  {'variant':<14} {'tok/s/GPU':>10} {'vs eager':>9} {'MFU':>7} {'step s':>8} {'peak GB':>8} "
          f"{'KD/plain':>9} {'vs bound':>9}")
    steps = {name: _mean_step(r[args.warmup:args.steps]) for name, r in results.items() if not isinstance(r, str)}
    for name, records in results.items():
        if isinstance(records, str):
            print(f"  {name:<14} not run: {_error_line(records)}")
            continue
        print(f"  {name:<14} {_kernel_cells(records[args.warmup:args.steps], steps, name, bound)}")


def _mean_step(records: list[dict]) -> float:
    return float(np.mean([r["step_time_s"] for r in records]))


def _kernel_cells(timed: list[dict], steps: dict[str, float], name: str, bound: float | None) -> str:
    per_gpu = float(np.mean([r["tokens_per_s_per_gpu"] for r in timed]))
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    vs_eager = f"{steps['eager'] / steps[name]:8.2f}x" if "eager" in steps else f"{'-':>9}"
    cells = (f"{per_gpu:10.0f} {vs_eager} {f'{np.mean(mfu):.1%}' if mfu else '-':>7} {steps[name]:8.3f} "
             f"{max(r['memory_gb'] for r in timed):8.1f}")
    plain = name.removesuffix("kd").removesuffix("+") or "eager"
    if not KERNEL_VARIANTS[name][1] or plain not in steps or bound is None:
        return cells
    ratio = steps[name] / steps[plain]
    return f"{cells} {ratio:8.2f}x {ratio / bound:8.2f}x"


def _error_line(output: str) -> str:
    """The trainer's one `error:` line (a refused setting), else the output's last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("breakdown", "throughput", "distill", "kernels"))
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "train_step"))
    parser.add_argument("--steps", type=int, default=0, help="breakdown: default 2 checkpoint intervals; "
                                                              "throughput: default 30")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (GPUs, or CPU processes)")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--variants", default="", help=f"kernels: comma-separated, of {','.join(KERNEL_VARIANTS)} "
                                                        "(default all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mode == "breakdown":
        breakdown(args)
    else:
        args.steps = args.steps or 30
        {"throughput": throughput, "distill": distill, "kernels": kernels}[args.mode](args)


if __name__ == "__main__":
    main()
