"""The typed run state: training_state.json round-trips byte for byte, files from earlier trainers still load, and a
file with a key missing, an unknown key, a wrong type or another format version is refused naming the file. Also
the loop's pure pieces that now take the loop state: the log line and the non-finite step policy."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from shortened.config import RunConfig, load_config
from shortened.fsutil import atomic_write_json
from shortened.train import checkpoint as ckpt
from shortened.train.hooks import StepContext, TrainerHook, call_hooks
from shortened.train.loop import LoopContext, LoopState, NonFiniteLoss, StepMeasurement, _check_finite, _record
from shortened.train.state import FORMAT_VERSION, CheckpointError, RunIdentity, TrainingState

# A training_state.json as the trainer wrote it before the typed state (tiny model, 2 ranks, step 3).
OLD_FILE = """{
 "config_hash": "5e55b2ef553c6b01d27778d908f61cc0eb103148f3bb590bbbde0e99a84388bf",
 "consumed_samples": 12,
 "format_version": 1,
 "global_batch_size": 4,
 "identity": {
  "architecture": {
   "attention_bias": false,
   "head_dim": 16,
   "hidden_act": "silu",
   "hidden_size": 64,
   "intermediate_size": 176,
   "mlp_bias": false,
   "model_type": "llama",
   "num_attention_heads": 4,
   "num_hidden_layers": 2,
   "num_key_value_heads": 4,
   "rms_norm_eps": 1e-06,
   "rope_parameters": {
    "rope_theta": 10000.0,
    "rope_type": "default"
   },
   "tie_word_embeddings": false,
   "vocab_size": 32000
  },
  "data_fingerprint": "da2c9b771b5ddf9938fd2d26542f56605bebb39a936cb3755ce01fda150b8bc1",
  "seq_len": 64,
  "tokenizer_sha256": "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
 },
 "micro_batch_size": 1,
 "precision": "bf16",
 "step": 3,
 "tokens": 768,
 "versions": {
  "deepspeed": "0.19.8",
  "torch": "2.13.0+cpu"
 },
 "world_size": 2,
 "zero_stage": 2
}
"""


def sample_state(**changes) -> TrainingState:
    return dataclasses.replace(TrainingState.from_json(OLD_FILE, "test"), **changes)


# The same state as format 2 writes it: format 1 meant "no mixture".
FORMAT_2_FILE = OLD_FILE.replace('"format_version": 1', '"format_version": 2').replace(
    ' "micro_batch_size": 1,\n', ' "micro_batch_size": 1,\n "mixture": null,\n')


def test_a_file_from_before_the_typed_state_loads_and_is_written_back_as_format_2(tmp_path):
    state = TrainingState.from_json(OLD_FILE, "old")
    assert (state.step, state.consumed_samples, state.tokens, state.world_size, state.zero_stage) == (3, 12, 768, 2, 2)
    assert state.identity.seq_len == 64 and state.identity.architecture["rope_parameters"]["rope_type"] == "default"
    assert state.mixture is None and state.format_version == FORMAT_VERSION == 2
    assert state.to_json() == FORMAT_2_FILE
    atomic_write_json(state.to_dict(), tmp_path / ckpt.STATE_FILE)  # how a save writes it
    assert (tmp_path / ckpt.STATE_FILE).read_text() == FORMAT_2_FILE
    assert TrainingState.read(tmp_path / ckpt.STATE_FILE) == state


def test_a_checkpoint_gives_its_state_typed(tmp_path):
    path = tmp_path / ckpt.tag_for(3)
    path.mkdir()
    (path / ckpt.STATE_FILE).write_text(OLD_FILE)
    state = ckpt.Checkpoint(path, 3).state
    assert isinstance(state, TrainingState) and isinstance(state.identity, RunIdentity)
    assert state.identity.data_fingerprint.startswith("da2c9b")


def test_a_shard_fingerprint_may_be_absent():
    data = json.loads(OLD_FILE)
    data["identity"]["data_fingerprint"] = None
    assert TrainingState.from_dict(data, "f").identity.data_fingerprint is None


def edited(edit) -> dict:
    data = json.loads(OLD_FILE)
    edit(data)
    return data


@pytest.mark.parametrize("edit, said", [
    (lambda d: d.pop("consumed_samples"), r"missing keys \['consumed_samples'\]"),
    (lambda d: d.update(domain_weights=[0.5]), r"unknown keys \['domain_weights'\]"),
    (lambda d: d["identity"].pop("seq_len"), r"missing keys \['seq_len'\] in 'identity'"),
    (lambda d: d["identity"].update(extra=1), r"unknown keys \['extra'\] in 'identity'"),
    (lambda d: d.update(step="3"), r"step is '3', expected int"),
    (lambda d: d.update(step=True), r"step is True, expected int"),
    (lambda d: d.update(identity=[]), r"identity is \[\], expected RunIdentity"),
    (lambda d: d["identity"].update(seq_len=64.0), r"seq_len in 'identity' is 64.0, expected int"),
    (lambda d: d.update(format_version=3), rf"training state format 3, this trainer reads {FORMAT_VERSION}"),
    (lambda d: d.update(format_version=2), r"missing keys \['mixture'\]"),
    (lambda d: d.update(format_version=2, mixture={"weights": {}}), r"mixture: a mixture state has the keys"),
    (lambda d: d.pop("format_version"), r"training state format None"),
])
def test_a_state_this_trainer_cannot_read_fully_is_refused_naming_the_file(tmp_path, edit, said):
    file = tmp_path / ckpt.STATE_FILE
    file.write_text(json.dumps(edited(edit)))
    with pytest.raises(CheckpointError, match=said) as caught:
        TrainingState.read(file)
    assert str(caught.value).startswith(str(file))


def test_unreadable_files_are_checkpoint_errors_too(tmp_path):
    file = tmp_path / ckpt.STATE_FILE
    with pytest.raises(CheckpointError, match="cannot read the training state"):
        TrainingState.read(file)
    file.write_text("{trunc")
    with pytest.raises(CheckpointError, match=f"{file}: not valid JSON"):
        TrainingState.read(file)
    file.write_text("[1]")
    with pytest.raises(CheckpointError, match="not a training state"):
        TrainingState.read(file)


def test_the_identity_check_reads_the_typed_identity(tmp_path):
    path = tmp_path / ckpt.tag_for(3)
    path.mkdir()
    (path / ckpt.STATE_FILE).write_text(OLD_FILE)
    saved = TrainingState.from_json(OLD_FILE, "x").identity
    other = dataclasses.replace(saved, seq_len=128, architecture={**saved.architecture, "hidden_size": 32})
    with pytest.raises(CheckpointError, match=r"sequence length: checkpoint 64, config data.seq_len=128; "
                                              r"architecture hidden_size: checkpoint 64, model.init_from 32"):
        ckpt.check_compatible(ckpt.Checkpoint(path, 3), other, {})


def test_the_batch_position_check_names_both_batch_sizes(tmp_path):
    path = tmp_path / ckpt.tag_for(3)
    path.mkdir()
    (path / ckpt.STATE_FILE).write_text(OLD_FILE)
    ckpt.check_batch_position(ckpt.Checkpoint(path, 3), 6)  # 12 samples: batch 6 continues at step 2
    with pytest.raises(CheckpointError, match="12 samples consumed is not a multiple of train.global_batch_size=8; "
                                              "resume with global_batch_size 4"):
        ckpt.check_batch_position(ckpt.Checkpoint(path, 3), 8)


# ---------------------------------------------------------------------------------------------- the loop's state


class _Env:
    rank, world_size, device = 0, 2, torch.device("cpu")


def loop_context(tmp_path: Path, peak: float | None = 1e12) -> LoopContext:
    return LoopContext(env=_Env(), model=torch.nn.Linear(1, 1), seq_len=64, step_tokens=256,  # type: ignore[arg-type]
                       flops_per_token=6e6, peak=peak, run_dir=tmp_path, tokenizer_file=None)


def measurement(**changes) -> StepMeasurement:
    values = dict(loss=2.5, ce_loss=2.5, kd_loss=None, lr=1e-3, applied=True, grad_norm=0.7, step_time=0.5,
                  phases={"data_wait_s": 0.1, "fwd_bwd_s": 0.3})
    return StepMeasurement(**{**values, **changes})


def test_the_log_line_comes_from_the_loop_state_and_the_step_measurement(tmp_path):
    state = LoopState(step=5, consumed_samples=20, last_checkpoint=None)
    record = _record(state, measurement(), loop_context(tmp_path))
    assert list(record)[:9] == ["step", "tokens", "consumed_samples", "loss", "ce_loss", "kd_loss", "lr", "grad_norm",
                                "skipped"]
    assert (record["step"], record["tokens"], record["consumed_samples"], record["loss"]) == (5, 1280, 20, 2.5)
    assert record["tokens_per_s"] == 512 and record["tokens_per_s_per_gpu"] == 256
    assert record["mfu"] == pytest.approx(512 * 6e6 / 2e12)
    assert (record["data_wait_s"], record["optim_s"], record["skipped"]) == (0.1, 0.0, False)
    assert (record["ce_loss"], record["kd_loss"], record["teacher_s"]) == (2.5, None, 0.0)  # no teacher
    distilled = _record(state, measurement(loss=1.5, ce_loss=2.5, kd_loss=0.25, phases={"teacher_s": 0.2}),
                        loop_context(tmp_path))
    assert (distilled["loss"], distilled["ce_loss"], distilled["kd_loss"], distilled["teacher_s"]) == (1.5, 2.5, 0.25,
                                                                                                       0.2)
    nan = _record(state, measurement(loss=math.nan, applied=False), loop_context(tmp_path, peak=None))
    assert nan["loss"] is None and nan["skipped"] and nan["mfu"] is None


def test_skips_in_a_row_count_up_reset_and_stop_at_the_limit(tmp_path):
    config = load_config(RunConfig, None, ["train.max_steps=10", "train.nan_policy=skip",
                                           "train.max_consecutive_skips=3"])
    state = LoopState(step=7, consumed_samples=28, last_checkpoint=tmp_path / "step_00000004")
    for expected in (1, 2):
        state.skips_in_a_row = _check_finite(measurement(loss=math.inf), state, config.train)
        assert state.skips_in_a_row == expected
    assert _check_finite(measurement(), state, config.train) == 0  # a good step resets the count
    state.skips_in_a_row = 2
    with pytest.raises(NonFiniteLoss, match="3 non-finite steps in a row .* newest complete checkpoint .*_00000004"):
        _check_finite(measurement(applied=False), state, config.train)
    stop = load_config(RunConfig, None, ["train.max_steps=10", "train.nan_policy=stop"])
    with pytest.raises(NonFiniteLoss, match="step 7: loss nan; .*no checkpoint yet"):
        _check_finite(measurement(loss=math.nan), LoopState(7, 28, None), stop.train)


def test_hook_contexts_follow_the_loop_state(tmp_path):
    run = loop_context(tmp_path)
    state = LoopState(step=2, consumed_samples=8, last_checkpoint=None)
    seen: list[tuple[int, int, int]] = []

    class Counting(TrainerHook):  # only after_step: the base class's other methods do nothing
        def after_step(self, ctx: StepContext) -> None:
            seen.append((ctx.step, ctx.tokens, ctx.consumed_samples))

    hook = Counting()
    for point in ("before_training", "after_step", "after_checkpoint"):
        call_hooks([hook], point, run.hook_context(state, 1.0))  # type: ignore[arg-type]
    state.step, state.consumed_samples = 3, 12
    call_hooks([hook], "after_step", run.hook_context(state, 1.0))
    assert seen == [(2, 512, 8), (3, 768, 12)]
