"""bf16, the precision of the recipes, where the other trainer tests run in fp32 (CPUs without AVX-512 emulate bf16
~5.8x slower): a run stopped and resumed in new processes gives the uninterrupted loss trace bit for bit, and its
exported model reproduces the trained weights. On CPUs with bf16 kernels test_train_dist.py runs all in bf16."""
from __future__ import annotations

from pathlib import Path

import pytest

from shortened.train import checkpoint as ckpt

from train_support import (
    GLOBAL_BATCH,
    PRECISION,
    SEQ,
    check_export_reproduces_the_master_weights,
    overrides,
    read_log,
    run_ok,
    same,
    warm,
)

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(PRECISION == "bf16", reason="test_train_dist.py trains in bf16 on this CPU")]
STEPS = 4


def bf16(run_dir: Path, shards: Path, model: Path, *extra: str) -> list[str]:
    return overrides(run_dir, shards, model, "train.precision=bf16", f"train.max_tokens={STEPS * GLOBAL_BATCH * SEQ}",
                     "checkpoint.every_steps=2", *extra)


def test_bf16_resume_is_bitwise_and_the_export_reproduces_the_weights(tmp_path, train_shards_64, tiny_init_model,
                                                                       tokenizer_model):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(warm(2, bf16(straight, train_shards_64, tiny_init_model), tmp_path / "straight.out"))
    run_ok(warm(2, bf16(resumed, train_shards_64, tiny_init_model, "train.max_steps=2"), tmp_path / "a.out"))
    output = run_ok(warm(2, bf16(resumed, train_shards_64, tiny_init_model), tmp_path / "b.out"))
    assert "resuming from" in output and "step_00000002" in output
    a, b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert same(x, y), (x, y)
    final = ckpt.checkpoints_root(straight) / ckpt.tag_for(STEPS)
    check_export_reproduces_the_master_weights(final, tmp_path, tiny_init_model, train_shards_64, tokenizer_model)
