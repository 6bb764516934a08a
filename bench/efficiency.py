"""Generation efficiency of original vs pruned models: latency, throughput and peak memory, side by side.

    python bench/efficiency.py --model vicuna-7b --model pruned-5.5b [--model ...]
    python bench/efficiency.py --tiny-pair --batch-sizes 1 16 --output-lens 32   # CPU, self-contained

As in Shortened LLaMA's efficiency figures: greedy generation of exactly L new tokens (L = 128, 512) after a short
prompt, for batch sizes 1 ... 256, with the KV cache. Latency is the wall time of one `generate` call; throughput
is batch * L / latency. Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's peak resident
memory (sampled every 5 ms) on CPU. Each model runs in its own child process so one model's memory never counts
against another's. Ratios are against the first --model. A GPU out-of-memory is recorded as "OOM", as in the paper.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DEFAULT_OUTPUT_LENS = [128, 512]
PROMPT_TEXT = ROOT.parent / "shared" / "data" / "eval" / "wikitext2" / "test.jsonl"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="HF model directory; repeat, first = baseline")
    parser.add_argument("--tiny-pair", action="store_true",
                        help="benchmark a tiny Llama against itself pruned by launch/prune.py (CPU smoke run)")
    parser.add_argument("--tiny-layers", type=int, default=8)
    parser.add_argument("--tiny-hidden", type=int, default=256)
    parser.add_argument("--tiny-remove", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--output-lens", type=int, nargs="+", default=DEFAULT_OUTPUT_LENS)
    parser.add_argument("--prompt-len", type=int, default=12, help="prompt tokens (real WikiText-2 text)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point; the median is reported")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="", help="also write every measurement to this JSON file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: measure one model
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- one model


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled by a thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def prompt_ids(model_dir: Path, length: int) -> list[int]:
    from shortened.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    text = " ".join(json.loads(line)["text"].strip() for line in PROMPT_TEXT.open() if line.strip())
    return [tokenizer.bos_id] + tokenizer.encode(text[:20 * length])[: length - 1]


def generate_once(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(latency seconds, peak memory bytes) of one greedy generate of exactly `new_tokens` tokens."""
    cuda = prompt.device.type == "cuda"
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=model.config.eos_token_id, attention_mask=torch.ones_like(prompt))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss, torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        latency = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens, "generation stopped early"
    return latency, float(torch.cuda.max_memory_allocated() if cuda else rss.peak)


def measure_model(model_dir: Path, args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    from shortened.prune.hf_model import load_causal_lm, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_causal_lm(model_dir, dtype, device)
    ids = torch.tensor(prompt_ids(model_dir, args.prompt_len), device=device)
    generate_once(model, ids[None], 4)  # warm-up: kernels, allocator, lazy init
    records = []
    # Smallest KV cache first: on CPU the allocator keeps what it once held, so peak RSS only grows point to point.
    points = sorted(((length, batch) for length in args.output_lens for batch in args.batch_sizes),
                    key=lambda p: (p[1] * (args.prompt_len + p[0]), p))
    for length, batch in tqdm(points, desc=model_dir.name, unit="point"):
        record = {"model": str(model_dir), "layers": model.config.num_hidden_layers,
                  "params": sum(p.numel() for p in model.parameters()), "batch": batch, "output_len": length,
                  "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        try:
            runs = [generate_once(model, ids.expand(batch, -1).contiguous(), length) for _ in range(args.repeats)]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            records.append({**record, "status": "OOM"})
            continue
        latency = sorted(r[0] for r in runs)[len(runs) // 2]
        records.append({**record, "status": "ok", "latency_s": latency, "tokens_per_s": batch * length / latency,
                        "peak_mem_gib": max(r[1] for r in runs) / 2**30,
                        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"})
    return records


# ---------------------------------------------------------------------------------------------- driver


def make_tiny_pair(args: argparse.Namespace, workdir: Path) -> list[Path]:
    """A tiny Llama and the same model with blocks removed by the real pruning command."""
    from shortened.modeling import build_tiny_llama, save_with_tokenizer

    tokenizer = ROOT.parent / "shared" / "data" / "llama-tokenizer" / "tokenizer.model"
    model = build_tiny_llama(seed=0, num_layers=args.tiny_layers, hidden_size=args.tiny_hidden,
                             intermediate_size=args.tiny_hidden * 11 // 4, num_heads=max(1, args.tiny_hidden // 64),
                             num_kv_heads=max(1, args.tiny_hidden // 64))
    original = save_with_tokenizer(model, workdir / f"tiny-{args.tiny_layers}L", tokenizer)
    pruned = workdir / f"tiny-{args.tiny_layers - args.tiny_remove}L"
    subprocess.run([sys.executable, str(ROOT / "launch" / "prune.py"), "--model", str(original), "--out",
                    str(pruned), "--criterion", "magnitude", "--remove", str(args.tiny_remove), "--no-protect",
                    "--calib", str(PROMPT_TEXT)], check=True, env=_child_env(), stdout=subprocess.DEVNULL)
    return [original, pruned]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_worker(model_dir: Path, argv: list[str]) -> list[dict]:
    """Measure one model in a fresh process so its peak memory is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        subprocess.run([sys.executable, __file__, *argv, "--worker", str(model_dir), "--json", handle.name],
                       check=True, env=_child_env())
        return json.loads(Path(handle.name).read_text())


def print_table(records: list[dict], baseline: str) -> None:
    base = {(r["batch"], r["output_len"]): r for r in records if r["model"] == baseline}
    print(f"\n{'model':<28}{'L':>5}{'batch':>6}{'latency s':>11}{'tok/s':>10}{'peak GiB':>10}"
          f"{'speedup':>9}{'thru x':>8}{'mem x':>7}")
    for r in records:
        b = base[(r["batch"], r["output_len"])]
        name = Path(r["model"]).name[-27:]
        if r["status"] != "ok":
            print(f"{name:<28}{r['output_len']:>5}{r['batch']:>6}{'OOM':>11}")
            continue
        ratios = ("", "", "") if b["status"] != "ok" else (
            f"{b['latency_s'] / r['latency_s']:.2f}", f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}",
            f"{r['peak_mem_gib'] / b['peak_mem_gib']:.2f}")
        print(f"{name:<28}{r['output_len']:>5}{r['batch']:>6}{r['latency_s']:>11.3f}{r['tokens_per_s']:>10.1f}"
              f"{r['peak_mem_gib']:>10.3f}{ratios[0]:>9}{ratios[1]:>8}{ratios[2]:>7}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        records = measure_model(Path(args.worker), args)
        Path(args.json).write_text(json.dumps(records))
        return 0
    if not args.tiny_pair and len(args.model) < 2:
        print("error: give at least two --model directories (original first) or --tiny-pair", file=sys.stderr)
        return 2
    child_argv = ["--batch-sizes", *map(str, args.batch_sizes), "--output-lens", *map(str, args.output_lens),
                  "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats), "--dtype", args.dtype,
                  "--device", args.device]
    with tempfile.TemporaryDirectory() as workdir:
        models = make_tiny_pair(args, Path(workdir)) if args.tiny_pair else [Path(m) for m in args.model]
        records = [r for model in models for r in run_worker(model, child_argv)]
    import platform

    import psutil

    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
               else f"CPU {platform.machine()}, {os.cpu_count()} cores, "
                    f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU")
    print(f"machine: {machine}; torch {torch.__version__}; prompt {args.prompt_len} tokens; greedy, KV cache")
    records.sort(key=lambda r: (r["output_len"], r["batch"]))
    print_table(records, str(models[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
