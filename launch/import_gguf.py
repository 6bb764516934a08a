"""Import a llama-architecture GGUF file (llama.cpp's format, any quantization) as a Hugging Face model directory.

    python launch/import_gguf.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m

The weights are dequantized by transformers' own GGUF loader; the tokenizer (tokenizer.json, tokenizer_config.json,
chat template) is saved beside them, and import_report.json last. Stock AutoModelForCausalLM / AutoTokenizer load
the result, and so does every command of this project.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened import cli  # noqa: E402
from shortened.gguf_import import DTYPES, GgufImportError, import_gguf  # noqa: E402 (no torch until the import)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the .gguf file (general.architecture must be llama)")
    parser.add_argument("--out", required=True, help="the model directory to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the saved weights' dtype (default: float32: the dequantized values unrounded)")
    parser.add_argument("--document-token", metavar="TOKEN",
                        help="the token the base model's pretraining ended each document with, when it is not the "
                             "file's EOS (an instruct model's EOS ends a chat turn): data prep frames documents with "
                             "it (document_tokens.json; docs/shard-format.md)")
    args = parser.parse_args(argv)
    import_gguf(args.gguf, args.out, args.dtype, args.document_token)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, (GgufImportError, OSError)))  # not a llama GGUF; a missing file, an unwritable --out
