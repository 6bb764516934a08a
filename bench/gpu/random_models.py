"""Random-weight Vicuna-7B geometries (32 blocks, and pruned depths) saved as Hugging Face models, for benchmarks.

    python bench/gpu/random_models.py --out bench_out/gpu/models --layers 32 26 12

Speed and memory do not depend on the weights, so no checkpoint has to be downloaded. Built on the GPU (seconds)
when there is one; kept when already there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT.parent / "shared" / "data" / "llama-tokenizer" / "tokenizer.model"

from shortened.modeling import save_with_tokenizer, vicuna_7b_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 26, 17, 12, 6])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for layers in args.layers:
        path = Path(args.out) / f"vicuna-{layers}"
        if (path / "config.json").is_file():
            continue
        torch.manual_seed(layers)
        with torch.device(device):
            model = LlamaForCausalLM(vicuna_7b_config(layers)).to(torch.bfloat16)
        save_with_tokenizer(model, path, TOKENIZER)
        print(f"saved {path} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters)")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
