"""Peak memory of one distillation loss step, chunked (`shortened.train.distill_loss`) against the full-logit loss,
side by side in one run.

    python bench/distill_memory.py [--batch 2] [--seq-len 2048] [--hidden 1024] [--chunk 1024] [--temperature 2]

One step is the loss's forward and backward from random final hidden states of a student and a teacher (the models
themselves are left out: they cost the same either way) with the real 32000-token vocabulary, kd_weight 0.5,
ce_weight 0.5. Each variant runs in its own subprocess, so that neither inherits the other's freed-but-kept pages.
Measured: on CUDA, `torch.cuda.max_memory_allocated` minus the allocation before the step (the caching allocator's
own count); on CPU, the rise of the process's peak RSS (VmHWM, reset with /proc/self/clear_refs once the inputs
exist) over its RSS before the step. tracemalloc cannot see torch's CPU allocator, hence RSS there.

Hidden size: 4096 (Vicuna-7B) on CUDA, 1024 on CPU by default, where the 4096-wide matmuls alone take minutes;
the logits, which are what the two variants differ in, are [B * (S - 1), 32000] regardless. The full-logit variant
needs about 8 fp32 logit tensors at once (7 GiB at 2 x 2048): it is skipped, and says so, when that does not fit
in the memory available now, rather than push the machine into swapping or the OOM killer.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCAB = 32_000
NAIVE_LOGIT_COPIES = 8  # fp32 [positions, V] tensors the full-logit step holds at its peak (measured: about 7)


def naive_losses(student_hidden, student_weight, teacher_hidden, teacher_weight, input_ids, *, kd_weight: float,
                 ce_weight: float, temperature: float):
    """The textbook loss: every logit of both models at once, in fp32."""
    import torch.nn.functional as F

    student = (student_hidden[:, :-1].float() @ student_weight.float().T).flatten(0, 1)
    teacher = (teacher_hidden[:, :-1].float() @ teacher_weight.float().T).flatten(0, 1)  # needs no grad: no graph
    kd = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(student, input_ids[:, 1:].flatten())
    return kd_weight * kd + ce_weight * ce


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One variant's step, in this process; prints its peak as JSON."""
    import torch

    from shortened.train.distill_loss import distillation_losses

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq_len, args.hidden)
    student_hidden = torch.randn(shape, device=device, generator=generator).requires_grad_()
    teacher_hidden = torch.randn(shape, device=device, generator=generator)
    weight = (torch.randn(VOCAB, args.hidden, device=device, generator=generator) / args.hidden ** 0.5)
    weight.requires_grad_()
    teacher_weight = torch.randn(VOCAB, args.hidden, device=device, generator=generator) / args.hidden ** 0.5
    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq_len), device=device, generator=generator)
    kwargs = dict(kd_weight=0.5, ce_weight=0.5, temperature=args.temperature)
    if args.child == "chunked":
        step = functools.partial(distillation_losses, chunk_size=args.chunk)
    else:
        step = naive_losses

    def loss_of(student_hidden, weight, teacher_hidden, teacher_weight, input_ids) -> torch.Tensor:
        out = step(student_hidden, weight, teacher_hidden, teacher_weight, input_ids, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.total

    # The first matmul and softmax load code and thread buffers that are no part of the step's own memory: a step
    # with a 64-token vocabulary first, small enough to leave nothing behind for the real step to reuse.
    small = [tensor[:1, :4] if tensor.dim() == 3 else tensor[:64] for tensor in
             (student_hidden, weight, teacher_hidden, teacher_weight)]
    small = [tensor.detach().clone().requires_grad_(tensor.requires_grad) for tensor in small]
    loss_of(*small, input_ids[:1, :4] % 64).backward()
    del small
    peak, seconds, loss = measure_peak(lambda: loss_of(student_hidden, weight, teacher_hidden, teacher_weight,
                                                       input_ids), device)
    print(json.dumps({"peak": peak, "seconds": seconds, "loss": loss, "device": device.type}))


def measure_peak(loss_step, device) -> tuple[int, float, float]:
    """(peak bytes above the allocation before, seconds, loss value) of `loss_step()` and its backward: on CUDA the
    caching allocator's count, on CPU the rise of the process's peak RSS (VmHWM, reset here)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
        before = rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    loss = loss_step()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = rss_kib("VmHWM") * 1024 - before
    return peak, time.perf_counter() - start, float(loss.detach())


def available_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--temperature", str(args.temperature)]
    result = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=None, help="default: 4096 on CUDA, 1024 on CPU")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--child", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.hidden is None:
        args.hidden = 4096 if torch.cuda.is_available() else 1024
    if args.child:
        child(args)
        return

    positions = args.batch * (args.seq_len - 1)
    logits = positions * VOCAB * 4
    measurement = ("torch.cuda.max_memory_allocated" if torch.cuda.is_available()
                   else "peak RSS (VmHWM) rise, one subprocess per variant")
    print(f"loss step (forward + backward) at batch {args.batch} x seq_len {args.seq_len} = {positions:,} predicted "
          f"positions, vocab {VOCAB}, hidden {args.hidden}, T {args.temperature}, fp32; one model's full logits "
          f"{logits / 2**30:.2f} GiB; measured: {measurement}")
    chunked = run_variant("chunked", args)
    print(f"chunked (chunk {args.chunk}): peak {chunked['peak'] / 2**20:8.0f} MiB, {chunked['seconds']:.1f} s, "
          f"loss {chunked['loss']:.5f}")
    need, free = NAIVE_LOGIT_COPIES * logits, available_bytes()
    if need > 0.8 * free:
        print(f"full-logit: skipped, it needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is available "
              "now (try a smaller --batch / --seq-len)")
        return
    naive = run_variant("naive", args)
    print(f"full-logit:         peak {naive['peak'] / 2**20:8.0f} MiB, {naive['seconds']:.1f} s, "
          f"loss {naive['loss']:.5f}")
    print(f"ratio full-logit / chunked: {naive['peak'] / chunked['peak']:.1f}x")


if __name__ == "__main__":
    main()
