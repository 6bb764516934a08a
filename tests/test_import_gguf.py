"""The GGUF importer (launch/import_gguf.py): tiny llama GGUFs written here with the `gguf` package (F32 with an untied
head, Q8_0 with a tied one) import to models whose logits are transformers' own GGUF load's; other files are refused
with one line. The real model `make models` imports is tests/test_smollm2.py's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.tokenizer import copy_tokenizer, load_tokenizer

from conftest import ROOT, launcher, subprocess_env

pytestmark = pytest.mark.timeout(300)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's first three ids
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. In 2024 the model read 3.14 pages of text, "
        "then wrote them again: the quick fox, the lazy dog, and the pages.")
HIDDEN, HEADS, KV_HEADS, FFN, BLOCKS = 64, 4, 2, 128, 2


def byte_level_bpe() -> tuple[list[str], list[str]]:
    """A small byte-level BPE (tokens by id, merges), the SmolLM2 special tokens first, as llama.cpp stores GPT-2
    style vocabularies (`tokenizer.ggml.model = gpt2`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_llama_gguf(path: Path, qtype: gguf.GGMLQuantizationType, tied: bool, seed: int = 0) -> Path:
    """A 2-block llama with grouped-query attention and a tokenizer, its matrices stored as `qtype` (norms F32, as
    llama.cpp keeps them); `tied` leaves out output.weight, which is how llama.cpp marks a tied head."""
    tokens, merges = byte_level_bpe()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(BLOCKS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (len(tokens), HIDDEN)
    for i in range(BLOCKS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
                   f"blk.{i}.attn_k.weight": (kv, HIDDEN), f"blk.{i}.attn_v.weight": (kv, HIDDEN),
                   f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            weight = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    _write(writer)
    return path


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def import_main(*args: str | Path) -> None:
    assert launcher("launch/import_gguf.py").main([str(a) for a in args]) == 0


def refused(*args: str | Path) -> str:
    """The importer run as users run it, expected to refuse: its stderr, one `error:` line."""
    result = subprocess.run([sys.executable, ROOT / "launch" / "import_gguf.py", *map(str, args)],
                            capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("qtype, tied", [(gguf.GGMLQuantizationType.F32, False),
                                         (gguf.GGMLQuantizationType.Q8_0, True)], ids=["f32-untied", "q8_0-tied"])
def test_import_matches_transformers_gguf_load(tmp_path, qtype, tied):
    source = write_llama_gguf(tmp_path / "tiny.gguf", qtype, tied)
    import_main("--gguf", source, "--out", tmp_path / "hf")

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name).eval()
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(TEXT, return_tensors="pt").input_ids.tolist()
    assert ids.tolist()[0] == load_tokenizer(tmp_path / "hf").encode(TEXT)  # and this project reads it the same
    with torch.no_grad():
        assert relative_error(imported(ids).logits, reference(ids).logits) <= 1e-5

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["tie_word_embeddings"], config["num_key_value_heads"]) == (tied, KV_HEADS)
    assert (imported.lm_head.weight is imported.model.embed_tokens.weight) == tied
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    report = json.loads((tmp_path / "hf" / "import_report.json").read_text())
    assert qtype.name in report["tensor_types"] and report["tie_word_embeddings"] == tied


def test_bfloat16_and_document_token(tmp_path):
    source = write_llama_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.F32, tied=True)
    import_main("--gguf", source, "--out", tmp_path / "hf", "--dtype", "bfloat16", "--document-token", "<|endoftext|>")
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name)
    assert imported.dtype == torch.bfloat16
    assert torch.equal(imported.model.embed_tokens.weight, reference.model.embed_tokens.weight.to(torch.bfloat16))
    # Documents are framed with <|endoftext|>; the chat side (AutoTokenizer, our chat template) keeps the file's
    tokenizer = load_tokenizer(tmp_path / "hf")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 0)
    assert tokenizer.chat_template.special_tokens["eos_token"] == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
    (tmp_path / "copy").mkdir()  # as pruning, checkpoints and exports copy a tokenizer
    copy_tokenizer(tokenizer.path, tmp_path / "copy")
    assert (load_tokenizer(tmp_path / "copy").bos_id, load_tokenizer(tmp_path / "copy").eos_id) == (0, 0)


def test_refusals_are_one_line(tmp_path):
    other = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    other.add_block_count(1)
    other.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    _write(other)
    assert "a 'gpt2' GGUF; only 'llama' models are imported" in refused("--gguf", tmp_path / "gpt2.gguf",
                                                                         "--out", tmp_path / "a")
    (tmp_path / "notes.gguf").write_text("not a model\n")
    assert "not a GGUF file" in refused("--gguf", tmp_path / "notes.gguf", "--out", tmp_path / "b")
    tiny = write_llama_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.F32, tied=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    assert "already exists" in refused("--gguf", tiny, "--out", tmp_path / "taken")
    assert "is not a token" in refused("--gguf", tiny, "--out", tmp_path / "c", "--document-token", "<s>")
    assert not any((tmp_path / name).exists() for name in "abc")
