"""LoRA retraining of a pruned model (the Shortened LLaMA v1 recipe), resumable, merged into an fp16 HF model.

The loop is ours rather than HF Trainer's so that a checkpoint is complete or ignored (the trainer's commit
protocol, see lora_checkpoint.py) and a resumed run is the uninterrupted run step for step: the data order of
epoch e is a permutation seeded by (seed, e), the step's position in it follows from the step number, and the RNG
that drives LoRA dropout is saved and restored with the checkpoint.

Run directory:
    config.yaml            the resolved LoraTrainConfig
    train_log.jsonl        one line per optimizer step: step, epoch, loss, lr, grad_norm, tokens,
                           examples_without_loss, time
    checkpoints/step_N/    adapter (PEFT format), optimizer, RNG, trainer_state.json (with the data file's sha256),
                           complete.json
    merged/                the base model with the adapter merged in, fp16 safetensors + tokenizer files
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shortened.config import LoraTrainConfig, save_config, to_dict
from shortened.fsutil import file_sha256, truncate_log
from shortened.modeling import tied_parameter_names
from shortened.prune.conversation import ConversationError
from shortened.prune.errors import PruneInputError
from shortened.prune.hf_model import load_causal_lm, resolve_device, resolve_dtype, resolve_model_dir, save_model_dir
from shortened.prune.instruct import IGNORE_INDEX, Example, InstructDataError, collate, encode_example, read_alpaca
from shortened.prune.lora_checkpoint import complete_checkpoints, load_checkpoint, remove_leftovers, save_checkpoint
from shortened.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # peft is imported when training starts
    from peft import PeftModel

# Fields that do not change what is trained; a resumed run may differ in them.
_RESUME_FREE_FIELDS = ("save_every_steps", "keep_last", "device")


class TiedTargetError(PruneInputError):
    """--target-modules names a module whose weight another module shares (a tied LM head and input embedding)."""


class ResumeMismatch(PruneInputError):
    """The run directory holds checkpoints of a run with a different configuration or other data."""


@dataclass
class StepPlan:
    """Which examples each optimizer step sees: epoch e uses the e-th permutation drawn from a generator seeded with
    `seed`, cut into batches of `batch_size` (the last one may be short) and those into micro-batches."""

    num_examples: int
    batch_size: int
    micro_batch_size: int
    epochs: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            order = torch.randperm(self.num_examples, generator=generator)
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        return [chosen[i : i + self.micro_batch_size] for i in range(0, len(chosen), self.micro_batch_size)]


def lr_at(step: int, config: LoraTrainConfig, total_steps: int) -> float:
    """Linear warmup then linear decay to zero (transformers' get_linear_schedule_with_warmup)."""
    if step < config.warmup_steps:
        return config.lr * step / max(1, config.warmup_steps)
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))


def encoded(config: LoraTrainConfig, tokenizer: Tokenizer, number: int, record: dict[str, Any]) -> Example:
    """One record's ids and labels; an error of its encoding (a chat template that cannot be split into turns)
    names the data file and the record, as the reader's errors do."""
    try:
        return encode_example(record, tokenizer, config.cutoff_len, config.train_on_inputs)
    except ConversationError as err:
        raise ConversationError(f"{config.data}: record {number}: {err}") from None


def encoded_examples(config: LoraTrainConfig, tokenizer: Tokenizer) -> list[Example]:
    """Every record of the data file encoded. Those cut by the cutoff before their first loss token stay in the
    step plan (it is the published recipe's, and a resumed run's plan must not move) but add nothing to the loss,
    so they are counted here; when no example is left to learn from, the run is refused."""
    examples = [encoded(config, tokenizer, number, record) for number, record in enumerate(read_alpaca(config.data))]
    empty = [number for number, example in enumerate(examples) if example.label_tokens == 0]
    if len(empty) == len(examples):
        raise InstructDataError(
            f"{config.data}: all {len(examples)} examples have no loss token within --cutoff-len "
            f"{config.cutoff_len} (their prompts fill it), so nothing would be trained; raise --cutoff-len or "
            "shorten the records")
    if empty:
        print(f"warning: {config.data}: {len(empty)} of {len(examples)} examples have no loss token within "
              f"--cutoff-len {config.cutoff_len} (records {_first_few(empty)}): they add nothing to the loss; "
              "raise --cutoff-len or shorten those records to learn from them", file=sys.stderr, flush=True)
    return examples


def _first_few(numbers: list[int], shown: int = 10) -> str:
    more = f", ... ({len(numbers) - shown} more)" if len(numbers) > shown else ""
    return ", ".join(map(str, numbers[:shown])) + more


def train_lora(config: LoraTrainConfig) -> Path:
    """Train (or resume) the LoRA run in `config.out`, then merge; returns the merged model directory."""
    import peft

    out = Path(config.out)
    model_dir = resolve_model_dir(config.model)
    check_untied_targets(model_dir, config.target_modules)
    tokenizer_source = Path(config.tokenizer) if config.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_source)
    examples = encoded_examples(config, tokenizer)
    data_sha256 = file_sha256(config.data)
    resume_from = _resume_point(out, config, data_sha256)  # before the model loads: a refusal costs nothing
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    torch.manual_seed(config.seed)  # LoRA A's initialisation, then dropout
    base = load_causal_lm(model_dir, dtype, device)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        bias="none", task_type="CAUSAL_LM",
    ))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    plan = StepPlan(len(examples), config.micro_batch_size * config.grad_accum, config.micro_batch_size,
                    config.epochs, config.seed)
    start = _resume_or_start(out, config, resume_from, model, optimizer)
    without_loss = sum(1 for example in examples if example.label_tokens == 0)

    model.train()
    log = open(out / "train_log.jsonl", "a")
    bar = tqdm(total=plan.total_steps, initial=start, desc="lora", unit="step")
    for step in range(start, plan.total_steps):
        started = time.time()
        lr = lr_at(step, config, plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [[examples[i] for i in mb] for mb in plan.micro_batches(step)]
        loss, tokens = _accumulate(model, micro_batches, device, dtype)
        grad_norm = nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "epoch": step // plan.steps_per_epoch, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm.item(), "tokens": tokens,
                  "examples_without_loss": sum(1 for mb in micro_batches for e in mb if e.label_tokens == 0),
                  "time_s": round(time.time() - started, 4)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if done % config.save_every_steps == 0 or done == plan.total_steps:
            save_checkpoint(out / "checkpoints", done, model, optimizer,
                            {"step": done, "total_steps": plan.total_steps, "config_hash": _resume_hash(config),
                             "data_sha256": data_sha256},
                            config.keep_last)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    log.close()
    print(f"lora run: {plan.total_steps} steps over {len(examples)} examples ({without_loss} of {len(examples)} "
          f"examples without loss tokens within --cutoff-len {config.cutoff_len})", flush=True)
    del model, base, optimizer, trainable  # free the training copy before the fp32 merge loads the base again
    final = complete_checkpoints(out / "checkpoints")[-1]
    return merge_lora(model_dir, final, out / "merged", tokenizer_source, torch.float16)


def check_untied_targets(model_dir: Path, targets: list[str]) -> None:
    """Refuse, before any weight loads, an adapter on a matrix the model ties to another (`tie_word_embeddings`):
    merging adds it to the one matrix both modules use, so the merged model's input embedding changes too and its
    logits are not the adapter model's (PEFT 0.21 merges so, with or without its `ensure_weight_tying`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    tied = {name.rpartition(".")[0] for pair in tied_parameter_names(skeleton).items() for name in pair}
    hit = [t for t in targets if any(module == t or module.endswith(f".{t}") for module in tied)]  # PEFT's matching
    if hit:
        raise TiedTargetError(
            f"--target-modules {' '.join(hit)}: {model_dir} ties {' and '.join(sorted(tied))} to one matrix "
            "(tie_word_embeddings: true), and a merged adapter there would change both; leave them out")


def _accumulate(model: nn.Module, micro_batches: list[list[Example]], device: torch.device,
                dtype: torch.dtype) -> tuple[float, int]:
    """Backward over the step's micro-batches; the loss is the mean over every label token of the whole step."""
    tokens = sum(e.label_tokens for mb in micro_batches for e in mb)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    total = 0.0
    for micro_batch in micro_batches:
        batch = {k: v.to(device) for k, v in collate(micro_batch).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        (loss_sum / max(1, tokens)).backward()
        total += loss_sum.item()
    return total / max(1, tokens), tokens


def _resume_hash(config: LoraTrainConfig) -> str:
    values = {k: v for k, v in to_dict(config).items() if k not in _RESUME_FREE_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _resume_point(out: Path, config: LoraTrainConfig, data_sha256: str) -> Path | None:
    """The newest complete checkpoint in `out`, None for a new run; checkpoints of another configuration, or of
    another content of the data file (the step plan indexes records by position), are refused."""
    checkpoints = complete_checkpoints(out / "checkpoints")
    if not checkpoints:
        return None
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    if state["config_hash"] != _resume_hash(config):
        raise ResumeMismatch(
            f"{out}: holds checkpoints of a run with another configuration (see {out / 'config.yaml'}); "
            "resume with the same settings or choose a new --out"
        )
    if "data_sha256" not in state:
        print(f"note: {checkpoints[-1]} predates the data file's sha256 in checkpoints, so {config.data} cannot be "
              "checked against the data it was trained on", flush=True)
    elif state["data_sha256"] != data_sha256:
        raise ResumeMismatch(
            f"{config.data}: changed since the checkpoints in {out} were written (sha256 "
            f"{state['data_sha256'][:12]}... then, {data_sha256[:12]}... now), so the resumed steps would train on "
            "other records; put the original file back to resume, or train on this one with a new --out"
        )
    return checkpoints[-1]


def _resume_or_start(out: Path, config: LoraTrainConfig, checkpoint: Path | None, model: PeftModel,
                     optimizer: torch.optim.Optimizer) -> int:
    """The step to start from: 0 for a new run, else that of `checkpoint` (restored)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "checkpoints").is_dir():
        remove_leftovers(out / "checkpoints")
    if checkpoint is None:
        save_config(config, out / "config.yaml")
        (out / "train_log.jsonl").write_text("")
        return 0
    step = load_checkpoint(checkpoint, model, optimizer)["step"]
    truncate_log(out / "train_log.jsonl", step)  # the steps after the checkpoint are trained again
    print(f"resumed from {checkpoint} (step {step})", flush=True)
    return step


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer_source: Path,
               dtype: torch.dtype = torch.float16) -> Path:
    """Merge the adapter into fp32 base weights on CPU, cast to `dtype`, save (atomically) with the tokenizer."""
    from peft import PeftModel

    base = load_causal_lm(base_dir, torch.float32, torch.device("cpu"))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(dtype)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(merged, tmp, tokenizer_source)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
