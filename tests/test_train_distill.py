"""Distillation during continued pretraining through the real trainer: 2-rank DeepSpeed ZeRO-2 jobs on CPU.

The student is the tiny 2-block model of the other trainer tests; the teacher is a different, deeper tiny Llama with
the same vocabulary and tokenizer (the unpruned model stands in for it in the demo).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models

from shortened.config import ConfigError, RunConfig, load_config
from shortened.modeling import build_tiny_llama, save_with_tokenizer
from shortened.train import checkpoint as ckpt
from shortened.train.plan import decide_plan

from train_support import RECIPE, overrides, python, read_log, run_ok, warm

pytestmark = pytest.mark.timeout(600)
STEPS, HALF = 8, 4
DISTILL = ("distill.kd_weight=1.0", "distill.ce_weight=0.5", "distill.temperature=2.0", "distill.chunk_size=48")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_distill")


@pytest.fixture(scope="module")
def teacher(work, tokenizer_model) -> Path:
    """A 3-block tiny Llama of another seed: its distributions differ from the student's everywhere."""
    return save_with_tokenizer(build_tiny_llama(seed=7, num_layers=3), work / "teacher", tokenizer_model)


def distill_args(run_dir: Path, shards: Path, student: Path, teacher: Path, *extra: str) -> list[str]:
    return overrides(run_dir, shards, student, f"distill.teacher={teacher}", *DISTILL,
                     f"train.max_tokens={STEPS * 4 * 64}", *extra)


@pytest.fixture(scope="module")
def ref_run(work, train_shards_64, tiny_init_model, teacher) -> Path:
    """8 uninterrupted distillation steps on 2 ranks: the reference trace."""
    run_dir = work / "ref"
    run_ok(warm(2, distill_args(run_dir, train_shards_64, tiny_init_model, teacher), work / "ref.out"))
    return run_dir


@pytest.fixture(scope="module")
def stopped_run(work, train_shards_64, tiny_init_model, teacher) -> Path:
    """The first 4 steps (train.max_steps), its step-4 checkpoint copied aside for a resume on 1 rank."""
    run_dir = work / "stopped"
    run_ok(warm(2, distill_args(run_dir, train_shards_64, tiny_init_model, teacher, f"train.max_steps={HALF}"),
                work / "stopped.out"))
    aside = work / "one_rank"
    shutil.copytree(run_dir, aside)
    return run_dir


def test_distillation_logs_both_losses_and_the_teacher_phase(ref_run):
    log = read_log(ref_run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for record in log:
        assert record["kd_loss"] > 0 and record["ce_loss"] > 0 and record["teacher_s"] > 0, record
        # the optimized total is the configured mix of its two logged parts
        assert record["loss"] == pytest.approx(record["kd_loss"] + 0.5 * record["ce_loss"], rel=1e-6)
    assert log[-1]["kd_loss"] < log[0]["kd_loss"]  # the student moves towards the teacher


def test_a_stopped_distillation_run_resumes_exactly_on_two_ranks_and_on_one(work, ref_run, stopped_run,
                                                                            train_shards_64, tiny_init_model,
                                                                            teacher):
    output = run_ok(warm(2, distill_args(stopped_run, train_shards_64, tiny_init_model, teacher),
                         work / "resume2.out"))
    assert "resuming from" in output
    one_rank = work / "one_rank"
    output = run_ok(python(distill_args(one_rank, train_shards_64, tiny_init_model, teacher), work / "resume1.out"))
    assert "re-partitioned from 2" in output
    reference = read_log(ref_run)
    same_ranks, one = read_log(stopped_run), read_log(one_rank)
    assert [r["step"] for r in same_ranks] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    exact = ("step", "tokens", "loss", "kd_loss", "ce_loss", "lr", "sample_ids")
    for a, b in zip(same_ranks, reference):
        assert all(a[k] == b[k] for k in exact), (a, b)  # bit for bit on the same world size
    # On 1 rank the 4 micro-batch gradients are summed in another order than 2 x 2 and an all-reduce: fp32
    # rounding, as for runs without a teacher (test_train_dist). The samples and the first resumed step are exact.
    for a, b in zip(one, reference):
        assert a["sample_ids"] == b["sample_ids"] and a["tokens"] == b["tokens"]
        assert all(a[k] == pytest.approx(b[k], rel=1e-4) for k in ("loss", "kd_loss", "ce_loss")), (a, b)
    assert all(one[HALF][k] == reference[HALF][k] for k in exact)


def test_the_teacher_holds_no_optimizer_state(work, ref_run, train_shards_64, tiny_init_model):
    """The optimizer state of a distillation run is exactly the student's: fp32 master weights and two Adam moments
    per student parameter, the same bytes as a run without a teacher."""
    plain = work / "plain"
    run_ok(warm(2, overrides(plain, train_shards_64, tiny_init_model, f"train.max_steps={STEPS}",
                             f"train.max_tokens={STEPS * 4 * 64}"), work / "plain.out"))

    def optimizer_elements(run_dir: Path) -> int:
        newest = ckpt.scan(ckpt.checkpoints_root(run_dir))[0][-1].path
        total = 0
        for path in sorted(newest.rglob("*optim_states.pt")):
            state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            total += sum(t.numel() for t in _tensors(state))
        return total

    student_params = sum(p.numel() for p in build_tiny_llama(seed=0, num_layers=2).parameters())
    distilled = optimizer_elements(ref_run)
    assert distilled == optimizer_elements(plain)
    assert student_params * 3 <= distilled < student_params * 3 + 1000  # masters + 2 moments (+ step counters)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_the_student_as_its_own_teacher_has_zero_kl_and_zero_gradient(work, train_shards_64, tiny_init_model):
    run_dir = work / "self"
    run_ok(python(overrides(run_dir, train_shards_64, tiny_init_model, f"distill.teacher={tiny_init_model}",
                            "distill.ce_weight=0", "train.max_steps=2"), work / "self.out"))
    first = read_log(run_dir)[0]
    assert abs(first["kd_loss"]) <= 1e-6 and first["grad_norm"] == 0.0, first
    assert first["ce_loss"] > 1  # the student's own loss is still measured


# ---------------------------------------------------------------------------------------------- refused teachers


def plan_with(work: Path, name: str, shards: Path, student: Path, teacher: Path) -> None:
    config = load_config(RunConfig, RECIPE, overrides(work / name, shards, student, f"distill.teacher={teacher}"))
    decide_plan(config, world_size=1)


def test_a_teacher_of_another_vocabulary_tokenizer_or_context_is_refused_naming_both(work, train_shards_64,
                                                                                    tiny_init_model,
                                                                                    tokenizer_model):
    other_vocab = save_with_tokenizer(build_tiny_llama(seed=1, num_layers=2, vocab_size=32016),
                                      work / "vocab32016", tokenizer_model)
    with pytest.raises(ConfigError, match=r"vocab_size=32016.*vocab_size=32000"):
        plan_with(work, "p1", train_shards_64, tiny_init_model, other_vocab)

    # Same vocabulary size, other tokens: a 32,000-entry tokenizer.json in place of the SentencePiece model.
    other_tokenizer = work / "other_tokenizer"
    shutil.copytree(tiny_init_model, other_tokenizer)
    (other_tokenizer / "tokenizer.model").unlink()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    RustTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")).save(str(other_tokenizer / "tokenizer.json"))
    (other_tokenizer / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ConfigError, match=rf"{other_tokenizer}.*sha256.*student model.init_from={tiny_init_model}"):
        plan_with(work, "p2", train_shards_64, tiny_init_model, other_tokenizer)

    short_context = save_with_tokenizer(build_tiny_llama(seed=1, num_layers=2, max_position_embeddings=32),
                                        work / "ctx32", tokenizer_model)
    with pytest.raises(ConfigError, match="data.seq_len=64 exceeds .*max_position_embeddings=32"):
        plan_with(work, "p3", train_shards_64, tiny_init_model, short_context)


def test_a_missing_teacher_is_one_error_line_before_training(work, train_shards_64, tiny_init_model):
    missing = work / "no_such_teacher"
    job = python(overrides(work / "missing", train_shards_64, tiny_init_model, f"distill.teacher={missing}"),
                 work / "missing.out")
    assert job.wait() == 2
    output = job.output()
    assert f"error: distill.teacher={missing}: no such Hugging Face model directory" in output
    assert "Traceback" not in output and not (work / "missing" / "train_log.jsonl").exists()
