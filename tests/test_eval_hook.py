"""The inline hook in a training loop: the loss trace is bit-identical with and without it, failures never stop it.

A plain torch loop stands in for the DeepSpeed trainer (tests/test_train_dist.py runs the real one), with everything
that makes the trace depend on global RNGs: attention dropout (torch), batch sampling (numpy) and window offsets
(python). The evaluation runs as the trainer runs it: the `InlineEvaluation` hook through `call_hooks`, which owns
the RNG and train-mode guard.
"""
from __future__ import annotations

import json
import random

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from shortened.config import ConfigError, EvalConfig, RunConfig, TrainConfig
from shortened.eval.hf_tokenizer import SentencePieceHFTokenizer
from shortened.eval.hook import InlineEvaluator
from shortened.eval.mirror import read_rows
from shortened.eval.perplexity import make_windows, stream_ids
from shortened.eval.results import read_results
from shortened.eval.tasks import lm_eval_tasks_dir
from shortened.modeling import build_tiny_llama
from shortened.tokenizer import load_tokenizer
from shortened.train.evaluation import InlineEvaluation
from shortened.train.hooks import StepContext, call_hooks

from conftest import EVAL_DATA

STEPS, BATCH, SEQ = 8, 4, 48
STEP_TOKENS = BATCH * SEQ


@pytest.fixture(scope="module")
def train_windows(tokenizer_model):
    rows = read_rows(EVAL_DATA / "wikitext2" / "test.jsonl")[:400]
    return make_windows(stream_ids(load_tokenizer(tokenizer_model), [r["text"] for r in rows], "\n\n"), SEQ + 8)


@pytest.fixture
def mirror(tmp_path):
    """piqa and wikitext2 as shipped, boolq an error page saved in place of the data (a broken download)."""
    root = tmp_path / "mirror"
    for rel in ("piqa/validation.jsonl", "wikitext2/test.jsonl", "boolq/validation.jsonl"):
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_bytes((EVAL_DATA / rel).read_bytes())
    broken = root / "boolq" / "validation.jsonl"
    broken.write_text("<html><body>503 Service Unavailable</body></html>\n")
    return root


def _train(windows, after_step=None) -> list[float]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = build_tiny_llama(seed=0, num_layers=2)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    if after_step is not None:
        after_step(model, 0, 0)
    for step in range(1, STEPS + 1):
        offset = random.randrange(8)
        batch = torch.as_tensor(windows[np.random.randint(len(windows), size=BATCH), offset:offset + SEQ])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(model, step, step * STEP_TOKENS)
    return losses


def hook_context(model, step: int, run_dir, tokenizer_model) -> StepContext:
    return StepContext(step=step, tokens=step * STEP_TOKENS, step_tokens=STEP_TOKENS, consumed_samples=step * BATCH,
                       loss=float("nan"), model=model, run_dir=run_dir, rank=0, world_size=1,
                       tokenizer_file=tokenizer_model)


def inline_evaluation(config: EvalConfig, run_dir, tokenizer_model):
    """The trainer's hook, called the way the trainer calls it: before_training at the first call (the start of a
    new run at step 0, or a resume at a later step, from that step's checkpoint), after_step after each later step."""
    hook = InlineEvaluation(RunConfig(train=TrainConfig(max_steps=STEPS), eval=config))

    def after_step(model, step, tokens):
        if hook.evaluator is None:
            call_hooks([hook], "before_training", hook_context(model, step, run_dir, tokenizer_model))
        else:
            call_hooks([hook], "after_step", hook_context(model, step, run_dir, tokenizer_model))

    return after_step


def test_loss_trace_bit_identical_and_failures_recorded(tmp_path, mirror, train_windows, tokenizer_model):
    config = EvalConfig(mode="inline", every_steps=3, tasks=["piqa", "boolq", "wikitext2"],
                        data_dir=str(mirror), limit=4, batch_size=4)
    plain = _train(train_windows)
    with_eval = _train(train_windows, inline_evaluation(config, tmp_path / "run", tokenizer_model))
    assert len(with_eval) == STEPS  # the failing task did not stop training
    assert with_eval == plain  # bit for bit

    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert sorted({r["step"] for r in rows}) == [0, 3, 6]  # the start of a new run, then every 3 steps
    for step in (0, 3, 6):
        mine = {(r["task"], r["metric"]): r for r in rows if r["step"] == step}
        assert mine[("piqa", "acc")]["status"] == "ok" and mine[("wikitext2", "ppl")]["status"] == "ok"
        assert mine[("boolq", "acc")]["status"] == "failed" and "Traceback" in mine[("boolq", "acc")]["error"]
        assert all(r["run"] == "run" and r["tokens"] == step * STEP_TOKENS and r["source"] == "inline"
                   for r in mine.values())


def test_lm_eval_alone_would_change_the_trace(tmp_path, train_windows, tokenizer_model):
    """The control: lm-eval called without the hook's RNG guard reseeds the globals and the trace diverges."""
    (tmp_path / "piqa.yaml").write_text(json.dumps({
        "include": str(lm_eval_tasks_dir() / "piqa/piqa.yaml"), "task": "piqa_local", "dataset_path": "json",
        "dataset_name": None, "training_split": None,
        "dataset_kwargs": {"data_files": {"validation": str(EVAL_DATA / "piqa/validation.jsonl")}}}))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def bare(model, step, tokens):
        if step == 3:
            lm = HFLM(pretrained=model, tokenizer=SentencePieceHFTokenizer(tokenizer_model), add_bos_token=True)
            lm_eval.simple_evaluate(model=lm, tasks=["piqa_local"], limit=2, task_manager=manager)
            model.train()

    assert _train(train_windows, bare) != _train(train_windows)


def test_rng_and_mode_restored_even_when_everything_fails(tmp_path, tokenizer_model):
    config = EvalConfig(mode="inline", every_steps=5, tasks=["piqa", "wikitext2"],
                        data_dir=str(tmp_path / "no-mirror"), limit=2)
    model = build_tiny_llama(seed=0, num_layers=2).train()
    model.model.layers[0].eval()  # a mixed mode must come back module by module
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    inline_evaluation(config, tmp_path / "run", tokenizer_model)(model, 5, 5 * STEP_TOKENS)  # resumed at 5
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert [r["status"] for r in rows] == ["failed", "failed", "failed"]  # piqa, wikitext2, the mean
    assert "prepare_eval_data.py" in rows[0]["error"]  # a missing mirror names the command that writes it
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_the_evaluation_points_are_a_pure_function_of_the_step():
    by_tokens = EvalConfig(mode="inline", data_dir="mirror", every_tokens=1000)
    assert [s for s in range(1, 12) if by_tokens.is_inline_point(s, s * 300, 300)] == [4, 7, 10]  # 1200, 2100, 3000
    by_steps = EvalConfig(mode="inline", data_dir="mirror", every_steps=5)
    assert [s for s in range(1, 12) if by_steps.is_inline_point(s, s * 300, 300)] == [5, 10]
    assert not EvalConfig(mode="watch", every_steps=1, data_dir="mirror").is_inline_point(1, 300, 300)


def test_config_mistakes_stop_the_job_at_start_up(tmp_path, tokenizer_model):
    with pytest.raises(ConfigError, match="boolqq"):
        InlineEvaluator(EvalConfig(tasks=["boolqq"]), tmp_path, tokenizer_model)
    with pytest.raises(ConfigError, match="eval.data_dir: .*prepare_eval_data.py"):
        EvalConfig(mode="inline", every_steps=100)


def test_a_resume_evaluates_the_point_its_stopped_run_missed_and_only_that(tmp_path, mirror, tokenizer_model):
    """The trainer saves a checkpoint, then evaluates: a job stopped during that evaluation resumes from a
    checkpoint whose evaluation point has no rows. The resumed run evaluates it first; points that have rows, and
    steps that are no evaluation point, are left alone."""
    config = EvalConfig(mode="inline", every_steps=3, tasks=["piqa"], data_dir=str(mirror), limit=2, batch_size=4)
    run_dir = tmp_path / "run"
    model = build_tiny_llama(seed=0, num_layers=2).train()
    run = inline_evaluation(config, run_dir, tokenizer_model)
    for step in range(4):  # the first run: step 0 and step 3 evaluated; then stopped after step 6's checkpoint
        run(model, step, step * STEP_TOKENS)

    def hook() -> InlineEvaluation:
        return InlineEvaluation(RunConfig(train=TrainConfig(max_steps=STEPS), eval=config))

    def resume_at(step: int) -> list[int]:
        call_hooks([hook()], "before_training", hook_context(model, step, run_dir, tokenizer_model))
        return sorted({r["step"] for r in read_results(run_dir / "results.jsonl") if r["task"] == "piqa"})

    # asked before the engine is built (a run resumed at its last step builds one only for this)
    assert [s for s in range(7) if hook().missed_at_resume(s, s * STEP_TOKENS, STEP_TOKENS, run_dir, 0)] == [6]
    assert resume_at(6) == [0, 3, 6]  # the missed point, evaluated on resume
    assert not hook().missed_at_resume(6, 6 * STEP_TOKENS, STEP_TOKENS, run_dir, 0)
    assert resume_at(6) == [0, 3, 6]  # stopped again before step 7: not evaluated twice
    assert resume_at(3) == [0, 3, 6]  # has its rows
    assert resume_at(4) == [0, 3, 6]  # no evaluation point
    assert model.training  # the hook layer restored the mode
