"""The chunked next-token loss (plain CPT) against the full-logit cross-entropy, on a real tiny Llama with the 32k
vocabulary: values, gradients, memory and host synchronisations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_testing import BATCH, CHUNK, SEQ_LEN, HostSyncs, MatmulDtypes, PeakLiveBytes, packed_batch, relative_error

from shortened.modeling import LLAMA_VOCAB_SIZE, build_tiny_llama
from shortened.train.chunked_loss import next_token_loss


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=0, num_layers=2)


@pytest.fixture(scope="module")
def batch():
    return packed_batch()


def loss_and_grads(model, input_ids, position_ids, loss_of_hidden):
    """`loss_of_hidden(final hidden states)` and its gradient w.r.t. every parameter of the model."""
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    loss = loss_of_hidden(hidden)
    names, params = zip(*model.named_parameters())
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, params)))


def full_logit_loss(model, input_ids, valid=None):
    """The reference: every logit at once in fp32 through torch's cross_entropy, labels shifted as HF does."""
    def loss(hidden):
        logits = (hidden[:, :-1] @ model.lm_head.weight.T).float().reshape(-1, LLAMA_VOCAB_SIZE)
        target = input_ids[:, 1:].reshape(-1)
        if valid is not None:
            target = target.masked_fill(~valid.reshape(-1), -100)
        return F.cross_entropy(logits, target, ignore_index=-100)
    return loss


def assert_close_with_grads(ours, reference):
    (loss, grads), (expected, expected_grads) = ours, reference
    assert abs(float(loss) - float(expected)) <= 1e-5 * abs(float(expected)), (loss, expected)
    for name, grad in expected_grads.items():
        assert grad.norm() > 0, name
        assert relative_error(grads[name], grad) <= 1e-5, name


@pytest.mark.parametrize("document_mask", [False, True], ids=["plain", "document_mask"])
def test_matches_full_logit_cross_entropy_and_its_gradients(model, batch, document_mask):
    input_ids, position_ids = batch
    position_ids = position_ids if document_mask else None
    chunked = loss_and_grads(model, input_ids, position_ids,
                             lambda h: next_token_loss(h, model.lm_head.weight, input_ids, chunk_size=CHUNK))
    assert_close_with_grads(chunked, loss_and_grads(model, input_ids, position_ids, full_logit_loss(model, input_ids)))
    # ...which is what Hugging Face's own loss gives for labels=input_ids (the trainer's labels before this loss)
    with torch.no_grad():
        hf = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids, use_cache=False).loss
    assert abs(float(chunked[0]) - float(hf)) <= 1e-5 * float(hf)


def test_a_valid_mask_counts_like_ignored_labels(model, batch):
    input_ids, position_ids = batch
    valid = position_ids[:, 1:] != 0  # e.g. no prediction across a document boundary
    valid[0, :5] = False
    chunked = loss_and_grads(model, input_ids, position_ids, lambda h: next_token_loss(
        h, model.lm_head.weight, input_ids, chunk_size=CHUNK, valid=valid))
    assert_close_with_grads(chunked, loss_and_grads(model, input_ids, position_ids,
                                                    full_logit_loss(model, input_ids, valid)))


def test_tied_head_gets_both_gradients(batch):
    """A tied model (SmolLM2's layout): the head is the embedding, and its gradient is the sum of both uses."""
    model = build_tiny_llama(seed=0, num_layers=2, tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids, position_ids = batch
    head = model.get_output_embeddings().weight
    chunked = loss_and_grads(model, input_ids, position_ids,
                             lambda h: next_token_loss(h, head, input_ids, chunk_size=CHUNK))
    assert_close_with_grads(chunked, loss_and_grads(model, input_ids, position_ids, full_logit_loss(model, input_ids)))


def test_bf16_multiplies_in_bf16_and_stays_near_fp32(model, batch):
    input_ids, position_ids = batch
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    weight = model.lm_head.weight.detach()

    def run(dtype):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        with MatmulDtypes() as seen:
            loss = next_token_loss(h, w, input_ids, chunk_size=CHUNK)
            grads = torch.autograd.grad(loss, [h, w])
        return loss.detach(), grads, seen.dtypes

    (loss16, grads16, dtypes16), (loss32, grads32, _) = run(torch.bfloat16), run(torch.float32)
    assert dtypes16 == {torch.bfloat16} and loss16.dtype == torch.float32
    assert [g.dtype for g in grads16] == [torch.bfloat16, torch.bfloat16]
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    for ours, reference in zip(grads16, grads32):
        assert relative_error(ours, reference) <= 3e-2


def test_no_counted_position_gives_zero_not_nan(model, batch):
    input_ids, position_ids = batch
    loss, grads = loss_and_grads(model, input_ids, position_ids, lambda h: next_token_loss(
        h, model.lm_head.weight, input_ids, chunk_size=CHUNK, valid=torch.zeros(BATCH, SEQ_LEN - 1, dtype=torch.bool)))
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_no_host_synchronisation(model, batch):
    """No op of the loss's forward and backward reads a device value on the host (an .item(), a nonzero, a boolean
    mask index): on a GPU each would stall the stream every micro-step."""
    input_ids, _ = batch
    hidden = torch.randn(BATCH, SEQ_LEN, model.config.hidden_size, requires_grad=True)
    with HostSyncs() as syncs:
        next_token_loss(hidden, model.lm_head.weight, input_ids, chunk_size=CHUNK).backward()
    assert syncs.ops == []


def test_peak_memory_is_bounded_by_the_chunk_not_the_sequence():
    hidden, chunk, short, long = 64, 64, 129, 321
    row = LLAMA_VOCAB_SIZE * 4  # one position's fp32 logits

    def peak(seq_len: int, chunked: bool) -> int:
        generator = torch.Generator().manual_seed(seq_len)
        states = torch.randn(BATCH, seq_len, hidden, generator=generator, requires_grad=True)
        weight = (torch.randn(LLAMA_VOCAB_SIZE, hidden, generator=generator) / hidden ** 0.5).requires_grad_()
        input_ids = torch.randint(0, LLAMA_VOCAB_SIZE, (BATCH, seq_len), generator=generator)
        with PeakLiveBytes() as tracker:
            if chunked:
                next_token_loss(states, weight, input_ids, chunk_size=chunk).backward()
            else:
                F.cross_entropy((states[:, :-1] @ weight.T).flatten(0, 1), input_ids[:, 1:].flatten()).backward()
        return tracker.peak

    chunked = {seq: peak(seq, True) for seq in (short, long)}
    full = peak(long, False)
    assert full >= 2 * BATCH * (long - 1) * row  # the tracker does see the reference's full logits
    # Longer sequences add only hidden-sized buffers (gradient of the hidden states, row indices), no logit rows.
    assert chunked[long] - chunked[short] <= BATCH * (long - short) * 32 * hidden
    # All that is vocabulary-sized: a few [chunk, V] tensors and the head's gradient.
    assert chunked[long] <= 3 * chunk * row + 2 * LLAMA_VOCAB_SIZE * hidden * 4 + BATCH * long * 32 * hidden
    assert chunked[long] * 3 < full
