"""Save a tiny random Llama (real 32k LLaMA vocabulary) with the LLaMA tokenizer, to try the trainer on a CPU.

    python launch/tiny_model.py --tokenizer ../shared/data/llama-tokenizer/tokenizer.model --out runs/tiny-model
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model to save beside the weights")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from shortened.modeling import build_tiny_llama, save_with_tokenizer  # after parsing: --help needs no torch

    model = build_tiny_llama(seed=args.seed, num_layers=args.layers, hidden_size=args.hidden,
                             intermediate_size=args.hidden * 11 // 4)
    save_with_tokenizer(model, args.out, args.tokenizer)
    print(f"saved a {args.layers}-layer, hidden-{args.hidden} Llama to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, (OSError,)))  # a missing tokenizer file, an unwritable --out
