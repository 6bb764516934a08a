"""The perplexity protocol against a hand computation: the joined text, one <s>, 128-token windows, partial dropped."""
from __future__ import annotations

import math

import numpy as np
import sentencepiece as spm
import torch

from shortened.eval.mirror import read_rows
from shortened.eval.perplexity import make_windows, perplexity, stream_ids
from shortened.eval.suite import EvalSuite
from shortened.modeling import build_tiny_llama
from shortened.tokenizer import load_tokenizer

from conftest import EVAL_DATA
from eval_support import eval_config


def _hand_ppl(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Window by window, token by token, with Hugging Face's own loss: exp(mean over every predicted token)."""
    losses = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = torch.tensor([ids[start:start + seq_len]])
        with torch.no_grad():
            mean = model(input_ids=window, labels=window).loss.item()  # HF shifts: tokens 1..seq_len-1
        losses.append(mean * (seq_len - 1))
    return math.exp(sum(losses) / (len(losses) * (seq_len - 1))), len(losses)


def test_windows_bos_and_partial_window_rule(tokenizer_model):
    tok = load_tokenizer(tokenizer_model)
    texts = ["The tower is 324 metres tall.", "", "It was the first structure to reach 300 metres."]
    ids = stream_ids(tok, texts, "\n\n")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    joined = "The tower is 324 metres tall.\n\n\n\nIt was the first structure to reach 300 metres."
    assert ids.tolist() == [1] + sp.encode(joined)
    windows = make_windows(ids, 8)
    assert windows.shape == (len(ids) // 8, 8) and len(ids) % 8  # this text leaves a partial window ...
    assert windows.reshape(-1).tolist() == ids[: windows.size].tolist()  # ... which is dropped
    assert windows[0, 0] == 1 and (windows[1:, 0] != 1).all()  # one <s>, for the stream, not per window


def test_perplexity_matches_hand_computation(tokenizer_model):
    model = build_tiny_llama(seed=5, num_layers=2)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    text = " ".join(["A small text, scored in short windows so that the rule for the last one matters."] * 6)
    ids = [1] + sp.encode(text)
    assert len(ids) % 16
    expected, n_windows = _hand_ppl(model, ids, 16)
    got = perplexity(model, make_windows(np.asarray(ids), 16), batch_size=3)
    assert got.tokens == n_windows * 15
    assert abs(got.ppl - expected) / expected < 1e-5


def test_suite_wikitext2_and_ptb_follow_the_protocol(tokenizer_model):
    model = build_tiny_llama(seed=6, num_layers=2)
    rows = EvalSuite(eval_config(["wikitext2", "ptb"], limit=3), tokenizer_model).run(model)
    ppl = {r["task"]: r for r in rows if r["metric"] == "ppl"}
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    sources = (("wikitext2", "wikitext2/test.jsonl", "text"), ("ptb", "ptb/validation.jsonl", "sentence"))
    for task, file, field in sources:
        text = "\n\n".join(row[field] for row in read_rows(EVAL_DATA / file))
        head = [1] + sp.encode(text[:4000])[:3 * 128]  # the first 3 windows need only the start of the stream
        expected, _ = _hand_ppl(model, head[: 3 * 128], 128)
        assert ppl[task]["status"] == "ok" and ppl[task]["samples"] == 3 * 127
        assert abs(ppl[task]["value"] - expected) / expected < 1e-5, task
