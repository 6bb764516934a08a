"""Evaluation cost, measured side by side in one run.

1. Inline evaluation as a share of training wall time at an interval of --every-steps optimizer steps: the time of
   one training step (forward, backward, AdamW) of the model and the time of one full suite evaluation
   (the configured tasks, --limit rows/windows each), share = eval / (every_steps * step + eval).
   The watcher runs in its own process on other devices: its share of the training job's time is 0 by construction.
2. Perplexity throughput: predicted tokens/s of our windowed scorer vs lm-eval's own loglikelihood_rolling path
   (HFLM, same model, same 128-token windows, same batch size) on the same WikiText-2 text.

    python bench/eval_cost.py                       # tiny Llama on CPU (the CI box)
    python bench/eval_cost.py --layers 24 --hidden 4096 --intermediate 11008 --heads 32 --device cuda \\
        --dtype bfloat16 --micro-batch 2 --seq-len 2048 --limit 0       # a 5.5B pruned-Vicuna geometry on a GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_seconds(model, device: str, micro_batch: int, seq_len: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (micro_batch, seq_len), device=device)
    times = []
    for _ in range(steps + 1):  # the first step pays allocation and kernel selection
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    del opt
    return sum(times[1:]) / steps


def suite_seconds(model, config, tokenizer_file: Path, device: str) -> tuple[float, list[dict]]:
    from shortened.eval.suite import EvalSuite

    suite = EvalSuite(config, tokenizer_file)
    suite.run(model)  # warm: dataset caches, tokenised perplexity windows (an inline evaluator keeps both)
    _sync(device)
    start = time.perf_counter()
    rows = suite.run(model)
    _sync(device)
    return time.perf_counter() - start, rows


def ppl_throughput(model, tokenizer_file: Path, windows: int, batch_size: int, device: str,
                   repeats: int = 3) -> tuple[float, float]:
    """(ours, lm-eval) predicted tokens per second on the first `windows` 128-token windows of WikiText-2.

    The two alternate `repeats` times and each keeps its fastest run, so a busy shared machine slows neither alone.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from shortened.eval.hf_tokenizer import SentencePieceHFTokenizer
    from shortened.eval.mirror import read_rows
    from shortened.eval.perplexity import make_windows, perplexity, stream_ids
    from shortened.tokenizer import load_tokenizer

    text = "\n\n".join(r["text"] for r in read_rows(DATA / "eval" / "wikitext2" / "test.jsonl"))
    cut = make_windows(stream_ids(load_tokenizer(tokenizer_file), [text], ""), 128)[:windows]
    tok = SentencePieceHFTokenizer(tokenizer_file)
    piece = tok.decode(cut.reshape(-1)[1:].tolist())  # the same tokens as text; lm-eval tokenises it itself
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=128)
    request = [Instance("loglikelihood_rolling", {}, (piece,), idx=0)]
    theirs_tokens = len(lm.tok_encode(piece))
    model.eval()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, run in enumerate((lambda: perplexity(model, cut, batch_size),
                                 lambda: lm.loglikelihood_rolling(request, disable_tqdm=True))):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return windows * 127 / best[0], theirs_tokens / best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=176)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--every-steps", type=int, default=500, help="the evaluation interval, in optimizer steps")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on this rank")
    parser.add_argument("--limit", type=int, default=50,
                        help="rows per task / perplexity windows (0: the whole mirror)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ppl-windows", type=int, default=64)
    args = parser.parse_args(argv)

    from shortened.config import EvalConfig
    from shortened.modeling import build_tiny_llama

    tokenizer_file = DATA / "llama-tokenizer" / "tokenizer.model"
    model = build_tiny_llama(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_heads=args.heads, num_kv_heads=args.heads)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {args.layers} layers x {args.hidden} hidden, {params:.1f}M "
          f"params, {args.dtype} on {args.device}; torch threads {torch.get_num_threads()}")

    step = step_seconds(model, args.device, args.micro_batch, args.seq_len, args.train_steps) * args.grad_accum
    config = EvalConfig(data_dir=str(DATA / "eval"), limit=args.limit, batch_size=args.batch_size)
    evaluation, rows = suite_seconds(model, config, tokenizer_file, args.device)
    interval = args.every_steps * step
    print(f"training step ({args.grad_accum} x {args.micro_batch} x {args.seq_len} tokens): {step:.3f} s")
    print(f"one evaluation ({', '.join(config.tasks)}; limit {args.limit or 'none'}): {evaluation:.1f} s")
    for r in rows:
        if r["primary"]:
            print(f"    {r['task']:>15} {r['seconds']:7.2f} s  {r['status']}")
    print(f"inline share at every {args.every_steps} steps: {evaluation / (interval + evaluation):.2%} "
          f"(training {interval:.0f} s + evaluation {evaluation:.1f} s)")
    print("watch share: 0 (the watcher is its own process on other devices; the trainer only writes the HF checkpoint)")

    ours, theirs = ppl_throughput(model, tokenizer_file, args.ppl_windows, args.batch_size, args.device)
    print(f"perplexity tokens/s: ours {ours:,.0f}, lm-eval loglikelihood_rolling {theirs:,.0f}, "
          f"ratio {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
