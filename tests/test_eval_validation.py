"""Validation loss on shards made by the real data prep of the shared SlimPajama validation split."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.shards import open_shards
from shortened.eval.suite import EvalSuite
from shortened.eval.validation import spread
from shortened.modeling import build_tiny_llama

from eval_support import eval_config


@pytest.fixture(scope="module")
def validation_shards(tmp_path_factory, slimpajama_sample, tokenizer_model):
    out = tmp_path_factory.mktemp("val") / "shards"
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="validation", tokenizer=str(tokenizer_model),
                                 output=str(out), seq_len=128, progress=False, verbose=False))
    return out


def test_validation_loss_is_the_mean_next_token_loss(validation_shards, tokenizer_model):
    model = build_tiny_llama(seed=4, num_layers=2)
    rows = EvalSuite(eval_config([], limit=5, batch_size=2), tokenizer_model,
                     validation_path=validation_shards).run(model)
    [row] = rows
    shards = open_shards(validation_shards)
    n = len(shards)
    spread_ids = [i * n // 5 for i in range(5)]  # the limit's 5 sequences, spread over the split: not a few documents
    assert n > 50 and spread_ids[-1] >= n * 4 // 5
    with torch.no_grad():  # Hugging Face's own mean loss per sequence, averaged over equally long sequences
        ids = [torch.as_tensor(shards[i])[None] for i in spread_ids]
        expected = sum(model(input_ids=x, labels=x).loss.item() for x in ids) / 5
        first = sum(model(input_ids=x, labels=x).loss.item() for x in (torch.as_tensor(shards[i])[None]
                                                                         for i in range(5))) / 5
    assert (row["task"], row["metric"], row["status"], row["sequences"]) == ("validation", "loss", "ok", "spread")
    assert row["samples"] == 5 * 127 and abs(row["value"] - expected) < 1e-5
    assert abs(row["value"] - first) > 1e-3  # the first five are other text


@pytest.mark.parametrize("count", [1, 2, 7, 10, 128, 1092])
def test_a_limit_takes_sequences_spread_evenly_over_the_split(count):
    for limit in range(0, count + 3):
        ids = spread(count, limit)
        if limit == 0 or limit >= count:
            assert ids.tolist() == list(range(count))
            continue
        assert len(ids) == limit and ids[0] == 0 and ids.tolist() == sorted(set(ids.tolist()))
        gaps = np.diff(np.append(ids, count))  # the last one's gap runs to the end of the split
        assert gaps.max() - gaps.min() <= 1  # as even as whole indices allow


def test_shards_of_another_tokenizer_are_refused(validation_shards, tmp_path, tokenizer_model):
    copy = tmp_path / "shards"
    shutil.copytree(validation_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    suite = EvalSuite(eval_config([], limit=2), tokenizer_model, validation_path=copy)
    [row] = suite.run(build_tiny_llama(num_layers=2))
    assert row["status"] == "failed" and "tokenizer sha256" in row["error"] and "manifest.json" in row["error"]
