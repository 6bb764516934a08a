"""The tokenizer loader: SentencePiece files and directories, tokenizer.json directories, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, normalizers

from shortened.tokenizer import TokenizerNotFound, load_tokenizer


def test_sentencepiece_file_and_directory_give_llama_ids(tmp_path, tokenizer_model):
    shutil.copyfile(tokenizer_model, tmp_path / "tokenizer.model")
    for source in (tokenizer_model, tmp_path):
        tok = load_tokenizer(source)
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32_000, 1, 2)
        assert tok.encode("Hello  I am") == [15043, 29871, 306, 626]  # SentencePiece's split of a double space
        assert tok.sha256 == "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"


def test_tokenizer_json_directory(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "ab": 7}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("a", "b")], unk_token="<unk>"))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("ab") == [6, 5]


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(TokenizerNotFound, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerNotFound, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing.model")
