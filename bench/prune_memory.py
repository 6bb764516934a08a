"""Peak memory of Taylor block scoring: every block's fp32 weights and gradients at once (the way before, written
here as the baseline) against `shortened.prune.importance.taylor_scores` (one block at a time in fp32, the rest
of the model in its own bf16), side by side in one run; then the same arithmetic for Vicuna-7B and Llama-3-8B.

    python bench/prune_memory.py [--hidden 2048 --intermediate 5504 --heads 16 --blocks 16 --vocab 32000]
                                 [--samples 10 --seq-len 128 --batch-size 10] [--score-blocks N]

Model: a random Llama (seed 0, ~0.94B parameters by default) built directly in bf16, as a bf16 checkpoint loads;
the baseline converts it to fp32 parameter by parameter, as loading it in fp32 would. Calibration: random token
windows, all in one batch by default (`--batch-size 10`, as `--calib-batch-size`'s default). Both approaches
autocast to bf16, as `launch/prune.py --dtype auto` does on a GPU. CPU only. Each approach runs in its own
subprocess, so neither inherits the other's pages. Measured: the child's peak resident memory,
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (the whole process: interpreter, torch, model, scoring), and its RSS
once the model is built, before scoring. The block-at-a-time child also counts the bytes autograd saves for block
0's backward (distinct storages, the model's own parameters left out) to check the activation term of the
projection.

Block 0's pass is the block-at-a-time peak: its graph spans every block, later blocks' graphs are shorter and the
weights are the same size. Each block costs a forward and backward of the model, so `--score-blocks N` scores blocks
0 .. N-1 only (the default: all). On a CPU without bf16 kernels (AVX2 only) bf16 runs far too slowly for a 1B model
(one 256-token block pass had not finished after 14 minutes); `--dtype float32` then builds and scores the model in
fp32 on both sides, which measures the gradients' share of the saving but not the bf16 weights'.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
# Bytes per token and vocabulary entry live at once in the loss besides the saved fp32 log-softmax: the bf16 logits,
# their fp32 copy, the log-softmax's gradient.
LOGIT_BYTES = 2 + 4 + 4
GPU_GIB = 40
PROJECTION_TOKENS = 10 * 128  # the published calibration (10 samples x 128 tokens), in one batch as by default
CUDA_RESERVE_GIB = 2  # CUDA context and caching-allocator slack, which are not in the sums below


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.blocks, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=2048, tie_word_embeddings=False)


PROJECTED = (
    Shape("Vicuna-7B", hidden=4096, intermediate=11008, blocks=32, heads=32, kv_heads=32, vocab=32_000),
    Shape("Llama-3-8B", hidden=4096, intermediate=14336, blocks=32, heads=32, kv_heads=8, vocab=128_256),
)


def activation_bytes(shape: Shape) -> int:
    """Bytes autograd saves per token in a frozen bf16 block downstream of the scored one (measured by
    `saved_tensor_bytes` on small models, torch 2.13): the fp32 copy each RMSNorm makes of its input (2 x 4h) and
    its fp32 rsqrt (2 x 4), what attention saves (q, k, v and output in bf16, the fp32 log-sum-exp per head), and the
    MLP's gate, up and SiLU(gate) (3 x 2i). A frozen linear saves no input. k and v are counted at full width, as
    when transformers repeats them for sdpa: an upper bound for grouped-query attention."""
    h, i = shape.hidden, shape.intermediate
    return 8 * h + 8 + 4 * 2 * h + 4 * shape.heads + 6 * i


def projection(shape: Shape, tokens: int) -> dict[str, float]:
    """Bytes of each term for scoring `shape` with `tokens` calibration tokens in one batch."""
    from shortened.modeling import block_param_count, param_count

    config = shape.config()
    total, block = param_count(config), block_param_count(config)
    # Saved for backward: every block's activations (block 0's graph spans them all), what the scored block saves
    # besides (its linears' bf16 inputs and its RMSNorms' bf16 inputs: 10h + 2i), the final norm's fp32 copy and
    # the fp32 log-softmax.
    h = shape.hidden
    saved = tokens * (shape.blocks * activation_bytes(shape) + 10 * h + 2 * shape.intermediate + 4 * h
                      + 4 * shape.vocab)
    loss = tokens * LOGIT_BYTES * shape.vocab
    return {
        "params": total,
        "bf16 weights": 2 * total,
        "one block fp32 + grad + cast": 10 * block,  # fp32 copy, its fp32 gradient, the bf16 cast autocast keeps
        "block cast": 2 * block,
        "saved activations": saved,
        "logits and loss": loss,
        "bounded": 2 * total + 10 * block + saved + loss,
        "fp32 weights": 4 * total,
        "all blocks' grads": 4 * shape.blocks * block,
        "all blocks' bf16 casts": 2 * shape.blocks * block,
        # autocast caches the casts for the whole run; backward frees a block's activations before the earlier
        # blocks' gradients arrive, so at least the larger of the two is live at once (activations: fp32 residual
        # stream there, so these are a floor)
        "all at once (at least)": 4 * total + 2 * shape.blocks * block + max(4 * shape.blocks * block, saved + loss),
    }


# ------------------------------------------------------------------------------------------- the two approaches


def all_blocks_at_once(model, windows, batch_size: int, dtype) -> list[float]:
    """The baseline, as taylor_scores did before: fp32 weights, every block's weights requiring grad at once,
    fp32 gradients accumulated in .grad over all batches, autocast to `dtype`."""
    import torch
    import torch.nn.functional as F

    for p in model.parameters():
        p.requires_grad_(False)
    blocks = list(model.model.layers)
    for block in blocks:
        block.requires_grad_(True)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    compute = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with compute:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            (loss / tokens).backward()
    with torch.no_grad():
        return [sum((p.double() * p.grad.double()).abs().sum().item() for p in block.parameters())
                for block in blocks]


@contextlib.contextmanager
def saved_tensor_bytes(model) -> Iterator[dict[int, int]]:
    """Distinct storages autograd saves for backward inside, by address, the model's parameters left out."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and not (tensor.is_leaf and tensor.requires_grad):
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


def one_block_at_a_time(model, windows, batch_size: int, dtype, score_blocks: int) -> tuple[list[float], int]:
    """`taylor_block_score` of blocks 0 .. score_blocks - 1 and the bytes saved for block 0's backward."""
    from shortened.prune.importance import taylor_block_score

    with saved_tensor_bytes(model) as seen:
        scores = [taylor_block_score(model, 0, windows, batch_size, dtype)]
    scores += [taylor_block_score(model, b, windows, batch_size, dtype) for b in range(1, score_blocks)]
    return scores, sum(seen.values())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One approach, in this process; prints its figures as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_config(bench_shape(args).config(), dtype=dtype).eval()
    if args.child == "all-at-once":
        model.float()  # parameter by parameter: the peak stays near the fp32 model, as loading it in fp32
    windows = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    built = rss_bytes()
    start = time.perf_counter()
    saved = 0
    if args.child == "all-at-once":
        scores = all_blocks_at_once(model, windows, args.batch_size, dtype)[: args.score_blocks]
    else:
        scores, saved = one_block_at_a_time(model, windows, args.batch_size, dtype, args.score_blocks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "built": built, "seconds": time.perf_counter() - start, "scores": scores,
                      "saved_block0": saved}))


# ------------------------------------------------------------------------------------------------------ parent


def bench_shape(args: argparse.Namespace) -> Shape:
    return Shape("bench", hidden=args.hidden, intermediate=args.intermediate, blocks=args.blocks, heads=args.heads,
                 kv_heads=args.heads, vocab=args.vocab)


def run_child(approach: str, argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv, "--child", approach], check=True,
                            stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def print_projection(shape: Shape, tokens: int) -> None:
    terms = projection(shape, tokens)
    print(f"\n{shape.name} ({shape.blocks} blocks, hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"{shape.kv_heads} KV heads, vocab {shape.vocab}; {terms['params'] / 1e9:.2f}B parameters), "
          f"{tokens:,} calibration tokens in one batch:")
    for key in ("bf16 weights", "one block fp32 + grad + cast", "saved activations", "logits and loss", "bounded",
                "fp32 weights", "all blocks' grads", "all blocks' bf16 casts", "all at once (at least)"):
        print(f"  {key:<30} {terms[key] / GIB:7.2f} GiB")
    for key in ("bounded", "all at once (at least)"):
        verdict = "fits" if terms[key] / GIB <= GPU_GIB - CUDA_RESERVE_GIB else "does not fit"
        print(f"  {key}: {verdict} a {GPU_GIB} GB GPU (keeping {CUDA_RESERVE_GIB} GiB for CUDA and the allocator)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="model and compute dtype of the block-at-a-time way (float32: fast on a CPU without bf16 "
                             "kernels, but then only the gradients differ between the two ways)")
    parser.add_argument("--score-blocks", type=int, default=None, help="score blocks 0 .. N-1 (default: all)")
    parser.add_argument("--child", choices=["all-at-once", "one-block"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.score_blocks = args.score_blocks or args.blocks
    if args.child:
        child(args)
        return

    shape = bench_shape(args)
    tokens = args.samples * args.seq_len
    expected = projection(shape, min(tokens, args.batch_size * args.seq_len))
    print(f"random Llama: {shape.blocks} blocks, hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"{shape.heads} heads, vocab {shape.vocab}: {expected['params'] / 1e9:.2f}B parameters, built in "
          f"{args.dtype}; calibration {args.samples} x {args.seq_len} random tokens, batch {args.batch_size}, "
          f"compute {args.dtype}, CPU; "
          "measured: ru_maxrss of each approach's own subprocess")
    argv = sys.argv[1:]
    bounded = run_child("one-block", argv)
    formula = expected["saved activations"] + expected["block cast"]  # the projection's terms, bf16 compute only
    print(f"one block at a time: peak {bounded['peak'] / GIB:6.2f} GiB (model built: {bounded['built'] / GIB:.2f} "
          f"GiB), {len(bounded['scores'])} blocks scored in {bounded['seconds']:.0f} s; saved for block 0's backward "
          f"{bounded['saved_block0'] / GIB:.2f} GiB"
          + (f" (projection's bf16 terms: {formula / GIB:.2f} GiB)" if args.dtype == "bfloat16" else ""))
    need, free = expected["all at once (at least)"], available_bytes()
    if need > 0.8 * free:
        print(f"all blocks at once: skipped, it needs at least {need / GIB:.1f} GiB and {free / GIB:.1f} GiB is "
              "available now")
    else:
        baseline = run_child("all-at-once", argv)
        print(f"all blocks at once:  peak {baseline['peak'] / GIB:6.2f} GiB (model built: "
              f"{baseline['built'] / GIB:.2f} GiB), scored in {baseline['seconds']:.0f} s")
        print(f"ratio all at once / one block at a time: {baseline['peak'] / bounded['peak']:.2f}x")
        drift = max(abs(a - b) / abs(b) for a, b in zip(bounded["scores"], baseline["scores"]) if b)
        print(f"scores of blocks 0..{len(bounded['scores']) - 1}: largest relative difference between the two "
              f"ways {drift:.2e}")
    for projected in PROJECTED:
        print_projection(projected, PROJECTION_TOKENS)


if __name__ == "__main__":
    main()
