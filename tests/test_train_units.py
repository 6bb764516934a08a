"""Trainer pieces that need no process group: DeepSpeed config derivation, schedule, launcher environments,
RNG capture, hooks, checkpoint discovery and retention on real directories, and every shipped config."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from shortened.config import ConfigError, DistillConfig, RunConfig, load_config
from shortened.data.loader import build_train_loader
from shortened.data.shards import PackedShards
from shortened.eval.validation import open_validation_shards
from shortened.modeling import build_tiny_llama
from shortened.rng import capture_rng_state, restore_rng_state
from shortened.tokenizer import DOCUMENT_TOKENS_FILE, copy_tokenizer
from shortened.train import checkpoint as ckpt
from shortened.train.branch import set_aside_past
from shortened.train.distributed import first_host, launch_variables
from shortened.train.ds_config import build_deepspeed_config
from shortened.train.engine import lr_factor
from shortened.train.hooks import StepContext, call_hooks
from shortened.train.loop import model_inputs
from shortened.train.metrics import TrainLogger, truncate_log
from shortened.train.plan import data_identity, model_tokenizer, plan_budget
from shortened.train.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "cpt").glob("*.yaml"))
VICUNA = [path for path in RECIPES if path.name.startswith("vicuna-")]
SMOLLM2 = ROOT / "models" / "smollm2-135m"  # `make models` imports it


def config_with(tmp_path: Path, base: dict | None = None, overrides=()) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(base or {"train": {"max_tokens": 1000}}))
    return load_config(RunConfig, path, overrides)


# ---------------------------------------------------------------------------------------------- configs


def test_four_vicuna_recipes_and_tiny_cpu_ship():
    assert {p.name for p in RECIPES} == {"tiny-cpu.yaml", "vicuna-5.5b.yaml", "vicuna-3.7b.yaml",
                                         "vicuna-2.7b.yaml", "vicuna-1.5b.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_derives_a_deepspeed_config_deepspeed_accepts(recipe):
    config = load_config(RunConfig, recipe)
    world = 8 if recipe in VICUNA else 2
    derived = build_deepspeed_config(config, world, on_cuda=world == 8)
    assert derived["train_batch_size"] == config.train.global_batch_size
    assert (derived["train_micro_batch_size_per_gpu"] * derived["gradient_accumulation_steps"] * world
            == config.train.global_batch_size)
    assert derived["data_types"]["grad_accum_dtype"] == "fp32"
    # DeepSpeed's own parser checks the batch arithmetic for the world size it sees (1 here).
    single = build_deepspeed_config(config, 1, on_cuda=False)
    parsed = DeepSpeedConfig(single)
    assert parsed.train_batch_size == config.train.global_batch_size
    assert parsed.zero_optimization_stage == 2


@pytest.mark.parametrize("recipe", VICUNA, ids=lambda p: p.stem)
def test_vicuna_recipes_match_the_published_setup(recipe):
    config = load_config(RunConfig, recipe)
    blocks, budget = {"5.5b": (26, 37e9), "3.7b": (17, 74e9), "2.7b": (12, 150e9), "1.5b": (6, 271e9)}[
        recipe.stem.split("-")[1]]
    assert str(blocks) in recipe.read_text().splitlines()[0]
    train = config.train
    assert (train.global_batch_size, train.micro_batch_size, train.grad_accum_steps(8)) == (512, 2, 32)
    assert config.train.max_tokens == budget and config.data.seq_len == 2048 and config.train.precision == "bf16"
    assert (config.optim.lr, config.optim.betas, config.optim.weight_decay) == (1e-4, (0.9, 0.95), 0.1)
    assert [config.train.grad_accum_steps(w) for w in (1, 2, 4, 16)] == [256, 128, 64, 16]
    with pytest.raises(ConfigError, match="not divisible"):
        build_deepspeed_config(config, 3, on_cuda=True)


@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero1_bf16.json"])
def test_shipped_deepspeed_jsons_are_valid_and_only_tune_the_engine(tmp_path, name):
    base = json.loads((ROOT / "ds_configs" / name).read_text())
    assert base["zero_optimization"]["stage"] == int(name[4])
    config = config_with(tmp_path, overrides=[f"deepspeed_config=ds_configs/{name}"])
    derived = build_deepspeed_config(config, 1, on_cuda=False)
    assert DeepSpeedConfig(derived).zero_optimization_stage == int(name[4])


def test_a_deepspeed_json_that_disagrees_with_the_run_config_is_an_error(tmp_path):
    json_path = tmp_path / "ds.json"
    json_path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    config = config_with(tmp_path, overrides=[f"deepspeed_config={json_path}"])
    with pytest.raises(ConfigError,
                       match=r"ds\.json: train_micro_batch_size_per_gpu=4 disagrees .*train\.micro_batch_size"):
        build_deepspeed_config(config, 1, on_cuda=False)
    json_path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"params": {"lr": 0.5}}}))
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr=0\.5 disagrees .*optim"):
        build_deepspeed_config(config, 1, on_cuda=False)
    json_path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="supports ZeRO stages 1 and 2"):
        build_deepspeed_config(config, 1, on_cuda=False)
    json_path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="'scheduler' must not be set here"):
        build_deepspeed_config(config, 1, on_cuda=False)


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        config_with(tmp_path, overrides=["checkpoint.keep_last=1"])
    with pytest.raises(ConfigError, match="checkpoint.on_world_size_change"):
        config_with(tmp_path, overrides=["checkpoint.on_world_size_change=maybe"])


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_to_the_floor_at_the_budget():
    def factor(s: int, kind: str = "cosine") -> float:
        return lr_factor(s, warmup_steps=10, total_steps=110, schedule=kind, min_lr_ratio=0.1)

    assert [factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    assert factor(9, "constant") == 1.0 and factor(500, "constant") == 1.0


def test_max_steps_stops_early_without_moving_the_schedule_horizon(tmp_path):
    config = config_with(tmp_path, overrides=["train.max_tokens=40960", "train.global_batch_size=8",
                                              "train.micro_batch_size=2", "train.max_steps=7"])
    budget = plan_budget(config.train, seq_len=128)
    assert (budget.tokens_per_step, budget.total_steps, budget.stop_step) == (1024, 40, 7)
    only_steps = config_with(tmp_path, overrides=["train.max_tokens=0", "train.max_steps=12"])
    assert plan_budget(only_steps.train, 64).total_steps == plan_budget(only_steps.train, 64).stop_step == 12


# ---------------------------------------------------------------------------------------------- launchers


def test_rank_variables_from_deepspeed_torchrun_srun_or_nothing():
    launched = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert launch_variables(launched) == launched
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_STEP_NODELIST": "gpu[007-008]"}
    assert launch_variables(slurm) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                                       "MASTER_PORT": str(20000 + 4242)}
    # sbatch running python directly (no srun step): one process, not a world of SLURM_NTASKS
    alone = launch_variables({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["LOCAL_RANK"]) == ("0", "1", "0")
    assert first_host("cpu1,gpu[2-3]") == "cpu1" and first_host("gpu[10,12-14]") == "gpu10"


# ---------------------------------------------------------------------------------------------- RNG and hooks


def draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw()
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = [draw() for _ in range(3)]
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [draw() for _ in range(3)] == expected


class RandomEvaluator:
    """Draws random numbers and flips the model to eval, as an evaluator would; records what it saw."""

    def __init__(self) -> None:
        self.seen = []

    def after_step(self, ctx: StepContext) -> None:
        ctx.model.eval()
        draw(), torch.randn(100)
        self.seen.append((ctx.step, ctx.tokens))


def test_hooks_cannot_change_the_random_stream_or_the_train_mode(tmp_path):
    model = build_tiny_llama(num_layers=1).train()
    hook = RandomEvaluator()
    ctx = StepContext(step=3, tokens=384, step_tokens=128, consumed_samples=6, loss=1.0, model=model,
                      run_dir=tmp_path, rank=0, world_size=1, tokenizer_file=None)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    reference = draw()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    call_hooks([hook, object()], "after_step", ctx)  # a hook without the method is skipped
    assert draw() == reference
    assert model.training and hook.seen == [(3, 384)]


# ---------------------------------------------------------------------------------------------- checkpoints


def fake_checkpoint(root: Path, step: int, complete: bool = True, marker: str | None = None) -> Path:
    """The files our code reads to classify a checkpoint (the DeepSpeed states do not matter here)."""
    path = root / ckpt.tag_for(step)
    (path / "deepspeed").mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    (path / ckpt.CONFIG_FILE).write_text("run_dir: x\n")  # damage() reads both
    if complete:
        (path / ckpt.MARKER).write_text(marker if marker is not None else json.dumps({"step": step}))
    return path


def test_resume_auto_takes_the_newest_complete_and_names_what_it_ignores(tmp_path, caplog):
    root = ckpt.checkpoints_root(tmp_path)
    fake_checkpoint(root, 2), fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, complete=False)
    fake_checkpoint(root, 8, marker="{trunc")
    fake_checkpoint(root, 10, marker=json.dumps({"step": 9}))
    with caplog.at_level("WARNING"):
        found = ckpt.resolve_resume("auto", tmp_path)
    assert found.step == 4
    text = caplog.text
    assert "step_00000006: no complete.json" in text
    assert "step_00000008: unreadable complete.json" in text
    assert "step_00000010: complete.json says step 9" in text


def test_resume_asked_for_with_nothing_to_resume_is_an_error(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None  # a new run
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.resolve_resume(str(tmp_path / "checkpoints" / "step_00000004"), tmp_path)
    root = ckpt.checkpoints_root(tmp_path)
    incomplete = fake_checkpoint(root, 6, complete=False)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint .no complete.json"):
        ckpt.resolve_resume(str(incomplete), tmp_path)
    fake_checkpoint(root, 4)
    with pytest.raises(ckpt.CheckpointError, match=r"did you mean .*step_00000004"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="resume=never, but .* holds complete checkpoints"):
        ckpt.resolve_resume("never", tmp_path)


def test_a_resume_sets_aside_every_record_past_its_step_and_keeps_the_rest(tmp_path, caplog):
    """Rows and checkpoints of later steps leave the run dir for set_aside/ (none deleted); the rest is untouched."""
    root = ckpt.checkpoints_root(tmp_path)
    older, newer = fake_checkpoint(root, 4), fake_checkpoint(root, 8)
    rows = [json.dumps({"step": s, "loss": s / 10}) for s in range(1, 9)]
    (tmp_path / "train_log.jsonl").write_text("\n".join(rows) + "\n")
    results = [json.dumps({"step": s, "checkpoint": ckpt.tag_for(s), "task": "piqa"}) for s in (0, 4, 8)]
    (tmp_path / "results.jsonl").write_text("\n".join(results) + "\n")
    watched = {tag: {"step": int(tag[5:])} for tag in (ckpt.tag_for(4), ckpt.tag_for(8))}
    (tmp_path / "eval_state.json").write_text(json.dumps({"version": 1, "evaluated": watched}))
    assert ckpt.resolve_resume(str(older), tmp_path).step == 4
    with caplog.at_level("WARNING"):
        moved = set_aside_past(tmp_path, 4)
    assert moved is not None and moved.checkpoints == ["step_00000008"] and moved.log_rows == [5, 6, 7, 8]
    assert "moved what lay past it aside into" in caplog.text and "checkpoints step_00000008" in caplog.text
    assert (tmp_path / "train_log.jsonl").read_text().splitlines() == rows[:4]
    assert (moved.folder / "train_log.jsonl").read_text().splitlines() == rows[4:]
    assert (tmp_path / "results.jsonl").read_text().splitlines() == results[:2]
    assert (moved.folder / "results.jsonl").read_text().splitlines() == results[2:]
    assert json.loads((tmp_path / "eval_state.json").read_text())["evaluated"] == {ckpt.tag_for(4): {"step": 4}}
    assert json.loads((moved.folder / "eval_state.json").read_text())["evaluated"] == {ckpt.tag_for(8): {"step": 8}}
    assert not newer.exists() and (moved.folder / "checkpoints" / "step_00000008" / ckpt.MARKER).is_file()
    assert [c.step for c in ckpt.scan(root)[0]] == [4]  # resume=auto now finds this branch's newest
    assert set_aside_past(tmp_path, 4) is None  # nothing past the step: nothing moved, no folder


def test_retention_keeps_the_newest_complete_and_drops_only_older_ones(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 3, complete=False)  # a save that died before step 4 completed
    fake_checkpoint(root, 8, complete=False)  # a save in progress (or dead) newer than every complete one
    removed = ckpt.apply_retention(root, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]


def test_truncate_log_keeps_one_line_per_step_up_to_the_resume_point(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------- document mask


def test_document_mask_makes_each_document_attend_only_to_itself(sample_shards):
    """With data.document_mask the loader's position ids make a real Llama score every document of a packed
    sequence exactly as if it stood alone; without them the documents see each other."""
    loader = iter(build_train_loader(sample_shards, global_batch_size=1, micro_batch_size=1, dp_rank=0,
                                     dp_world_size=1, seed=1234, document_mask=True))
    shards = PackedShards(sample_shards)
    batch = next(b for b in loader if len(shards.doc_starts(int(b["sample_index"]))) >= 2)
    starts = shards.doc_starts(int(batch["sample_index"]))
    first, second = int(starts[0]), int(starts[1])  # a whole document, preceded by the tail of another one
    assert first > 0 and batch["position_ids"][0, first:second].tolist() == list(range(second - first))

    model = build_tiny_llama(seed=0, num_layers=2).eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        masked = model(**model_inputs(batch, cpu)).logits[0, first:second]  # what the trainer feeds the model
        plain = model(**model_inputs({"input_ids": batch["input_ids"]}, cpu)).logits[0, first:second]
        alone = model(input_ids=batch["input_ids"][:, first:second]).logits[0]
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert (plain - alone).abs().max() > 1e-3


def test_progress_clock_starts_at_the_first_step(tmp_path):
    """A step-0 evaluation before training must not count as training time in the bar's rate and ETA."""
    logger = TrainLogger(tmp_path, start_step=0, start_tokens=0, stop_tokens=1000, every_steps=1, tensorboard=False)
    try:
        logger.bar.start_t -= 120  # as if the before_training hooks had taken two minutes
        assert logger.bar.format_dict["elapsed"] >= 120
        logger.start_clock()
        assert logger.bar.format_dict["elapsed"] < 5
    finally:
        logger.close()


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_teacher_loads_frozen_on_the_rank_device_in_the_training_dtype(tiny_init_model, precision, dtype):
    teacher = load_teacher(DistillConfig(teacher=str(tiny_init_model)), precision, torch.device("cpu"), "sdpa")
    assert {(p.device.type, p.dtype, p.requires_grad) for p in teacher.parameters()} == {("cpu", dtype, False)}
    assert not teacher.training and teacher.config.use_cache is False


def test_shards_framed_with_other_document_ids_than_the_models_are_refused_to_train_and_to_evaluate(
        tmp_path, slimpajama_sample):
    """SmolLM2's tokenizer.json is the same file whether documents end with <|endoftext|> (document_tokens.json, as
    `make models` imports it) or with the instruct EOS <|im_end|>: only the manifest's ids tell the shards apart."""
    from shortened.data.prepare import PrepareConfig, prepare_shards

    framed, instruct = tmp_path / "framed", tmp_path / "instruct"
    for folder in (framed, instruct):
        folder.mkdir()
        copy_tokenizer(SMOLLM2 / "tokenizer.json", folder)  # as pruning, checkpoints and exports copy it
    (instruct / DOCUMENT_TOKENS_FILE).unlink()
    shards = tmp_path / "shards"
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="validation", tokenizer=str(framed),
                                 output=str(shards), seq_len=128, workers=1, progress=False, verbose=False))
    config = config_with(tmp_path, overrides=[f"data.path={shards}", "data.seq_len=128"])

    data = data_identity(config, framed)
    assert data["document_ids"] == (0, 0)  # <|endoftext|> both sides of a document
    assert model_tokenizer(framed, data) == framed / "tokenizer.json"
    with pytest.raises(ConfigError, match=r"model.init_from=.*instruct frames documents with bos/eos ids 1/2 .*"
                                          r"packed with 0/0; .*document_tokens.json"):
        model_tokenizer(instruct, data)
    # the validation loss (inline evaluation, launch/evaluate.py --validation-shards, dynamic loading) reads them too
    assert len(open_validation_shards(shards, framed / "tokenizer.json")) > 0
    with pytest.raises(ValueError, match=r"shards/manifest.json: the validation shards frame documents with bos/eos "
                                         r"ids 0/0, but the model \(.*instruct\) frames them with 1/2"):
        open_validation_shards(shards, instruct / "tokenizer.json")
