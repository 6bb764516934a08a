"""A llama-architecture GGUF file (llama.cpp's format) as a Hugging Face model directory.

The weights are dequantized by transformers' own GGUF loader, so the model is exactly the one
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` gives; what this adds is the check that the file is a
llama GGUF before transformers sees it (its own errors come as tracebacks from deep inside), dropping the
quantization config (transformers refuses to save a model that carries it, and the saved weights are dense), the
tokenizer saved beside the weights (tokenizer.json, tokenizer_config.json, chat_template.jinja) and checked to load
with this project's `load_tokenizer`, and `import_report.json` (written last, as the directory's completion marker).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shortened.fsutil import file_sha256, read_marker, remove_tree, seal_directory, sealed_damage
from shortened.tokenizer import DOCUMENT_TOKENS_FILE, TokenizerNotFound, load_tokenizer

ARCHITECTURE = "llama"  # the one architecture the rest of the system prunes and trains
REPORT_FILE = "import_report.json"
DTYPES = ("float32", "bfloat16")


class GgufImportError(ValueError):
    """The file is not a llama GGUF this importer can read, or the output cannot be written; the message says which."""


@dataclass(frozen=True)
class GgufSummary:
    """What the file's header says about the model, read without loading a weight."""

    architecture: str
    blocks: int
    hidden: int
    vocab: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors stored in it
    tied: bool  # no separate output matrix: llama.cpp writes `output.weight` only when it is not the embedding
    tokens: tuple[str, ...] = field(repr=False)

    def describe(self) -> str:
        types = ", ".join(f"{count} {name}" for name, count in self.tensor_types.items())
        return (f"{self.architecture}, {self.blocks} blocks, hidden {self.hidden}, vocabulary {self.vocab:,}, "
                f"{'tied' if self.tied else 'untied'} embeddings; tensors: {types}")


def read_summary(path: Path) -> GgufSummary:
    """The header of a llama GGUF with a tokenizer; anything else is a GgufImportError naming the file."""
    import gguf  # here, not at the top: checking a finished import (`imported_report`) needs no numpy

    try:
        reader = gguf.GGUFReader(path)
    except ValueError as err:  # the reader's word for a wrong magic number, an empty or a truncated file
        raise GgufImportError(f"{path}: not a GGUF file ({err})") from None
    architecture = _field(path, reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise GgufImportError(f"{path}: a {architecture!r} GGUF; only {ARCHITECTURE!r} models are imported")
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise GgufImportError(f"{path}: the file has no tokenizer (tokenizer.ggml.tokens), which the model needs")
    tensor_names = {tensor.name for tensor in reader.tensors}
    return GgufSummary(
        architecture=architecture,
        blocks=int(_field(path, reader, f"{ARCHITECTURE}.block_count")),
        hidden=int(_field(path, reader, f"{ARCHITECTURE}.embedding_length")),
        vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        tensor_types=dict(Counter(tensor.tensor_type.name for tensor in reader.tensors).most_common()),
        tied="output.weight" not in tensor_names,
        tokens=tuple(reader.fields["tokenizer.ggml.tokens"].contents()),
    )


def _field(path: Path, reader: Any, key: str) -> Any:
    value = reader.fields.get(key)
    if value is None:
        raise GgufImportError(f"{path}: the file's metadata has no {key}")
    return value.contents()


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32",
                document_token: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write `out_dir` as a Hugging Face model of `gguf_file` in `dtype`; returns the import report.

    `document_token`: the token the base model's pretraining ended each document with, when it is not the file's
    EOS (an instruct model's EOS ends a chat turn); it is written to `document_tokens.json`, from which this
    project frames plain text (docs/shard-format.md, "Document framing").
    """
    source, out = Path(gguf_file), Path(out_dir)
    if dtype not in DTYPES:
        raise GgufImportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if not source.is_file():
        raise GgufImportError(f"{source}: no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GgufImportError(f"{out} already exists; remove it or choose another --out")
    summary = read_summary(source)
    if document_token is not None and document_token not in summary.tokens:
        raise GgufImportError(f"--document-token {document_token!r} is not a token of {source}'s vocabulary")
    log(f"importing {source}: {summary.describe()}")
    staging = out.with_name(f".{out.name}.partial")  # a killed import leaves no directory that looks like a model
    remove_tree(staging)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    parameters = _save_model(source, staging, dtype)
    dequantized = time.perf_counter() - started
    _save_tokenizer(source, staging, document_token)
    seconds = time.perf_counter() - started
    report = {"format_version": 1, "source": str(source.resolve()), "source_bytes": source.stat().st_size,
              "source_sha256": file_sha256(source), "architecture": summary.architecture,
              "tensor_types": summary.tensor_types, "dtype": dtype, "parameters": parameters,
              "tie_word_embeddings": summary.tied, "document_token": document_token,
              "seconds": round(seconds, 1), "versions": _versions()}
    seal_directory(staging, REPORT_FILE, report)
    if out.exists():
        out.rmdir()  # empty, checked above: the rename below needs the name free
    os.replace(staging, out)
    log(f"imported {parameters / 1e6:.1f}M parameters ({dtype}) into {out} in {seconds:.1f} s "
        f"(dequantized in {dequantized:.1f} s)")
    return report


def imported_report(out_dir: str | Path) -> dict[str, Any] | None:
    """The report of a complete import in `out_dir` (every file it lists there, at its size), else None."""
    report = read_marker(Path(out_dir), REPORT_FILE)
    return report if report is not None and sealed_damage(Path(out_dir), report) is None else None


def _save_model(source: Path, out: Path, dtype: str) -> int:
    """The dequantized model saved into `out`, without its quantization config; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    # dequantize=True: with the `kernels` package installed transformers would otherwise keep the weights packed.
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=str(source.resolve()),
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 dtype=getattr(torch, dtype), local_files_only=True)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    return sum(parameter.numel() for parameter in model.parameters())  # a tied matrix is one parameter, counted once


def _save_tokenizer(source: Path, out: Path, document_token: str | None) -> None:
    """The file's tokenizer as transformers converts it (tokenizer.json + config + chat template), checked to load
    with this project's reader."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=str(source.resolve()))
    tokenizer.save_pretrained(out)
    if document_token is not None:
        (out / DOCUMENT_TOKENS_FILE).write_text(
            json.dumps({"bos_token": document_token, "eos_token": document_token}, indent=2) + "\n")
    try:
        load_tokenizer(out)
    except TokenizerNotFound as err:
        raise GgufImportError(f"{source}: its tokenizer does not load as this project reads it ({err})") from None


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "gguf")}
