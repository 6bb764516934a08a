"""What a resume does with a changed setting (honoured or refused, never silently dropped), the token budget after a
global-batch change, and the cheap check that finds a damaged checkpoint before DeepSpeed trips over it.

The distributed half (a real resume with the optimizer settings changed, a real fallback past a damaged
checkpoint) is in test_train_dist.py.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import typing
from pathlib import Path

import pytest
from test_train_state import sample_state

from shortened.config import RunConfig, load_config, to_dict
from shortened.train import checkpoint as ckpt
from shortened.train.plan import check_zero_stage, plan_budget
from shortened.train.resume_rules import RULES, rule_for

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += leaf_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_the_table_in_docs_is_the_table_in_the_code():
    text = (ROOT / "docs" / "training.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| (honoured|refused|ignored) \|", text, flags=re.M))
    assert rows == {key: rule.action for key, rule in RULES.items()}


def checkpoint_with_config(tmp_path: Path, **changes: str) -> tuple[ckpt.Checkpoint, dict]:
    path = tmp_path / "step_00000004"
    path.mkdir()
    old = to_dict(load_config(RunConfig, ROOT / "configs" / "cpt" / "tiny-cpu.yaml"))
    new = to_dict(load_config(RunConfig, ROOT / "configs" / "cpt" / "tiny-cpu.yaml",
                              [f"{k.replace('__', '.')}={v}" for k, v in changes.items()]))
    return ckpt.Checkpoint(path, 4), (old, new)


@pytest.mark.parametrize("key", leaf_keys(RunConfig))
def test_every_key_changed_on_resume_is_refused_or_logged_as_its_rule_says(tmp_path, caplog, key):
    """Walks the table: each key of the config, changed alone."""
    checkpoint, (old, new) = checkpoint_with_config(tmp_path)
    *sections, name = key.split(".")
    old_section, new_section = old, new
    for section in sections:
        old_section, new_section = old_section[section], new_section[section]
    new_section[name] = "a changed value"
    old_value = old_section[name]
    rule = rule_for(key)
    with caplog.at_level(logging.INFO):
        if rule.action == "refused":
            with pytest.raises(ckpt.CheckpointError) as caught:
                ckpt.check_config_changes(checkpoint, old, new)
            assert f"{key}: checkpoint {old_value!r}, config 'a changed value'" in str(caught.value)
            assert "docs/training.md" in str(caught.value)
        else:
            ckpt.check_config_changes(checkpoint, old, new)
    assert (f"resume changes {key}:" in caplog.text) == (rule.action == "honoured")


def test_the_refused_keys_are_the_ones_the_checkpoint_fixes():
    refused = {key for key, rule in RULES.items() if rule.action == "refused"}
    assert refused == {"data.format", "data.split", "data.seq_len", "data.seed", "train.seed", "train.precision"}


def test_a_zero_stage_change_is_refused(tmp_path):
    checkpoint, _ = checkpoint_with_config(tmp_path)
    (checkpoint.path / ckpt.STATE_FILE).write_text(sample_state(zero_stage=2).to_json())
    check_zero_stage(checkpoint, "ds_configs/zero2_bf16.json")
    with pytest.raises(ckpt.CheckpointError, match="written with ZeRO stage 2, deepspeed_config=ds_configs/"
                                                   "zero1_bf16.json has stage 1"):
        check_zero_stage(checkpoint, "ds_configs/zero1_bf16.json")


def test_honoured_changes_pass_and_are_logged(tmp_path, caplog):
    checkpoint, (old, new) = checkpoint_with_config(
        tmp_path, train__grad_clip="0.01", optim__betas="[0.8, 0.9]", optim__eps="1e-6", optim__weight_decay="0.0",
        optim__lr="5e-4", train__global_batch_size="16", eval__limit="3", run_dir="elsewhere")
    with caplog.at_level(logging.INFO):
        ckpt.check_config_changes(checkpoint, old, new)
    logged = caplog.text
    for key in ("train.grad_clip", "optim.betas", "optim.eps", "optim.weight_decay", "optim.lr",
                "train.global_batch_size", "eval.limit"):
        assert f"resume changes {key}:" in logged
    assert "run_dir" not in logged


def test_a_key_the_checkpoint_predates_is_not_a_change(tmp_path):
    checkpoint, (old, new) = checkpoint_with_config(tmp_path, data__seed="7")
    del old["data"]["seed"]
    ckpt.check_config_changes(checkpoint, old, new)


def test_token_budget_counts_the_tokens_already_trained_after_a_batch_change():
    """4 steps at batch 8 (seq 128: 4,096 tokens), then batch 16 and an 8,192-token budget: 2 more steps."""
    config = load_config(RunConfig, None, ["train.global_batch_size=16", "train.micro_batch_size=1",
                                           "train.max_tokens=8192", "train.max_steps=0"])
    budget = plan_budget(config.train, seq_len=128, start_step=4, consumed_samples=32)
    assert (budget.stop_step, budget.total_steps) == (6, 6)
    assert (budget.stop_step - 4) * budget.tokens_per_step + 32 * 128 == 8192
    same_batch = load_config(RunConfig, None, ["train.global_batch_size=8", "train.micro_batch_size=1",
                                               "train.max_tokens=8192"])
    assert plan_budget(same_batch.train, 128, 4, 32) == plan_budget(same_batch.train, 128)  # unchanged: as before
    done = plan_budget(config.train, 128, start_step=8, consumed_samples=64)
    assert done.stop_step == 8  # the budget is spent: nothing to train


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory with the files a save writes, marked complete by the real marker writer."""
    path = root / ckpt.tag_for(step)
    (path / ckpt.DEEPSPEED_TAG).mkdir(parents=True)
    (path / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    for rank in range(2):
        (path / ckpt.DEEPSPEED_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 200)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "consumed_samples": 4 * step}))
    (path / ckpt.CONFIG_FILE).write_text("run_dir: x\n")
    ckpt.write_marker(path, step, 256 * step, 4 * step)
    return path


def corrupt_state(path: Path) -> str:
    state = path / ckpt.STATE_FILE
    state.write_text("{" + "x" * (len(state.read_text()) - 1))  # same size, not JSON
    return "training_state.json is unreadable"


def remove_deepspeed(path: Path) -> str:
    shutil.rmtree(path / ckpt.DEEPSPEED_TAG)
    return "is missing"


def remove_optimizer_shard(path: Path) -> str:
    (path / ckpt.DEEPSPEED_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"


def truncate_model_states(path: Path) -> str:
    file = path / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
    file.write_bytes(file.read_bytes()[:10])
    return "mp_rank_00_model_states.pt has 10 bytes, the marker recorded 100"


@pytest.mark.parametrize("fault", [remove_deepspeed, remove_optimizer_shard, truncate_model_states, corrupt_state])
def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_an_explicit_one_is_an_error(tmp_path, caplog, fault):
    root = tmp_path / "run" / ckpt.CHECKPOINTS_DIR
    older, newest = fake_checkpoint(root, 4), fake_checkpoint(root, 8)
    said = fault(newest)
    with caplog.at_level(logging.WARNING):
        chosen = ckpt.resolve_resume("auto", tmp_path / "run")
    assert chosen.path == older
    assert "skips step_00000008, which is damaged" in caplog.text and said in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="damaged") as caught:
        ckpt.resolve_resume(str(newest), tmp_path / "run")
    assert said in str(caught.value)
    assert ckpt.resolve_resume(str(older), tmp_path / "run").path == older.resolve()


def test_when_every_checkpoint_is_damaged_auto_resume_refuses_rather_than_starting_over(tmp_path):
    root = tmp_path / "run" / ckpt.CHECKPOINTS_DIR
    for step in (4, 8):
        remove_optimizer_shard(fake_checkpoint(root, step))
    with pytest.raises(ckpt.CheckpointError, match="every complete checkpoint under .* is damaged"):
        ckpt.resolve_resume("auto", tmp_path / "run")


def test_the_marker_lists_every_file_with_its_size(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    listed = json.loads((path / ckpt.MARKER).read_text())["files"]
    assert listed["deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 200
    assert ckpt.MARKER not in listed and len(listed) == 5
    assert ckpt.damage(ckpt.Checkpoint(path, 4)) is None
