"""data.document_mask under every attention kernel: a micro-batch of 2 packed rows from the real shards, through
the trainer's inputs (`model_inputs`) and loss (`NextTokenObjective`), against each document run alone.

flash-attn does not run on a CPU, so for flash_attention_2 only the kernel itself is replaced, by a plain-torch
reference (causal attention per sequence); everything that decides how it is called is transformers' own: the real
Llama forward, `_flash_attention_forward` choosing between its dense, varlen and position-id paths, and
`_is_packed_sequence` / `prepare_fa_kwargs_from_position_ids` for what transformers itself would take as packed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as fa_utils

from shortened.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from shortened.data.loader import build_train_loader
from shortened.modeling import build_tiny_llama
from shortened.train.loop import document_mask_inputs, model_inputs
from shortened.train.metrics import PhaseTimer
from shortened.train.objective import NextTokenObjective

CPU = torch.device("cpu")
CROP = 512
CHUNK = 300  # does not divide the 2 x 511 predicted positions


@pytest.fixture(scope="module")
def batch(sample_shards):
    """The loader's first micro-batch of 2 rows whose first CROP positions hold at least 3 documents each (the row's
    first, and two that start after it), cut to those positions: the full 2048 make each forward's 32k-vocabulary
    logits 0.5 GB, which is only slower, not different."""
    loader = build_train_loader(sample_shards, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_world_size=1,
                                seed=1234, document_mask=True)
    batch = next(b for b in loader if all(int((row[:CROP] == 0).sum()) >= 3 for row in b["position_ids"]))
    return {key: batch[key][:, :CROP] for key in ("input_ids", "position_ids")}


@pytest.fixture(scope="module")
def model():
    # grouped-query attention (4 query heads, 2 key/value heads), as Llama-3 and SmolLM2 have
    return build_tiny_llama(seed=0, num_layers=2, num_heads=4, num_kv_heads=2)


def documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document of one row: where its position ids restart."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [len(position_ids)]))


@pytest.fixture(scope="module")
def alone(batch, model):
    """Every row's logits with each of its documents run by itself, and the trainer's loss of those logits (HF's
    shifted cross-entropy with labels=input_ids, as before the chunked loss: the prediction across a boundary
    counts, from the previous document's logits)."""
    ids = batch["input_ids"]
    with torch.no_grad():
        logits = torch.stack([torch.cat([model(input_ids=row[None, start:end]).logits[0]
                                         for start, end in documents(positions)])
                              for row, positions in zip(ids, batch["position_ids"])])
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return logits, loss


class Engine:
    """What the objectives use of a DeepSpeed engine: calling it, and `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)


def run_config(kernel: str, document_mask: bool = True) -> RunConfig:
    return RunConfig(model=ModelConfig(attn_implementation=kernel), data=DataConfig(document_mask=document_mask),
                     train=TrainConfig(max_steps=1))


def trainer_logits_and_loss(model, batch, varlen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the trainer's inputs, and the loss of the trainer's objective on them (whose hooks stay on
    `model`: a model of its own per test)."""
    inputs = model_inputs(batch, CPU, varlen)
    with torch.no_grad():
        logits = model(**inputs).logits
        objective = NextTokenObjective(Engine(model), CHUNK)
        loss = objective(Engine(model), inputs, PhaseTimer(CPU, sync=False)).total
    return logits, loss


def assert_matches_alone(logits, loss, alone) -> None:
    expected_logits, expected_loss = alone
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * float(expected_loss)


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex_attention"])
def test_eager_sdpa_and_flex_score_each_document_as_if_alone(batch, alone, kernel):
    model = build_tiny_llama(seed=0, num_layers=2, num_heads=4, num_kv_heads=2)  # the `model` fixture's weights
    model.set_attn_implementation(kernel)
    varlen = document_mask_inputs(run_config(kernel), model)
    assert not varlen  # transformers builds the block-causal mask from the position ids
    assert_matches_alone(*trainer_logits_and_loss(model, batch, varlen), alone)


class ReferenceFlash:
    """flash-attn's dense and varlen functions in plain torch (causal softmax attention per sequence), recording
    which one transformers calls and with what bounds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int] | None]] = []

    def dense(self, q, k, v, causal=True, softmax_scale=None):  # [B, S, heads, D]
        self.calls.append(("dense", None))
        return self._attend(q, k, v, causal, softmax_scale)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=True,
               softmax_scale=None):  # [total, heads, D]
        bounds = cu_seqlens_q.tolist()
        self.calls.append(("varlen", bounds))
        assert cu_seqlens_k.tolist() == bounds and max_seqlen_q == max_seqlen_k == max(
            end - start for start, end in zip(bounds, bounds[1:]))
        return torch.cat([self._attend(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
                          for a, b in zip(bounds, bounds[1:])])

    @staticmethod
    def _attend(q, k, v, causal, scale):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)


@pytest.fixture(params=["flash_attention_2", "flash_attention_3"])
def flash_model(request, monkeypatch):
    """A tiny Llama whose attention is transformers' flash-attention path, on the reference kernel."""
    kernel = ReferenceFlash()
    monkeypatch.setattr(fa_utils, "_lazy_imports", lambda *args, **kwargs: (
        kernel.dense, kernel.varlen, None, fa_utils._pad_input, fa_utils._unpad_input))
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # forget any kernel loaded before
    model = build_tiny_llama(seed=0, num_layers=2, num_heads=4, num_kv_heads=2)
    model.config._attn_implementation = request.param  # set_attn_implementation would look for flash-attn
    return model, kernel


def test_flash_attention_gets_every_document_as_a_varlen_sequence(batch, alone, flash_model):
    model, kernel = flash_model
    positions = batch["position_ids"]
    varlen = document_mask_inputs(run_config(model.config._attn_implementation), model)
    assert varlen
    # The bounds are those transformers itself takes from the micro-batch packed into one row, the form its
    # position-id path recognises (`_is_packed_sequence`, true only for a batch of one row).
    packed = positions.reshape(1, -1)
    assert fa_utils._is_packed_sequence(packed, batch_size=1)
    (cu_seq_lens, _), (longest, _) = fa_utils.prepare_fa_kwargs_from_position_ids(packed)
    inputs = model_inputs(batch, CPU, varlen)
    assert torch.equal(inputs["cu_seq_lens_q"], cu_seq_lens) and inputs["max_length_q"] == int(longest)
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"] and inputs["max_length_k"] == inputs["max_length_q"]

    logits, loss = trainer_logits_and_loss(model, batch, varlen)
    assert {call for call, _ in kernel.calls} == {"varlen"}
    assert all(bounds == cu_seq_lens.tolist() for _, bounds in kernel.calls)
    assert len(kernel.calls) == 2 * model.config.num_hidden_layers  # every layer, in both forwards
    assert_matches_alone(logits, loss, alone)


def test_flash_attention_with_position_ids_alone_attends_across_documents(batch, alone, flash_model):
    """What the trainer fed flash attention before: position ids only. For 2 rows transformers does not see them as
    packed and runs the dense kernel, causal over each whole row."""
    model, kernel = flash_model
    assert not fa_utils._is_packed_sequence(batch["position_ids"], batch_size=2)
    with torch.no_grad():
        logits = model(**model_inputs(batch, CPU)).logits
    assert {call for call, _ in kernel.calls} == {"dense"}
    assert (logits - alone[0]).abs().max() > 1e-3


def test_a_kernel_that_cannot_mask_is_refused_naming_both_settings():
    model = build_tiny_llama(seed=0, num_layers=1)
    model.config._attn_implementation = "paged|eager"  # what transformers may resolve to; no packed-sequence mask
    with pytest.raises(ConfigError, match=r"data\.document_mask.*model\.attn_implementation=sdpa"):
        document_mask_inputs(run_config("sdpa"), model)
    assert not document_mask_inputs(run_config("sdpa", document_mask=False), model)
