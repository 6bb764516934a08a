"""Peak memory of one training micro-step's plain next-token loss: chunked (`shortened.train.chunked_loss`, what
`NextTokenObjective` computes) against the full-logit loss it replaced, with the 32,000 (LLaMA / Vicuna) and 128,256
(Llama-3) vocabularies, side by side in one run.

    python bench/loss_memory.py [--batch 2] [--seq-len 2048] [--hidden H] [--chunk 1024] [--dtype fp32|bf16]
                                [--vocab 32000 128256]

One step is the loss's forward and backward from random final hidden states [batch, seq_len, hidden] and a random
LM head [vocab, hidden], both requiring gradients as the model's do; the blocks cost the same either way and are
left out. Full-logit: the head over every position in the training dtype, then transformers' `ForCausalLMLoss` with
labels = input_ids, which upcasts all logits to fp32 (what `LlamaForCausalLM(labels=...)` ran). Chunked:
`next_token_loss(chunk_size=--chunk)`. Each variant and vocabulary runs in its own subprocess, so none inherits
another's freed-but-kept pages. Measured by bench/distill_memory.py's `measure_peak`: on CUDA
`torch.cuda.max_memory_allocated` minus the allocation before the step; on CPU the rise of the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs once the inputs exist) over its RSS before the step.

Defaults: hidden 4096 and bf16 on CUDA (the training dtype); hidden 1024 and fp32 on CPU, where bf16 has no kernels
on AVX2 and 4096-wide matmuls over 128k rows take minutes. The logits, which are what the variants differ in, are
[batch * (seq_len - 1), vocab] regardless. A full-logit step that would not fit in the memory available now is
skipped, and says so.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from distill_memory import available_bytes, measure_peak

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCABS = (32_000, 128_256)
FULL_FP32_COPIES = 5  # fp32 [positions, V] tensors the full-logit step may hold at once (logits, softmax, grads)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def child(args: argparse.Namespace) -> None:
    """One variant's step at one vocabulary, in this process; prints its peak as JSON."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from shortened.train.chunked_loss import next_token_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    generator = torch.Generator(device=device).manual_seed(0)
    vocab, hidden_size = args.vocab, args.hidden
    hidden = torch.randn(args.batch, args.seq_len, hidden_size, device=device, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator) / hidden_size ** 0.5).to(dtype)
    hidden.requires_grad_(), weight.requires_grad_()
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device, generator=generator)

    def loss_of(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if args.child == "chunked":
            return next_token_loss(hidden, weight, input_ids, chunk_size=args.chunk)
        logits = torch.nn.functional.linear(hidden, weight)  # LlamaForCausalLM's lm_head
        return ForCausalLMLoss(logits, input_ids, vocab_size=weight.shape[0])

    # The first matmul and softmax load code and thread buffers that are no part of the step's own memory: a step
    # with a 64-token vocabulary first, small enough to leave nothing behind for the real step to reuse.
    small = [hidden[:1, :4].detach().clone().requires_grad_(), weight[:64].detach().clone().requires_grad_()]
    loss_of(*small, input_ids[:1, :4] % 64).backward()
    del small
    peak, seconds, loss = measure_peak(lambda: loss_of(hidden, weight, input_ids), device)
    print(json.dumps({"peak": peak, "seconds": seconds, "loss": loss, "device": device.type}))


def run_variant(variant: str, vocab: int, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", variant, "--vocab", str(vocab), "--batch", str(args.batch),
            "--seq-len", str(args.seq_len), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
            "--dtype", args.dtype]
    result = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=None, help="default: 4096 on CUDA, 1024 on CPU")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk size (train.loss_chunk_size)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--child", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.vocab = args.vocab[0]
        child(args)
        return
    import torch

    cuda = torch.cuda.is_available()
    args.hidden = args.hidden or (4096 if cuda else 1024)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    positions = args.batch * (args.seq_len - 1)
    method = ("torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) rise") + ", one subprocess per variant"
    print(f"plain next-token loss step (forward + backward) at batch {args.batch} x seq_len {args.seq_len} = "
          f"{positions:,} predicted positions, hidden {args.hidden}, {args.dtype}, chunk {args.chunk}; "
          f"measured: {method}")
    for vocab in args.vocab:
        logits = positions * vocab * 4
        chunked = run_variant("chunked", vocab, args)
        print(f"vocab {vocab:>7,} (one fp32 copy of the logits {logits / 2**30:.2f} GiB): chunked peak "
              f"{chunked['peak'] / 2**20:7.0f} MiB ({chunked['seconds']:.1f} s, loss {chunked['loss']:.5f})", end="")
        need, free = FULL_FP32_COPIES * logits, available_bytes()
        if need > 0.8 * free:
            print(f"; full-logit skipped: it needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is "
                  "available now")
            continue
        full = run_variant("full", vocab, args)
        print(f", full-logit peak {full['peak'] / 2**20:7.0f} MiB ({full['seconds']:.1f} s, loss "
              f"{full['loss']:.5f}): full / chunked {full['peak'] / chunked['peak']:.1f}x")


if __name__ == "__main__":
    main()
