"""The LLaMA protocol in lm-eval: SentencePiece's ids and exactly one <s> in front of every request."""
from __future__ import annotations

import json

import sentencepiece as spm
import torch

from shortened.eval.hf_tokenizer import SentencePieceHFTokenizer
from shortened.eval.zero_shot import build_lm
from shortened.modeling import build_tiny_llama

from conftest import EVAL_DATA


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_ids_equal_sentencepiece_on_every_mirror_string(tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tok = SentencePieceHFTokenizer(tokenizer_model)
    texts = [s for path in sorted(EVAL_DATA.glob("*/*.jsonl")) if path.parent.name not in ("wikitext2", "ptb")
             for line in path.read_text().splitlines() for s in _strings(json.loads(line))]
    texts += ["Hello  world", " leading", "a <s> b </s>", "tab\there", "emoji \U0001F600 ok", ""]
    assert len(texts) > 5000
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [1] + ids, text  # one <s>, added explicitly, never from the text itself
    assert tok.decode([1]) == "<s>" and tok.decode([1, 15043, 2]) == "<s>Hello</s>"


def test_transformers_own_tokenizer_is_not_llamas(tokenizer_model, tmp_path):
    """Why the adapter exists: transformers 5 builds a tokenizer from tokenizer.model that drops the dummy prefix."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    stock = AutoTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert stock.encode("Hello world") != [1] + sp.encode("Hello world")


def test_lm_eval_scores_bos_plus_sentencepiece_ids(tokenizer_model):
    """lm-eval's loglikelihood of a (context, continuation) equals the sum computed by hand on <s> + SP ids."""
    from lm_eval.api.instance import Instance

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    model = build_tiny_llama(seed=3, num_layers=2)
    lm = build_lm(model, tokenizer_model, batch_size=4)
    pairs = [("Question: Is the sky blue?\nAnswer:", " yes"), ("The cat sat on the", " mat and  purred"),
             ("Goal: open a jar\nAnswer:", " twist the lid counter-clockwise")]
    assert lm.tok_encode(pairs[0][0]) == [1] + sp.encode(pairs[0][0])
    requests = [Instance("loglikelihood", {}, pair, idx=0) for pair in pairs]
    scored = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, scored):
        whole = [1] + sp.encode(context + continuation)
        n_context = 1 + len(sp.encode(context))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        expected = sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole)))
        assert abs(logprob - expected) < 1e-4, (context, logprob, expected)
