"""The trainer as users run it: real DeepSpeed (ZeRO-2; bf16, or fp32 where the CPU emulates bf16) on 2 CPU ranks,
launched by `deepspeed`, `torchrun` or plain python, with real faults (kill -9 during a save, SIGTERM, a stuck
rank, NaN weights). The reference run and the faults go through the real launchers; the other runs fork their ranks
warm (tests/warm_start.py), with the variables torchrun exports, to spare each the ~10 CPU-s of cold imports.

One straight 16-step run is the reference; every interrupted or re-partitioned run is compared to it step by
step: bitwise where the arithmetic is the same, within float tolerance where the reduction order differs.
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.config import ConfigError, RunConfig, load_config
from shortened.data.loader import SequenceDataset, collate
from shortened.data.sampler import GlobalOrderSampler
from shortened.data.shards import PackedShards
from shortened.modeling import build_tiny_llama, save_with_tokenizer
from shortened.train import checkpoint as ckpt
from shortened.train.engine import load_model, lr_factor
from shortened.train.export import export_hf
from shortened.train.loop import model_inputs
from shortened.train.plan import decide_plan

from conftest import free_port
from train_support import (
    BIN,
    CPT,
    GLOBAL_BATCH,
    HALF,
    HOOK_SCRIPT,
    PRECISION,
    RECIPE,
    SEQ,
    STEPS,
    Job,
    check_export_reproduces_the_master_weights,
    close,
    deepspeed,
    overrides,
    python,
    read_log,
    run_ok,
    same,
    shm_left,
    warm,
)

pytestmark = pytest.mark.timeout(900)
KILL_TIMEOUT_S = 30  # train.dist_timeout_s of the kill -9 run
STUCK_TIMEOUT_S = 10  # train.dist_timeout_s of the stuck-rank run


# ------------------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_dist")


@pytest.fixture(scope="module")
def ref_run(work, train_shards_64, tiny_init_model) -> Path:
    """Straight 16 steps on 2 ranks through `deepspeed launch/cpt.py`: the reference trace (and TensorBoard)."""
    run_dir = work / "ref"
    run_ok(deepspeed(2, overrides(run_dir, train_shards_64, tiny_init_model, "log.tensorboard=true",
                                  "data.num_workers=1"), work / "ref.out"))
    return run_dir


@pytest.fixture(scope="module")
def stop_run(work, train_shards_64, tiny_init_model) -> Path:
    """The first 8 steps of the same run (train.max_steps=8), on 2 ranks. Its step-8 checkpoint is also copied
    aside for the world-size test (the resumed run's retention deletes the original)."""
    run_dir = work / "resumed"
    run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, f"train.max_steps={HALF}"),
                work / "stop.out"))
    shutil.copytree(ckpt.checkpoints_root(run_dir) / ckpt.tag_for(HALF), work / "pristine" / ckpt.tag_for(HALF))
    return run_dir


@pytest.fixture(scope="module")
def resume_run(work, stop_run, train_shards_64, tiny_init_model) -> tuple[Path, str]:
    """The same run continued in new processes, under torchrun this time, to step 16."""
    job = Job([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), CPT, "--config", RECIPE,
               *overrides(stop_run, train_shards_64, tiny_init_model)], work / "resume.out")
    return stop_run, run_ok(job)


# ------------------------------------------------------------------------------------------ training and bitwise resume


def test_tiny_model_trains_on_the_shared_sample_and_its_loss_falls(ref_run):
    log = read_log(ref_run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in log] == [s * GLOBAL_BATCH * SEQ for s in range(1, STEPS + 1)]
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.4, losses
    for record in log:
        for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "data_wait_s",
                    "memory_gb"):
            assert record[key] is not None and record[key] >= 0, (key, record)
        assert record["tokens_per_s_per_gpu"] == pytest.approx(record["tokens_per_s"] / 2)
        assert len(record["sample_ids"]) == GLOBAL_BATCH and not record["skipped"]
    assert log[0]["lr"] == pytest.approx(1.5e-3) and log[1]["lr"] == pytest.approx(3e-3)  # warmup 2, then cosine
    assert log[-1]["lr"] < log[2]["lr"]
    ds_config = json.loads((ref_run / "deepspeed_config.json").read_text())
    assert (ds_config["gradient_accumulation_steps"], ds_config["zero_optimization"]["stage"]) == (2, 2)
    assert load_config(RunConfig, ref_run / "config.yaml").run_dir == str(ref_run)
    complete, incomplete = ckpt.scan(ckpt.checkpoints_root(ref_run))
    assert [c.step for c in complete] == [12, 16] and not incomplete  # every 4 steps, keep_last 2
    assert {p.name for p in (complete[-1].path / "rng").iterdir()} == {"rank_00000.pt", "rank_00001.pt"}
    assert list((ref_run / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_in_new_processes_gives_bitwise_equal_losses(ref_run, resume_run):
    run_dir, output = resume_run
    assert "resuming from" in output and "step_00000008" in output
    resumed, reference = read_log(run_dir), read_log(ref_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # one line per step, nothing repeated
    for a, b in zip(resumed, reference):
        assert same(a, b), (a, b)


# -------------------------------------------------------------------------------- kill -9 during a save, SIGTERM, hooks


def read_log_lines(run_dir: Path) -> list[dict]:
    """The log as it is while a job writes it (a last line may be cut)."""
    path = run_dir / "train_log.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


@pytest.fixture(scope="module")
def kill_run(work, train_shards_64, tiny_init_model) -> dict:
    """Rank 1 is killed with SIGKILL half-way through the step-12 save: DeepSpeed's files are written (rank 1
    stalls at a failpoint right after them), rank 0 has written its files and waits for rank 1."""
    run_dir = work / "faults"
    job = deepspeed(2, overrides(run_dir, train_shards_64, tiny_init_model, f"train.dist_timeout_s={KILL_TIMEOUT_S}"),
                    work / "kill.out", SHORTENED_FAILPOINT="checkpoint.after_engine_save:rank=1:step=12:sleep=600")
    save_dir = ckpt.checkpoints_root(run_dir) / ckpt.tag_for(12)
    job.wait_for(lambda: (save_dir / ckpt.STATE_FILE).is_file(), "rank 0's files of the step-12 save")
    victim = job.ranks()[1]
    killed_at = time.monotonic()
    victim.kill()
    rc = job.wait(timeout=120)
    return {"run_dir": run_dir, "rc": rc, "seconds": time.monotonic() - killed_at, "output": job.output(),
            "left": sorted(str(p.relative_to(save_dir)) for p in save_dir.rglob("*")), "shm_left": shm_left(job.port)}


@pytest.fixture(scope="module")
def term_run(work, kill_run, train_shards_64, tiny_init_model) -> dict:
    """`resume=auto` after the kill; then SIGTERM reaches rank 1 and its DataLoader worker (as a signal to the
    whole process group would) while rank 0 is held at step 10 by a failpoint."""
    run_dir = kill_run["run_dir"]
    started = time.time()
    job = deepspeed(2, overrides(run_dir, train_shards_64, tiny_init_model, "data.num_workers=1"), work / "term.out",
                    SHORTENED_FAILPOINT="loop.after_step:rank=0:step=10:sleep=4")
    job.wait_for(lambda: any(r["step"] == 10 and r["time"] > started for r in read_log_lines(run_dir)), "step 10")
    rank1 = job.ranks()[1]
    for proc in [rank1, *rank1.children(recursive=True)]:
        proc.send_signal(signal.SIGTERM)
    rc = job.wait()
    complete, _ = ckpt.scan(ckpt.checkpoints_root(run_dir))
    return {"run_dir": run_dir, "rc": rc, "output": job.output(), "log": read_log(run_dir),
            "newest_complete": complete[-1].step}


@pytest.fixture(scope="module")
def final_run(work, term_run, train_shards_64, tiny_init_model) -> Path:
    """Resume after SIGTERM to the end, through a script that adds an evaluator-like hook."""
    run_dir = term_run["run_dir"]
    run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model), work / "final.out", script=HOOK_SCRIPT))
    return run_dir


def test_kill9_during_a_save_resumes_from_the_previous_complete_checkpoint(ref_run, kill_run, term_run):
    assert kill_run["rc"] != 0, kill_run["output"][-3000:]
    # gloo sees the closed connection at once; the timeout is the bound if it does not
    assert kill_run["seconds"] < KILL_TIMEOUT_S, "a dead rank must end the job within train.dist_timeout_s"
    left = kill_run["left"]
    prefix = "bf16_" if PRECISION == "bf16" else ""
    assert f"deepspeed/{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt" in left  # the save was under way...
    assert "training_state.json" in left and "complete.json" not in left  # ...and never counted
    assert not kill_run["shm_left"], "DeepSpeed's shared-memory workspaces must not outlive a killed job"
    output = term_run["output"]
    assert "resume=auto ignores" in output and "step_00000012: no complete.json" in output
    assert "resuming from" in output and "step_00000008" in output
    reference = {r["step"]: r for r in read_log(ref_run)}
    resumed = term_run["log"]
    assert [r["step"] for r in resumed][:9] == list(range(1, 10))
    for record in resumed:
        assert same(record, reference[record["step"]]), (record, reference[record["step"]])


def test_sigterm_saves_exits_0_and_resuming_continues_exactly(ref_run, term_run, final_run):
    assert term_run["rc"] == 0, term_run["output"][-3000:]
    stopped = term_run["log"][-1]["step"]
    assert stopped in (11, 12), "the stop lands on the step where any rank saw the signal"
    assert f"stopped by SIGTERM at step {stopped}" in term_run["output"] or \
        f"stopped by signal on another rank at step {stopped}" in term_run["output"]
    assert term_run["newest_complete"] == stopped
    final, reference = read_log(final_run), read_log(ref_run)
    assert [r["step"] for r in final] == list(range(1, STEPS + 1))
    for a, b in zip(final, reference):
        assert same(a, b), (a, b)


def test_hooks_run_on_every_rank_after_each_step_and_after_complete_checkpoints(term_run, final_run):
    stopped = term_run["log"][-1]["step"]
    for rank in (0, 1):
        events = [json.loads(line) for line in (final_run / f"hook_rank{rank}.jsonl").read_text().splitlines()]
        assert events[0]["event"] == "start" and events[0]["step"] == stopped
        assert events[0]["tokenizer"].endswith("tokenizer.model")
        steps = [e["step"] for e in events if e["event"] == "step"]
        assert steps == list(range(stopped + 1, STEPS + 1))
        assert all(e["finite"] and e["world_size"] == 2 and e["tokens"] == e["step"] * GLOBAL_BATCH * SEQ
                   for e in events if e["event"] == "step")
        saved = [e for e in events if e["event"] == "checkpoint"]
        assert [e["step"] for e in saved] == [s for s in (12, 16) if s > stopped]
        assert all(e["complete"] for e in saved)


# ------------------------------------------------------------- world-size change, changed settings, damaged checkpoints


@pytest.fixture(scope="module")
def pristine_step8(work, stop_run) -> Path:
    return work / "pristine" / ckpt.tag_for(HALF)


def test_world_size_2_to_1_reads_the_same_next_samples_with_the_optimizer_state(ref_run, pristine_step8, work,
                                                                                 train_shards_64, tiny_init_model):
    run_dir = work / "one_rank_resumed"
    output = run_ok(python(overrides(run_dir, train_shards_64, tiny_init_model, f"resume={pristine_step8}"),
                           work / "w1.out"))
    assert "re-partitioned from 2" in output and (pristine_step8 / "universal" / "zero").is_dir()
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["gradient_accumulation_steps"] == 4
    reference = {r["step"]: r for r in read_log(ref_run)}
    resumed = read_log(run_dir)
    assert [r["step"] for r in resumed] == list(range(HALF + 1, STEPS + 1))
    # Measured: resuming the weights with fresh Adam moments moves step 10's loss by 4e-3 relative (40x the
    # tolerance); with the moments carried over the losses matched bit for bit on this box.
    for record in resumed:
        assert close(record, reference[record["step"]], rel=1e-4), (record, reference[record["step"]])


def test_changed_optimizer_settings_clipping_and_batch_are_honoured_from_the_first_resumed_step(
        ref_run, pristine_step8, work, train_shards_64, tiny_init_model):
    """Before, DeepSpeed and the optimizer's load_state_dict silently restored the saved clipping threshold, betas,
    eps and weight decay, and the first resumed update used the old rate; and the token budget after a batch change
    was counted as if every past step had had the new size."""
    start = work / "changed" / "checkpoints" / ckpt.tag_for(HALF)
    shutil.copytree(pristine_step8, start, ignore=shutil.ignore_patterns("universal"))
    run_dir = start.parents[1]
    changed = ["train.grad_clip=0.01", "optim.betas=[0.8,0.9]", "optim.eps=1e-6", "optim.weight_decay=0.01",
               "optim.lr=1e-3", f"train.global_batch_size={2 * GLOBAL_BATCH}", "train.max_steps=0"]
    output = run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, *changed), work / "changed.out"))
    applied = json.loads(output.split("optimizer after resume: ", 1)[1].splitlines()[0])
    assert applied == {"lr": pytest.approx(1e-3 * lr_factor(HALF, warmup_steps=2, total_steps=12, schedule="cosine",
                                                            min_lr_ratio=0.1)),
                       "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": [0.01, 0.0], "grad_clip": 0.01}
    assert "resume changes train.grad_clip: 1.0 -> 0.01" in output
    log = read_log(run_dir)
    # 8 steps of 4 sequences used half the 4,096-token budget; 4 steps of 8 sequences spend the rest.
    assert [r["step"] for r in log] == [9, 10, 11, 12] and log[-1]["tokens"] == STEPS * GLOBAL_BATCH * SEQ
    assert log[0]["lr"] == applied["lr"] and len(log[0]["sample_ids"]) == 2 * GLOBAL_BATCH
    reference = read_log(ref_run)
    assert log[0]["sample_ids"] == reference[HALF]["sample_ids"] + reference[HALF + 1]["sample_ids"]
    recorded = load_config(RunConfig, ckpt.checkpoints_root(run_dir) / ckpt.tag_for(12) / ckpt.CONFIG_FILE)
    assert (recorded.train.grad_clip, recorded.optim.betas) == (0.01, (0.8, 0.9))
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["gradient_clipping"] == 0.01


def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_continues_exactly(ref_run, work, train_shards_64,
                                                                                  tiny_init_model):
    run_dir = work / "damaged"
    shutil.copytree(ref_run, run_dir, ignore=shutil.ignore_patterns("tensorboard", ".train.lock"))
    newest = ckpt.checkpoints_root(run_dir) / ckpt.tag_for(STEPS)
    shard = next((newest / ckpt.DEEPSPEED_TAG).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    shard.unlink()  # rank 1's optimizer state: `complete.json` is there, the checkpoint cannot be loaded
    job = python(overrides(run_dir, train_shards_64, tiny_init_model, f"resume={newest}"), work / "damaged_path.out")
    assert job.wait() == 2
    assert "is damaged: " in job.output() and f"{shard.name} is missing" in job.output()
    output = run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model), work / "damaged.out"))
    assert "resume=auto skips step_00000016, which is damaged" in output and "resuming from" in output
    resumed, reference = read_log(run_dir), read_log(ref_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert same(a, b), (a, b)


def test_a_resume_by_path_starts_a_branch_that_resume_auto_follows_and_the_log_describes(ref_run, work,
                                                                                          train_shards_64,
                                                                                          tiny_init_model):
    """The reference run's dir (checkpoints 12 and 16, log rows 1-16) resumed by path from step 12 to step 14, then
    resume=auto to 16. Before, auto went back to the abandoned branch's step 16 (nothing to train) and the log held
    rows 1-14, 13-14 of the new branch. Now step 16 and rows 13-16 are set aside, auto follows the branch, and the
    log is the uninterrupted run's row by row."""
    run_dir = work / "branch"
    shutil.copytree(ref_run, run_dir, ignore=shutil.ignore_patterns("tensorboard", ".train.lock"))
    root = ckpt.checkpoints_root(run_dir)
    old_16 = json.loads((root / ckpt.tag_for(STEPS) / ckpt.MARKER).read_text())
    branch = overrides(run_dir, train_shards_64, tiny_init_model, "checkpoint.every_steps=2")
    output = run_ok(warm(2, [*branch, f"resume={root / ckpt.tag_for(12)}", "train.max_steps=14"],
                         work / "branch_path.out"))
    assert "resuming from step 12: moved what lay past it aside into" in output
    (aside,) = (run_dir / "set_aside").iterdir()
    assert aside.name.startswith("after_step_00000012.")
    reference = read_log(ref_run)
    assert [json.loads(line) for line in (aside / "train_log.jsonl").read_text().splitlines()] == reference[12:]
    assert json.loads((aside / "checkpoints" / ckpt.tag_for(STEPS) / ckpt.MARKER).read_text()) == old_16
    assert [c.step for c in ckpt.scan(root)[0]] == [12, 14]

    run_ok(warm(2, branch, work / "branch_auto.out"))
    assert [c.step for c in ckpt.scan(root)[0]] == [14, 16]
    resumed = read_log(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert same(a, b), (a, b)
    assert len(list((run_dir / "set_aside").iterdir())) == 1  # resuming at the branch's newest moved nothing


def test_one_rank_with_double_accumulation_matches_two_ranks(ref_run, work, train_shards_64, tiny_init_model):
    """Also with activation checkpointing on: recomputation changes memory, not the numbers. Run again, the
    finished run trains nothing and leaves its log as it was."""
    run_dir = work / "one_rank"
    args = overrides(run_dir, train_shards_64, tiny_init_model, f"train.max_steps={HALF}",
                     "model.activation_checkpointing=true")
    run_ok(python(args, work / "one.out"))
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["gradient_accumulation_steps"] == 4
    one, two = read_log(run_dir), read_log(ref_run)[:HALF]
    assert one[0]["loss"] == two[0]["loss"]  # the same micro-batches, summed exactly
    for a, b in zip(one, two):
        assert close(a, b, rel=1e-4), (a, b)
    log_before = (run_dir / "train_log.jsonl").read_text()
    assert f"step {HALF} already reaches the stop at step {HALF}: nothing to train" in run_ok(
        python(args, work / "one_again.out"))
    assert (run_dir / "train_log.jsonl").read_text() == log_before


# ---------------------------------------------------------------------------------------------- config mismatch, export


def test_a_checkpoint_that_differs_from_the_config_fails_fast_naming_the_difference(
        ref_run, work, train_shards_64, tiny_init_model, tokenizer_model, slimpajama_sample):
    base = overrides(ref_run, train_shards_64, tiny_init_model)

    def plan(*extra: str):
        return decide_plan(load_config(RunConfig, RECIPE, [*base, *extra]), 2)

    three = work / "three_layers"
    save_with_tokenizer(build_tiny_llama(num_layers=3), three, tokenizer_model)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000016 does not match this run: architecture "
                                                   r"num_hidden_layers: checkpoint 2, model.init_from 3"):
        plan(f"model.init_from={three}")

    from shortened.data.prepare import PrepareConfig, prepare_shards

    shards_128 = work / "shards_128"
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model),
                                 output=str(shards_128), seq_len=128, workers=2, progress=False, verbose=False))
    with pytest.raises(ckpt.CheckpointError, match=r"sequence length: checkpoint 64, config data.seq_len=128"):
        plan(f"data.path={shards_128}", "data.seq_len=128")

    # Shards made with another tokenizer (their manifest says so), and a model directory without one.
    other_tok = work / "shards_other_tokenizer"
    shutil.copytree(train_shards_64, other_tok)
    manifest = json.loads((other_tok / "manifest.json").read_text())
    real_sha, manifest["tokenizer_sha256"] = manifest["tokenizer_sha256"], "0" * 64
    (other_tok / "manifest.json").write_text(json.dumps(manifest))
    for entry in manifest["shards"]:  # each shard's header names its tokenizer too (same length: offsets stay)
        shard = other_tok / entry["file"]
        shard.write_bytes(shard.read_bytes().replace(real_sha.encode(), b"0" * 64, 1))
    bare_model = work / "model_without_tokenizer"
    shutil.copytree(tiny_init_model, bare_model)
    (bare_model / "tokenizer.model").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"tokenizer: checkpoint sha256 9e556afd4421\.\.\., shards in "
                                                   r"data.path 000000000000\.\.\."):
        plan(f"data.path={other_tok}", f"model.init_from={bare_model}")
    # ...while the model's own tokenizer is checked against the shards before any checkpoint is looked at
    with pytest.raises(Exception, match=r"model.init_from=.* has tokenizer tokenizer.model .* but data.path shards"):
        plan(f"data.path={other_tok}")


def test_exported_hf_model_reproduces_the_training_weights_logits(ref_run, work, tiny_init_model, train_shards_64,
                                                                  tokenizer_model):
    final = ckpt.checkpoints_root(ref_run) / ckpt.tag_for(STEPS)
    check_export_reproduces_the_master_weights(final, work, tiny_init_model, train_shards_64, tokenizer_model)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        export_hf(ckpt.checkpoints_root(ref_run), work / "nothing")


# ------------------------------------------------------------------------------------------------------ NaN, stuck rank


def nan_token(shards_dir: Path, data_seed: int, step: int, steps: int) -> int:
    """A token id that occurs in step `step`'s global batch and in no other of the first `steps` steps."""
    shards = PackedShards(shards_dir)
    sampler = GlobalOrderSampler(len(shards), GLOBAL_BATCH, 1, 0, 1, data_seed)
    tokens = [set(np.concatenate([shards[i] for i in sampler.global_indices(s * GLOBAL_BATCH, GLOBAL_BATCH)]).tolist())
              for s in range(steps)]
    only_there = tokens[step - 1] - set().union(*(t for i, t in enumerate(tokens) if i != step - 1))
    return min(only_there)


def test_a_nan_loss_stops_the_run_with_a_message_or_skips_the_step(work, train_shards_64, tiny_init_model):
    """The embedding row of a token that first appears in step 3's batch is NaN: step 3's loss is NaN, no other.
    Every step is printed (log.every_steps=1): the console line of a NaN step used to format None and kill the run
    with a TypeError, under either policy, on any step the log printed."""
    base = overrides(work / "unused", train_shards_64, tiny_init_model)
    token = nan_token(train_shards_64, load_config(RunConfig, RECIPE, base).data.seed, step=3, steps=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_init_model)
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    poisoned = save_with_tokenizer(model, work / "nan_model", tiny_init_model / "tokenizer.model")
    printed = ("train.max_steps=6", "log.every_steps=1")

    stop_dir = work / "nan_stop"
    job = warm(2, overrides(stop_dir, train_shards_64, poisoned, *printed), work / "nan_stop.out")
    assert job.wait() == 1
    output = job.output()
    assert "error: step 3: loss nan; the update was not applied" in output
    assert "Traceback" not in output and "TypeError" not in output, output[-3000:]
    log = read_log(stop_dir)
    assert [r["step"] for r in log] == [1, 2, 3] and log[2]["loss"] is None and log[2]["skipped"]

    skip_dir = work / "nan_skip"
    run_ok(warm(2, overrides(skip_dir, train_shards_64, poisoned, *printed, "train.nan_policy=skip"),
                work / "nan_skip.out"))
    log = read_log(skip_dir)
    assert [r["skipped"] for r in log] == [False, False, True, False, False, False]
    assert all(r["loss"] is not None for i, r in enumerate(log) if i != 2)
    assert log[3]["lr"] == log[2]["lr"]  # a skipped update does not advance the schedule


def test_a_stuck_rank_ends_the_job_within_the_collective_timeout(work, train_shards_64, tiny_init_model):
    run_dir = work / "stuck"
    job = deepspeed(2, overrides(run_dir, train_shards_64, tiny_init_model, f"train.dist_timeout_s={STUCK_TIMEOUT_S}"),
                    work / "stuck.out")
    try:
        job.wait_for(lambda: len(read_log_lines(run_dir)) >= 2, "step 2")
        ranks = job.ranks()
        ranks[1].suspend()  # SIGSTOP: alive, holding its sockets open, answering nothing
        stopped_at = time.monotonic()
        ranks[0].wait(timeout=90)
        waited = time.monotonic() - stopped_at
        ranks[1].kill()
    finally:
        rc = job.wait(timeout=60)
    # the timeout, plus the time to tear down: well under a second timeout's worth
    assert waited < 2 * STUCK_TIMEOUT_S + 5, f"rank 0 waited {waited:.0f} s for a stuck peer with " \
                                              f"train.dist_timeout_s={STUCK_TIMEOUT_S}"
    assert rc != 0
    assert "lost contact with another rank" in job.output()
    assert f"Timed out waiting {STUCK_TIMEOUT_S * 1000}ms" in job.output()


# ---------------------------------------------------------------------------------------------------- inline evaluation


def test_inline_evaluation_keeps_the_loss_trace_and_survives_a_failing_task(ref_run, work, train_shards_64,
                                                                            tiny_init_model):
    """eval.mode=inline on 2 ranks: the training losses equal the run without evaluation bit for bit, a task whose
    mirror file is broken is recorded as failed at every point, and the others measure the model getting better."""
    from conftest import EVAL_DATA

    mirror = work / "mirror"
    for task, split in (("piqa", "validation"), ("wikitext2", "test")):
        (mirror / task).mkdir(parents=True)
        shutil.copyfile(EVAL_DATA / task / f"{split}.jsonl", mirror / task / f"{split}.jsonl")
    broken = mirror / "piqa" / "validation.jsonl"
    broken.write_text("<html><body>503 Service Unavailable</body></html>\n")  # an error page saved as the data
    run_dir = work / "inline_eval"
    inline = ("eval.mode=inline", "eval.every_steps=4", f"eval.data_dir={mirror}", "eval.tasks=[piqa,wikitext2]",
              "eval.limit=16", "eval.batch_size=4")
    run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, f"train.max_steps={HALF}", *inline),
                work / "inline_eval.out"))

    reference = read_log(ref_run)[:HALF]
    trace = read_log(run_dir)
    assert len(trace) == HALF and all(same(a, b) for a, b in zip(trace, reference))

    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    by = {(r["step"], r["task"], r["metric"]): r for r in rows}
    assert sorted({r["step"] for r in rows}) == [0, 4, 8]  # before the first step, then every 4 steps
    for step in (0, 4, 8):
        assert by[(step, "piqa", "acc")]["status"] == "failed" and "Traceback" in by[(step, "piqa", "acc")]["error"]
        assert by[(step, "wikitext2", "ppl")]["status"] == "ok"
        assert by[(step, "wikitext2", "ppl")]["tokens"] == step * GLOBAL_BATCH * SEQ
    assert by[(8, "wikitext2", "ppl")]["value"] < by[(0, "wikitext2", "ppl")]["value"]

    # The console gets one line per evaluation from rank 0; the scorers' per-rank progress bars go to files.
    console = (work / "inline_eval.out").read_text()
    assert console.count("evaluation at step") == 3
    assert "wikitext2 ppl" in console and "FAILED: piqa" in console
    assert "wikitext2: 100%" not in console
    assert "wikitext2: 100%" in (run_dir / "logs" / "eval_rank0.log").read_text()
    assert (run_dir / "logs" / "eval_rank1.log").is_file()  # every rank's scorer output has its file

    # Stopped during the evaluation at step 8, the last step, after its checkpoint: its rows are lost, and the run
    # has nothing left to train. The same command again evaluates step 8 (rank 0 finds the rows missing, both ranks
    # build the engine from the checkpoint and evaluate), the same rows, and trains nothing.
    lines = (run_dir / "results.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "results.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] != 8))
    output = run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, f"train.max_steps={HALF}", *inline),
                         work / "inline_resume.out"))
    assert "the evaluation at step 8 has no rows" in output and output.count("hook: evaluation at step 8 ") == 1
    assert "nothing to train" not in output
    again = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in again}) == [0, 4, 8] and len(again) == len(rows)
    assert next(r for r in again if (r["step"], r["task"]) == (8, "wikitext2"))["value"] == \
        by[(8, "wikitext2", "ppl")]["value"]
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, HALF + 1))
    # with its rows there, the same command again finds nothing to do and builds no engine
    output = run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, f"train.max_steps={HALF}", *inline),
                         work / "inline_again.out"))
    assert "nothing to train" in output and "evaluation at step" not in output


# --------------------------------------------------------------------------------------------------- streamed raw input


def test_streamed_raw_input_trains_in_input_order_and_resumes_exactly(work, slimpajama_sample, tiny_init_model,
                                                                      train_shards_64):
    """data.format=stream: the trainer reads the sample's .jsonl.zst itself. Step s trains on stream positions
    (s-1)·B … s·B-1, which are rows of the offline shards of the same files, and a run stopped and resumed in
    new processes repeats the straight run bit for bit."""
    stream = ("data.format=stream", "data.split=train", f"train.max_steps={HALF}")
    straight, resumed = work / "stream_straight", work / "stream_resumed"
    run_ok(warm(2, overrides(straight, slimpajama_sample, tiny_init_model, *stream), work / "stream.out"))
    run_ok(warm(2, overrides(resumed, slimpajama_sample, tiny_init_model, *stream, f"train.max_steps={HALF // 2}"),
                work / "stream_first_half.out"))
    run_ok(warm(2, overrides(resumed, slimpajama_sample, tiny_init_model, *stream), work / "stream_resume.out"))

    trace, again = read_log(straight), read_log(resumed)
    assert [r["step"] for r in trace] == list(range(1, HALF + 1))
    assert all(same(a, b) for a, b in zip(trace, again)) and len(again) == HALF
    for record in trace:
        assert record["sample_ids"] == list(range((record["step"] - 1) * GLOBAL_BATCH, record["step"] * GLOBAL_BATCH))
    assert trace[-1]["loss"] < trace[0]["loss"]

    # What streams is what data_prep writes: the first sequences equal the offline shards' first rows.
    from shortened.data.streaming import StreamSpec, stream_sequences
    from shortened.tokenizer import load_tokenizer

    spec = StreamSpec(str(slimpajama_sample), str(load_tokenizer(tiny_init_model).path), SEQ, split="train")
    shards = PackedShards(train_shards_64)
    for row, (tokens, _) in zip(range(HALF * GLOBAL_BATCH), stream_sequences(spec)):
        assert np.array_equal(tokens, shards[row])


def test_document_mask_trains_each_document_on_its_own(work, train_shards_64, tiny_init_model):
    """data.document_mask=true on 2 ranks: the logged step-1 loss is the loss of that step's sequences with attention
    kept inside each document (recomputed here from the logged samples), which differs from the plain packed loss."""
    shards = PackedShards(train_shards_64)
    seed = next(s for s in range(1000) if any(  # a data order whose first step holds a document starting mid-sequence
        shards.doc_starts(int(i)).any() for i in GlobalOrderSampler(len(shards), GLOBAL_BATCH, 1, 0, 1, s)
        .global_indices(0, GLOBAL_BATCH)))
    run_dir = work / "document_mask"
    args = overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=4", "data.document_mask=true",
                     f"data.seed={seed}")
    run_ok(warm(2, args, work / "document_mask.out"))
    trace = read_log(run_dir)
    assert [r["step"] for r in trace] == [1, 2, 3, 4] and trace[-1]["loss"] < trace[0]["loss"]

    config = load_config(RunConfig, RECIPE, args)
    model = load_model(config.model, tiny_init_model, config.train.precision, SEQ)
    dataset = SequenceDataset(shards, document_mask=True)

    def step_one_loss(keys: tuple[str, ...]) -> float:  # HF's own loss of the trainer's inputs
        batches = [collate([{k: dataset[i][k] for k in keys}]) for i in trace[0]["sample_ids"]]
        with torch.no_grad():
            losses = [model(**model_inputs(b, torch.device("cpu")), labels=b["input_ids"]).loss for b in batches]
        return torch.stack(losses).double().mean().item()

    masked, plain = step_one_loss(("input_ids", "position_ids")), step_one_loss(("input_ids",))
    assert trace[0]["loss"] == pytest.approx(masked, rel=1e-6)
    assert abs(plain - masked) > 1e-6 * masked


def test_stream_config_mistakes_name_the_key(work, slimpajama_sample, tiny_init_model, train_shards_64):
    base = overrides(work / "stream_errors", slimpajama_sample, tiny_init_model, "data.format=stream")

    def plan(*extra: str):
        return decide_plan(load_config(RunConfig, RECIPE, [*base, *extra]), 2)

    with pytest.raises(ConfigError, match=r"data.path \(data.format=stream\): .*missing.*does not exist"):
        plan(f"data.path={work / 'missing'}")
    with pytest.raises(ConfigError, match=r"holds the splits train, validation; choose one with --split \(data.split"):
        plan()
    no_tokenizer = work / "no_tokenizer_model"
    shutil.copytree(tiny_init_model, no_tokenizer)
    for name in ("tokenizer.model", "tokenizer.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"data.format=stream tokenizes with the tokenizer of model.init_from"):
        plan("data.split=train", f"model.init_from={no_tokenizer}")
    with pytest.raises(ConfigError, match=r"data.split.*data.format=stream only"):
        load_config(RunConfig, RECIPE, [*overrides(work / "x", train_shards_64, tiny_init_model), "data.split=train"])
