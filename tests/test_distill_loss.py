"""The chunked distillation loss against the full-logit reference, on real tiny Llamas with the 32k vocabulary."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_testing import BATCH, CHUNK, SEQ_LEN, MatmulDtypes, PeakLiveBytes, packed_batch, relative_error

from shortened.modeling import LLAMA_VOCAB_SIZE, build_tiny_llama
from shortened.train.distill_loss import distillation_losses


def naive_distillation_losses(student_hidden, student_weight, teacher_hidden, teacher_weight, input_ids, *,
                              kd_weight, ce_weight, temperature, valid=None):
    """The reference: every logit of both models at once, in fp32, through torch's own kl_div and cross_entropy."""
    student = (student_hidden[:, :-1].float() @ student_weight.float().T).reshape(-1, student_weight.shape[0])
    teacher = (teacher_hidden[:, :-1].float() @ teacher_weight.float().T).reshape(-1, teacher_weight.shape[0])
    target = input_ids[:, 1:].reshape(-1)
    if valid is not None:
        student, teacher, target = student[valid.reshape(-1)], teacher[valid.reshape(-1)], target[valid.reshape(-1)]
    kd = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(student, target)
    return kd_weight * kd + ce_weight * ce, kd, ce


@pytest.fixture(scope="module")
def student():
    return build_tiny_llama(seed=0, num_layers=2)


@pytest.fixture(scope="module")
def teacher():
    # A different model, wider too: the loss only needs both to share the vocabulary.
    return build_tiny_llama(seed=1, num_layers=3, hidden_size=96)


@pytest.fixture(scope="module")
def batch():
    return packed_batch()


def hidden_states(model, input_ids, position_ids=None):
    return model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def losses_and_grads(loss_fn, student, teacher, input_ids, position_ids=None, **kwargs):
    """(total, kd, ce) of `loss_fn` on both models' hidden states, and the gradient of total w.r.t. each student
    parameter."""
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, input_ids, position_ids)
    out = loss_fn(hidden_states(student, input_ids, position_ids), student.lm_head.weight, teacher_hidden,
                  teacher.lm_head.weight, input_ids, **kwargs)
    total, kd, ce = (out.total, out.kd, out.ce) if hasattr(out, "total") else out
    names, params = zip(*student.named_parameters())
    grads = torch.autograd.grad(total, params)
    return (total.detach(), kd.detach(), ce.detach()), dict(zip(names, grads))


def assert_matches_reference(student, teacher, input_ids, position_ids=None, valid=None, **weights):
    chunked, chunked_grads = losses_and_grads(distillation_losses, student, teacher, input_ids, position_ids,
                                              chunk_size=CHUNK, valid=valid, **weights)
    naive, naive_grads = losses_and_grads(naive_distillation_losses, student, teacher, input_ids, position_ids,
                                          valid=valid, **weights)
    for name, ours, reference in zip(["total", "kd", "ce"], chunked, naive):
        assert abs(float(ours) - float(reference)) <= 1e-5 * abs(float(reference)), (name, ours, reference)
    assert chunked_grads.keys() == naive_grads.keys()
    for name, reference in naive_grads.items():
        assert reference.norm() > 0, name
        assert relative_error(chunked_grads[name], reference) <= 1e-5, name


@pytest.mark.parametrize("document_mask", [False, True], ids=["plain", "document_mask"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_full_logit_reference(student, teacher, batch, temperature, document_mask):
    input_ids, position_ids = batch
    if document_mask:  # the block-causal mask must really be in effect, or this case tests nothing new
        assert not torch.allclose(hidden_states(student, input_ids, position_ids), hidden_states(student, input_ids))
    assert_matches_reference(student, teacher, input_ids, position_ids if document_mask else None,
                             kd_weight=0.6, ce_weight=0.4, temperature=temperature)


def test_the_minitron_default_matches_reference(student, teacher, batch):
    """kd_weight 1, ce_weight 0, T 1: the loss takes its shortcuts (no CE gradient pass, no division by T)."""
    input_ids, position_ids = batch
    assert_matches_reference(student, teacher, input_ids, position_ids, kd_weight=1.0, ce_weight=0.0,
                             temperature=1.0)


def test_valid_mask_matches_reference(student, teacher, batch):
    """Excluded predictions (here: each one across a document boundary, and a few more) count nowhere."""
    input_ids, position_ids = batch
    valid = position_ids[:, 1:] != 0
    valid[0, :5] = False
    assert_matches_reference(student, teacher, input_ids, position_ids, valid=valid, kd_weight=0.6, ce_weight=0.4,
                             temperature=2.0)


def test_no_counted_position_gives_zero_not_nan(student, teacher, batch):
    input_ids, _ = batch
    (total, kd, ce), grads = losses_and_grads(distillation_losses, student, teacher, input_ids, kd_weight=0.5,
                                              ce_weight=0.5, temperature=1.0, chunk_size=CHUNK,
                                              valid=torch.zeros(BATCH, SEQ_LEN - 1, dtype=torch.bool))
    assert float(total) == float(kd) == float(ce) == 0.0
    assert all(float(grad.abs().max()) == 0.0 for grad in grads.values())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_equal_to_student_has_no_kd_and_no_kd_gradient(student, batch, temperature):
    input_ids, position_ids = batch
    (total, kd, ce), grads = losses_and_grads(distillation_losses, student, student, input_ids, position_ids,
                                              kd_weight=1.0, ce_weight=0.0, temperature=temperature,
                                              chunk_size=CHUNK)
    assert abs(float(kd)) <= 1e-6 and abs(float(total)) <= 1e-6
    assert float(ce) > 1.0  # still computed and logged with ce_weight 0
    assert all(float(grad.abs().max()) == 0.0 for grad in grads.values())


def test_ce_equals_hugging_face_causal_lm_loss(student, teacher, batch):
    input_ids, position_ids = batch
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, input_ids, position_ids)
        student_hidden = hidden_states(student, input_ids, position_ids)
        hf_loss = student(input_ids=input_ids, position_ids=position_ids, labels=input_ids, use_cache=False).loss
        valid = position_ids[:, 1:] != 0
        labels = input_ids.clone()
        labels[:, 1:][~valid] = -100  # HF shifts: label t + 1 belongs to the prediction at position t
        hf_masked = student(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        for mask, expected in [(None, hf_loss), (valid, hf_masked)]:
            args = (student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, input_ids)
            out = distillation_losses(*args, kd_weight=0.5, ce_weight=0.5, temperature=2.0, chunk_size=CHUNK,
                                      valid=mask)
            assert abs(float(out.ce) - float(expected)) <= 1e-5 * float(expected)
            # Under no_grad no gradient is computed, and the KD term is the same.
            _, naive_kd, _ = naive_distillation_losses(*args, kd_weight=0.5, ce_weight=0.5, temperature=2.0,
                                                       valid=mask)
            assert abs(float(out.kd) - float(naive_kd)) <= 1e-5 * float(naive_kd)


def test_bf16_multiplies_in_bf16_and_stays_near_fp32(student, teacher, batch):
    """bf16 in: both heads multiply in bf16 (the tensor cores' dtype), the softmaxes and sums run in fp32, and the
    losses and gradients stay near the all-fp32 ones."""
    input_ids, position_ids = batch
    with torch.no_grad():
        fp32 = [hidden_states(student, input_ids, position_ids), student.lm_head.weight.detach().clone(),
                hidden_states(teacher, input_ids, position_ids), teacher.lm_head.weight.detach()]
    kwargs = dict(kd_weight=0.6, ce_weight=0.4, temperature=2.0, chunk_size=CHUNK)

    def run(hidden, weight, t_hidden, t_weight):
        hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        with MatmulDtypes() as seen:
            out = distillation_losses(hidden, weight, t_hidden, t_weight, input_ids, **kwargs)
            grads = torch.autograd.grad(out.total, [hidden, weight])
        return out, grads, seen.dtypes

    (out16, grads16, dtypes16), (out32, grads32, dtypes32) = run(*(t.bfloat16() for t in fp32)), run(*fp32)
    assert dtypes16 == {torch.bfloat16} and dtypes32 == {torch.float32}
    assert [grad.dtype for grad in grads16] == [torch.bfloat16, torch.bfloat16]
    for name in ["total", "kd", "ce"]:
        ours, reference = getattr(out16, name).detach(), getattr(out32, name).detach()
        assert ours.dtype == torch.float32
        assert float(ours) == pytest.approx(float(reference), rel=1e-2)
    for ours, reference in zip(grads16, grads32):
        assert relative_error(ours, reference) <= 3e-2


def loss_step_peak(loss_fn, seq_len: int, hidden: int = 64, **kwargs) -> int:
    """Peak live bytes of one loss forward + backward from random final hidden states."""
    generator = torch.Generator().manual_seed(seq_len)
    student_hidden = torch.randn(BATCH, seq_len, hidden, generator=generator, requires_grad=True)
    weight = (torch.randn(LLAMA_VOCAB_SIZE, hidden, generator=generator) / hidden ** 0.5).requires_grad_()
    teacher_hidden = torch.randn(BATCH, seq_len, hidden, generator=generator)
    teacher_weight = torch.randn(LLAMA_VOCAB_SIZE, hidden, generator=generator) / hidden ** 0.5
    input_ids = torch.randint(0, LLAMA_VOCAB_SIZE, (BATCH, seq_len), generator=generator)
    with PeakLiveBytes() as tracker:
        out = loss_fn(student_hidden, weight, teacher_hidden, teacher_weight, input_ids, kd_weight=0.5,
                      ce_weight=0.5, temperature=2.0, **kwargs)
        (out.total if hasattr(out, "total") else out[0]).backward()
    return tracker.peak


def test_peak_memory_is_bounded_by_the_chunk_not_the_sequence():
    hidden, chunk, short, long = 64, 64, 129, 321
    row = LLAMA_VOCAB_SIZE * 4  # one position's fp32 logits
    chunked = {seq: loss_step_peak(distillation_losses, seq, hidden, chunk_size=chunk) for seq in (short, long)}
    naive = loss_step_peak(naive_distillation_losses, long, hidden)
    positions = BATCH * (long - 1)
    assert naive >= 4 * positions * row  # the tracker does see the reference's full logits
    # Longer sequences add only hidden-sized buffers (gradient of the hidden states, row indices), no logit rows.
    added = BATCH * (long - short)
    assert chunked[long] - chunked[short] <= added * 32 * hidden
    # All that is vocabulary-sized: a few [chunk, V] tensors and the fp32 head gradient.
    head = LLAMA_VOCAB_SIZE * hidden * 4
    assert chunked[long] <= 6 * chunk * row + 2 * head + BATCH * long * 32 * hidden
    assert chunked[long] * 4 < naive
