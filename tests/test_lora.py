"""LoRA retraining on a real tiny Llama with Alpaca-format data built from real PIQA and BoolQ rows, and the chain
from a CPT checkpoint through LoRA on conversation data to an evaluated merged model."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from shortened.config import LoraTrainConfig, from_dict
from shortened.fsutil import truncate_log
from shortened.prune.instruct import IGNORE_INDEX, collate, encode_example, prompt_for, read_alpaca
from shortened.prune.lora import ResumeMismatch, StepPlan, merge_lora, train_lora
from shortened.prune.lora_checkpoint import complete_checkpoints, save_checkpoint
from shortened.rng import load_rng_state
from shortened.tokenizer import load_tokenizer
from shortened.train.cli import export_main

import warm_start
from conftest import EVAL_DATA, ROOT, launcher, subprocess_env
from train_support import overrides, python, read_log, run_ok

# Small and quick for CI: 24 examples, batch 4 (2 x 2), 2 epochs = 12 steps; a higher lr than the recipe's 1e-4 so
# that a few steps move a randomly initialised model visibly.
TEST_RECIPE = dict(micro_batch_size=2, grad_accum=2, cutoff_len=128, lr=3e-3, warmup_steps=2)
RESUME_TEST = dict(save_every_steps=1, keep_last=3)


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    piqa = [json.loads(line) for line in (EVAL_DATA / "piqa" / "validation.jsonl").open()][:12]
    boolq = [json.loads(line) for line in (EVAL_DATA / "boolq" / "validation.jsonl").open()][:12]
    records = [{"instruction": r["goal"], "input": "", "output": r["sol1"] if r["label"] == 0 else r["sol2"]}
               for r in piqa]
    records += [{"instruction": "Answer the question about the passage with yes or no.",
                 "input": f"{r['passage'][:200]}\nQuestion: {r['question']}?", "output": "yes" if r["label"] else "no"}
                for r in boolq]
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="module")
def base_dir(model_dir):
    """LoRA needs a model with something learnt: a random tiny Llama's logits are too flat for adapters to move."""
    return model_dir


@pytest.fixture(scope="module")
def reference_run(base_dir, alpaca_file, tmp_path_factory):
    """One uninterrupted run, checkpointing every step: checked itself, and the yardstick of the resumed run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    merged = train_lora(lora_config(base_dir, alpaca_file, out, **RESUME_TEST))
    return out, merged


def lora_config(base_dir, alpaca_file, out, **overrides) -> LoraTrainConfig:
    values = dict(model=str(base_dir), data=str(alpaca_file), out=str(out), **TEST_RECIPE)
    values.update(overrides)
    return from_dict(LoraTrainConfig, values)


def tail(path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:]


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_recipe_defaults_are_the_published_ones():
    config = from_dict(LoraTrainConfig, {"model": "m", "data": "d", "out": "o"})
    assert (config.r, config.alpha, config.dropout, config.epochs, config.lr) == (8, 16, 0.05, 2, 1e-4)
    assert (config.micro_batch_size * config.grad_accum, config.cutoff_len) == (64, 256)
    assert sorted(config.target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"])


def test_prompt_tokens_are_masked_and_the_response_ends_with_eos(alpaca_file, tokenizer_model):
    tokenizer = load_tokenizer(tokenizer_model)
    record = read_alpaca(alpaca_file)[12]  # a BoolQ record, with input
    example = encode_example(record, tokenizer, 256, train_on_inputs=False)
    prompt_len = 1 + len(tokenizer.encode(prompt_for(record)))
    assert "### Input:" in prompt_for(record) and example.input_ids[0] == tokenizer.bos_id
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert example.input_ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(example.input_ids[prompt_len:-1]).strip() == record["output"]
    assert len(encode_example(record, tokenizer, 40, train_on_inputs=False).input_ids) == 40
    batch = collate([example, encode_example(read_alpaca(alpaca_file)[0], tokenizer, 256, False)])
    assert batch["attention_mask"].sum().item() == sum(len(encode_example(r, tokenizer, 256, False).input_ids)
                                                       for r in (record, read_alpaca(alpaca_file)[0]))


def test_step_plan_covers_each_epoch_once():
    plan = StepPlan(num_examples=10, batch_size=4, micro_batch_size=2, epochs=2, seed=3)
    assert plan.total_steps == 6
    for epoch in range(2):
        seen = [i for s in range(epoch * 3, epoch * 3 + 3) for mb in plan.micro_batches(s) for i in mb]
        assert sorted(seen) == list(range(10))
    assert plan.micro_batches(0) != plan.micro_batches(3)  # a new order every epoch


def test_loss_falls_and_merged_model_equals_adapter_model(reference_run, base_dir, alpaca_file, tmp_path,
                                                          tokenizer_model):
    out, merged_dir = reference_run
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    first_epoch = sum(r["loss"] for r in log[:6]) / 6
    second_epoch = sum(r["loss"] for r in log[6:]) / 6
    assert second_epoch < 0.9 * first_epoch, (first_epoch, second_epoch)

    final = complete_checkpoints(out / "checkpoints")[-1]
    assert final.name == "step_00000012"
    tokenizer = load_tokenizer(tokenizer_model)
    batch = collate([encode_example(r, tokenizer, 128, False) for r in read_alpaca(alpaca_file)[10:14]])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                        final).eval()
    merged32 = merge_lora(base_dir, final, tmp_path / "merged32", base_dir, torch.float32)
    with torch.no_grad():
        expected = adapter(**inputs).logits
        with adapter.disable_adapter():
            base_logits = adapter(**inputs).logits
        exact = AutoModelForCausalLM.from_pretrained(merged32)(**inputs).logits
        fp16 = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(**inputs).logits
    lora_effect = (expected - base_logits).abs().max().item()
    assert lora_effect > 0.05
    # Merging turns W x + s B (A x) into (W + s B A) x: equal up to fp32 rounding of the reordered sums.
    assert torch.allclose(exact, expected, atol=1e-4, rtol=1e-5)
    assert (fp16 - expected).abs().max().item() < lora_effect / 20  # only fp16 rounding of the weights remains

    with safe_open(merged_dir / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}
    merged_weights = load_file(merged32 / "model.safetensors")
    assert all(torch.equal(w, merged_weights[k].half()) for k, w in load_file(merged_dir / "model.safetensors").items())
    assert load_tokenizer(merged_dir).sha256 == tokenizer.sha256


def test_kill_9_then_resume_equals_the_uninterrupted_run(reference_run, base_dir, alpaca_file, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "lora.py"), "--model", str(base_dir), "--data", str(alpaca_file),
           "--out", str(out)]
    cmd += [arg for key, value in {**TEST_RECIPE, **RESUME_TEST}.items()
            for arg in ("--" + key.replace("_", "-"), str(value))]
    # stderr to a file, not a pipe nobody drains (the progress bar would fill it and stall the run); its tail goes
    # into the failure messages.
    stderr_file = tmp_path / "victim.stderr"
    with open(stderr_file, "wb") as stderr:
        victim = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 180
    while not (out / "checkpoints" / "step_00000003" / "complete.json").exists():
        assert victim.poll() is None, f"the LoRA run exited {victim.returncode}:\n{tail(stderr_file)}"
        assert time.time() < deadline, f"the LoRA run never wrote its third checkpoint:\n{tail(stderr_file)}"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, tail(stderr_file)
    killed_at = [int(p.name.split("_")[1]) for p in complete_checkpoints(out / "checkpoints")][-1]
    assert 3 <= killed_at < 12 and not (out / "merged").exists()
    # A torn directory that a crash could leave (no marker) must be ignored, not resumed from.
    (out / "checkpoints" / "step_00000011").mkdir()
    (out / "checkpoints" / "step_00000011" / "adapter_model.safetensors").write_bytes(b"torn")

    resumed = warm_start.run(cmd[1:], env=subprocess_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{killed_at:08d}'}" in resumed.stdout
    assert [r["step"] for r in log_of(out)] == list(range(1, 13))
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log_of(reference)]
    final = load_file(out / "checkpoints" / "step_00000012" / "adapter_model.safetensors")
    expected = load_file(reference / "checkpoints" / "step_00000012" / "adapter_model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert len(complete_checkpoints(out / "checkpoints")) == 3  # keep_last, the torn directory aside

    with pytest.raises(ResumeMismatch, match="another configuration"):
        train_lora(lora_config(base_dir, alpaca_file, out, **RESUME_TEST, lr=1e-3))


def test_bad_instruction_data_names_file_and_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x", "response": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1 has no string 'output'"):
        read_alpaca(bad)


class _Adapter(torch.nn.Linear):
    """Stands in for a PEFT model: save_pretrained writes the adapter file, as PEFT does."""

    def save_pretrained(self, save_directory: str) -> None:
        path = Path(save_directory)  # PEFT takes a str
        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.weight.detach().clone()}, path / "adapter_model.safetensors")


def test_checkpoints_use_the_trainers_commit_protocol(tmp_path):
    root = tmp_path / "checkpoints"
    model = _Adapter(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        save_checkpoint(root, step, model, optimizer, {"step": step}, keep_last=2)
    marker = json.loads((root / "step_00000002" / "complete.json").read_text())
    assert marker["step"] == 2 and set(marker["files"]) == {"adapter_model.safetensors", "optimizer.pt", "rng.pt",
                                                             "trainer_state.json"}
    # The RNG file is the shared one: it loads with weights_only=True and holds numpy's generator too.
    assert set(load_rng_state(root / "step_00000002" / "rng.pt")) >= {"python", "numpy", "torch"}

    (root / "step_00000003").mkdir()  # a save killed before its marker
    (root / "step_00000003" / "adapter_model.safetensors").write_bytes(b"torn")
    with (root / "step_00000002" / "optimizer.pt").open("ab") as handle:  # a file that is not what was sealed
        handle.write(b"x")
    with pytest.warns(UserWarning) as warned:
        assert [p.name for p in complete_checkpoints(root)] == ["step_00000001"]
    assert any("no readable complete.json" in str(w.message) for w in warned)
    assert any("optimizer.pt has" in str(w.message) for w in warned)

    save_checkpoint(root, 3, model, optimizer, {"step": 3}, keep_last=2)  # replaces the torn directory
    save_checkpoint(root, 4, model, optimizer, {"step": 4}, keep_last=2)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]  # retention, marker first


def test_resume_truncates_the_log_with_the_trainers_function(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}')  # the last line whole, its newline cut by the kill
    truncate_log(log, 3)
    with log.open("a") as handle:
        handle.write('{"step": 4}\n')
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')
    truncate_log(log, 1)
    assert log.read_text() == '{"step": 1}\n'


# --------------------------------------------------------------------------------------------- CPT, then LoRA


def conversations(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (EVAL_DATA / "boolq" / "validation.jsonl").read_text().splitlines()[:count]]
    return [{"conversations": [{"from": "human", "value": f"{r['passage'][:300]}\nQuestion: {r['question']}?"},
                               {"from": "gpt", "value": "Yes." if r["label"] else "No."}]} for r in rows]


def test_a_cpt_checkpoint_exported_lora_tuned_merged_and_evaluated(tmp_path, base_dir, train_shards_64):
    """The documented chain (docs/pruning.md, "CPT, then LoRA"), each step the command users run: launch/cpt.py ->
    launch/export_hf.py -> launch/lora.py on conversation data -> launch/evaluate.py on the merged model."""
    run_dir = tmp_path / "cpt"
    run_ok(python(overrides(run_dir, train_shards_64, base_dir, "train.max_steps=4"), tmp_path / "cpt.out"))
    assert len(read_log(run_dir)) == 4
    checkpoint = run_dir / "checkpoints" / "step_00000004"

    exported = tmp_path / "cpt_hf"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(exported)]) == 0  # launch/export_hf.py

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in conversations(16)))
    lora_out = tmp_path / "lora"
    assert launcher("launch/lora.py").main(
        ["--model", str(exported), "--data", str(chats), "--out", str(lora_out), "--epochs", "2",
         "--micro-batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1", "--cutoff-len",
         "160", "--device", "cpu", "--dtype", "float32"]) == 0
    log = [json.loads(line) for line in (lora_out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
    merged = lora_out / "merged"
    tuned, start = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32) for d in (merged, exported))
    assert tuned.config.num_hidden_layers == start.config.num_hidden_layers
    assert not torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)

    result = tmp_path / "eval.json"
    code = launcher("launch/evaluate.py").main(
        ["--model", str(merged), "--data-dir", str(EVAL_DATA), "--tasks", "boolq,wikitext2", "--limit", "8",
         "--device", "cpu", "--output", str(result)])
    assert code == 0  # 1: a task failed (the table printed above says which)
    scores = json.loads(result.read_text())
    assert 0 <= scores["boolq"]["acc"] <= 1 and scores["wikitext2"]["ppl"] > 1
