"""One typed configuration per tool: dataclasses per concern, loaded from YAML with `a.b=c` overrides.

Each field carries its explanation in `metadata["help"]` (see `setting`), so `--help`, `--print-config` and the
argparse flags of every command line are generated from this module and cannot drift from it. Every dataclass
validates itself in `__post_init__`; the loader checks key names and value types first, so a typo or a wrong type
is reported with the dotted key and the file (or the command-line override) it came from. DeepSpeed's JSON is
derived from `RunConfig` by the trainer, never edited by hand to disagree with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")
ALIGN_COMMENTS_AT = 56  # --print-config: the column of the `# source` comments (longer values push theirs right)
MIN_UNIT_BYTES = 4096  # data prep: each work unit costs a result file and a task; smaller units only add overhead


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names key and source."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **cli: Any) -> Any:
    """A dataclass field with its explanation: `field(default=..., metadata={"help": ...})`.

    `factory` is for mutable defaults (lists, sections). Extra keywords are command-line hints read by
    `shortened.cli.add_dataclass_arguments`: `required=True` (the flag must be given), `sep=","` (a list written
    as one comma-separated word).
    """
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------- concerns


@dataclass
class ModelConfig:
    init_from: str = setting("", "Hugging Face Llama-family model directory (or hub id, resolved offline) to "
                                 "continue")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward: less memory, "
                                                    "~1/3 more compute")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = setting(
        "sdpa", "attention kernel of the Hugging Face model (flash_attention_2 needs flash-attn and a GPU, "
                "flash_attention_3 its Hopper build, flash_attn_interface)")
    liger: bool = setting(False, "Liger-Kernel's fused RMSNorm, RoPE and SwiGLU (CUDA only; pip install -e '.[gpu]'); "
                                 "refused at start where it cannot run")


@dataclass
class DynamicConfig:
    """Sheared-LLaMA's dynamic batch loading: every `every_steps` steps each domain's validation loss is measured
    against its reference, and the domains that lag get more of the next steps' batches."""

    every_steps: int = setting(0, "steps between weight updates (0: off). Needs data.validation_path prepared with "
                                  "--pack-by-source and training shards packed by source")
    eta: float = setting(1.0, "step size of the update: weights = softmax(log weights + eta * max(loss - reference, "
                              "0))")
    smoothing: float = setting(1e-4, "then weights = (1 - smoothing) * weights + smoothing / domains, so no domain "
                                     "starves")
    reference: Literal["model"] | dict[str, float] | None = setting(
        None, "each domain's target validation loss: {source: loss}, or model: the losses of "
              "data.dynamic.reference_model, measured once at the start and kept in the run directory")
    reference_model: str = setting("", "with reference=model: the Hugging Face model directory whose losses are the "
                                       "reference, normally the unpruned source; empty: distill.teacher")
    eval_sequences: int = setting(0, "validation sequences per domain scored at each update, spread over the "
                                     "domain's (0: all of them)")

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "data.dynamic.every_steps", "must be >= 0 (0: off)")
        _require(self.eval_sequences >= 0, "data.dynamic.eval_sequences", "must be >= 0 (0: all)")
        _require(math.isfinite(self.eta) and self.eta >= 0, "data.dynamic.eta", f"{self.eta} must be >= 0")
        _require(0 <= self.smoothing < 1, "data.dynamic.smoothing", f"{self.smoothing} must be in [0, 1)")
        if not self.enabled:
            return
        _require(self.reference is not None, "data.dynamic.reference",
                 "dynamic loading needs each domain's reference loss: {source: loss}, or model (the losses of "
                 "data.dynamic.reference_model)")
        if isinstance(self.reference, dict):
            for source, loss in self.reference.items():
                _require(math.isfinite(loss), f"data.dynamic.reference.{source}", f"loss {loss} must be finite")

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0


@dataclass
class DataConfig:
    path: str = setting("", "format=shards: directory of manifest.json + token shards; format=stream: raw input")
    format: Literal["shards", "stream"] = setting(
        "shards", "stream: data.path is a SlimPajama tree / .jsonl(.zst) file / hf://DATASET, tokenized on the fly "
                  "with the model's tokenizer, in input order (no global shuffle), for quick runs on unprepared "
                  "corpora")
    split: str = setting("", "format=stream: the split folder of data.path to read (e.g. train)")
    validation_path: str = setting("", "held-out shards for validation loss (optional)")
    seq_len: int = setting(2048, "must equal the shards' sequence length")
    seed: int = setting(1234, "seed of the global sample permutation (shards)")
    num_workers: int = setting(2, "DataLoader worker processes per rank")
    document_mask: bool = setting(
        False, "attend only within each document of a packed sequence (position ids restart at every <s>). Off by "
               "default: the published CPT, like LLaMA's pretraining, lets packed documents attend to each other. "
               "With sdpa/eager it materializes a (seq_len x seq_len) mask per sequence; flex_attention gets a "
               "sparse block mask; on GPUs use model.attn_implementation=flash_attention_2, which gets each "
               "document as its own variable-length sequence. A kernel that can do none is refused at start")
    mixture: dict[str, float] | None = setting(
        None, "static mixture weights by source, e.g. {RedPajamaC4: 0.5, RedPajamaGithub: 0.5} (normalised to sum "
              "1): each step's global batch takes each source's share from that source's own shuffled order; a "
              "source not named is not sampled. Needs shards prepared with --pack-by-source. Unset: one global "
              "order over all samples")
    dynamic: DynamicConfig = setting(help="dynamic batch loading: mixture weights that follow each domain's "
                                          "validation loss (off unless data.dynamic.every_steps is set)",
                                     factory=DynamicConfig)

    def __post_init__(self) -> None:
        _require(self.seq_len > 0, "data.seq_len", "must be positive")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(not self.split or self.format == "stream", "data.split",
                 "is read with data.format=stream only (a shard directory holds one split already)")
        if self.mixture is not None:
            self.mixture = normalised_mixture(self.mixture, self.format)
        if self.dynamic.enabled:
            _require(self.format == "shards", "data.dynamic.every_steps",
                     "needs data.format=shards (shards prepared with --pack-by-source)")
            _require(bool(self.validation_path), "data.dynamic.every_steps",
                     "dynamic loading measures each domain's validation loss: set data.validation_path to the "
                     "validation split prepared with --pack-by-source")

    @property
    def mixed(self) -> bool:
        """Whether batches follow per-source weights (data.mixture, or dynamic loading from the natural mixture)."""
        return self.mixture is not None or self.dynamic.enabled


def normalised_mixture(weights: dict[str, float], data_format: str) -> dict[str, float]:
    """`data.mixture` checked and scaled to sum 1, sources in name order (so one mixture has one spelling)."""
    _require(data_format == "shards", "data.mixture",
             "needs data.format=shards (shards prepared with --pack-by-source); a stream is read in input order")
    for source, weight in weights.items():
        _require(math.isfinite(weight) and weight >= 0, f"data.mixture.{source}",
                 f"weight {weight} must be a finite number >= 0 (0: the source is not sampled)")
    total = sum(weights.values())
    _require(total > 0, "data.mixture", f"every weight is 0 ({weights or 'no source named'}): nothing would be "
                                        "sampled; give at least one source a positive weight, or leave data.mixture "
                                        "unset for the global order")
    return {source: weights[source] / total for source in sorted(weights)}


@dataclass
class TrainConfig:
    global_batch_size: int = setting(512, "sequences per optimizer step, over all ranks; the same on any world size")
    micro_batch_size: int = setting(2, "sequences per rank per forward/backward")
    max_tokens: int = setting(0, "token budget: the schedule's horizon and where the run stops (0: max_steps alone)")
    max_steps: int = setting(0, "stop after this many optimizer steps (0: at the token budget); never changes the "
                                "schedule")
    seed: int = setting(1234, "model-side RNG (dropout, if any); the data order has its own data.seed")
    precision: Literal["bf16", "fp32"] = setting("bf16", "bf16: bf16 weights/activations, fp32 master weights and "
                                                         "gradients")
    grad_clip: float = setting(1.0, "global gradient-norm clipping (0 disables), the LLaMA pretraining default")
    nan_policy: Literal["stop", "skip"] = setting("stop", "a non-finite loss stops the run, or skips that step's "
                                                          "update")
    max_consecutive_skips: int = setting(10, "with nan_policy=skip: this many non-finite steps in a row stop the run")
    dist_timeout_s: int = setting(600, "a lost or stuck rank ends the job after this long instead of hanging it")
    loss_chunk_size: int = setting(1024, "positions per chunk of the plain next-token loss: it is computed from the "
                                         "final hidden states through the LM head this many positions at a time, so "
                                         "no full-vocabulary logits of the micro-batch exist (distill.chunk_size is "
                                         "the distillation loss's)")
    compile: bool = setting(False, "torch.compile each decoder block (torchtitan's way; parameter names unchanged); "
                                   "off until a GPU has measured it")
    tf32: bool = setting(True, "on CUDA, fp32 matrix products run on TF32 tensor cores (10-bit mantissa, as "
                               "torchtitan and Megatron default): fp32 training, and what stays fp32 in bf16 "
                               "training; no effect on CPU")

    def __post_init__(self) -> None:
        _require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        _require(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}",
        )
        _require(self.max_tokens >= 0 and self.max_steps >= 0, "train.max_tokens", "budgets must be >= 0")
        _require(self.max_tokens > 0 or self.max_steps > 0, "train.max_tokens", "set max_tokens or max_steps")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.max_consecutive_skips > 0, "train.max_consecutive_skips", "must be positive")
        _require(self.dist_timeout_s > 0, "train.dist_timeout_s", "must be positive")
        _require(self.loss_chunk_size > 0, "train.loss_chunk_size", "must be positive")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per step so that the global batch is the same on any world size."""
        per_rank, rest = divmod(self.global_batch_size, self.micro_batch_size * world_size)
        if rest or per_rank == 0:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size} x world size {world_size}; "
                "choose a world size or micro batch that divides it"
            )
        return per_rank


@dataclass
class OptimConfig:
    lr: float = setting(1e-4, "peak learning rate (AdamW)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's moment decay rates (beta1, beta2)")
    eps: float = setting(1e-8, "AdamW's denominator epsilon")
    weight_decay: float = setting(0.1, "decoupled; not applied to norm weights and biases")
    schedule: Literal["constant", "cosine"] = setting("cosine", "the learning-rate schedule after the linear warmup")
    warmup_steps: int = setting(1000, "linear warmup from lr/warmup_steps: Adam's moment estimates start at zero")
    min_lr_ratio: float = setting(0.1, "cosine floor as a fraction of lr, reached at the token budget")

    def __post_init__(self) -> None:
        # inf passes `> 0` and makes the first update NaN (the run then stops or skips as if the data were bad)
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"{self.lr} must be finite and positive")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "each beta must lie in [0, 1)")
        _require(math.isfinite(self.eps) and self.eps > 0, "optim.eps", f"{self.eps} must be finite and positive")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 f"{self.weight_decay} must be finite and >= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")


@dataclass
class CheckpointConfig:
    every_steps: int = setting(500, "optimizer steps between checkpoints; also saved at the end and on SIGTERM / "
                                    "SIGUSR1")
    keep_last: int = setting(2, "complete checkpoints kept; an older one is deleted only after a newer one "
                                "completes")
    save_hf: bool = setting(True, "also write an HF model (model/) so evaluation needs no DeepSpeed")
    on_world_size_change: Literal["convert", "refuse"] = setting(
        "convert", "resuming on another world size: convert to DeepSpeed's universal format, or refuse")

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, "checkpoint.every_steps", "must be positive")
        _require(self.keep_last >= 2, "checkpoint.keep_last",
                 "must be >= 2 so one complete checkpoint survives a failed save")


DEFAULT_EVAL_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                      "wikitext2", "ptb"]


@dataclass
class EvalConfig:
    mode: Literal["off", "inline", "watch"] = setting(
        "off", "off | inline: the trainer evaluates its checkpoints | watch: launch/eval_watch.py does, elsewhere")
    every_tokens: int = setting(0, "evaluate the first checkpoint of every interval of this many tokens")
    every_steps: int = setting(0, "evaluate every checkpoint at a multiple of this many steps")
    tasks: list[str] = setting(help="zero-shot tasks and perplexity sets of the task table",
                               factory=lambda: list(DEFAULT_EVAL_TASKS), sep=",")
    data_dir: str = setting("", "local mirror of the evaluation datasets")
    limit: int = setting(0, "rows per zero-shot task, windows per perplexity set, validation sequences (spread over "
                            "the split) (0: all; smoke tests only)")
    batch_size: int = setting(8, "sequences per evaluation forward pass")
    task_file: str = setting("", "task table: lm-eval YAML, reported metric, mirror files per task (\"\": the "
                                 "shipped one)")
    ppl_seq_len: int = setting(128, "perplexity window, the Shortened LLaMA / LLM-Pruner protocol")
    collective_timeout_s: int = setting(600, "a rank that fails inside a sharded task is given up on after this long")
    poll_s: float = setting(30.0, "how often the watcher looks for new complete checkpoints")

    def __post_init__(self) -> None:
        if self.mode != "off":
            _require(self.every_tokens > 0 or self.every_steps > 0, "eval.every_tokens",
                     f"eval.mode={self.mode} needs eval.every_tokens or eval.every_steps")
            _require(bool(self.data_dir) or not self.tasks, "eval.data_dir",
                     f"eval.mode={self.mode} needs the evaluation mirror; write one with "
                     "`python launch/prepare_eval_data.py --data-dir DIR` and set eval.data_dir=DIR")
        _require(self.limit >= 0, "eval.limit", "must be >= 0")
        _require(self.batch_size > 0, "eval.batch_size", "must be positive")
        _require(self.ppl_seq_len > 1, "eval.ppl_seq_len", "must be > 1 (a window predicts its tokens 1..n-1)")
        _require(self.collective_timeout_s > 0, "eval.collective_timeout_s", "must be positive")
        _require(self.poll_s > 0, "eval.poll_s", "must be positive")

    def is_inline_point(self, step: int, tokens: int, step_tokens: int) -> bool:
        """Whether the trainer evaluates after the step that brought the run to `tokens` (from
        `tokens - step_tokens`). A pure function of its arguments, so a resumed run evaluates at the same points as
        an uninterrupted one."""
        if self.mode != "inline":
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_tokens) and tokens // self.every_tokens > (tokens - step_tokens) // self.every_tokens


@dataclass
class LogConfig:
    every_steps: int = setting(1, "console and TensorBoard interval; train_log.jsonl always has every step")
    tensorboard: bool = setting(True, "write TensorBoard events under RUN_DIR/tensorboard")
    peak_tflops: float = setting(0.0, "per-device dense bf16 peak for MFU; 0: known GPUs are looked up, else no MFU")
    sample_ids: bool = setting(False, "record each step's global sample indices in train_log.jsonl (audits the data "
                                      "order)")
    sync_timers: bool = setting(False, "synchronise the device around phases so forward/backward/optimizer times are "
                                       "exact")

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, "log.every_steps", "must be positive")
        _require(self.peak_tflops >= 0, "log.peak_tflops", "must be >= 0")


@dataclass
class DistillConfig:
    teacher: str = setting("", "Hugging Face model directory of the teacher, normally the unpruned model the student "
                               "was pruned from; empty: no distillation, the plain next-token loss")
    kd_weight: float = setting(1.0, "weight of the forward KL(teacher || student) term, scaled by temperature^2")
    ce_weight: float = setting(0.0, "weight of the student's next-token loss in the optimized total (Minitron: 0, the "
                                    "logit KL alone recovers most)")
    temperature: float = setting(1.0, "softmax temperature of both models' logits in the KL (Minitron's best: 1)")
    chunk_size: int = setting(1024, "positions per chunk of the loss: peak memory holds this many rows of both "
                                    "models' vocabulary logits, not the whole micro-batch's")

    def __post_init__(self) -> None:
        for key, weight in (("kd_weight", self.kd_weight), ("ce_weight", self.ce_weight)):
            _require(math.isfinite(weight) and weight >= 0, f"distill.{key}", f"{weight} must be finite and >= 0")
        _require(not self.teacher or self.kd_weight + self.ce_weight > 0, "distill.kd_weight",
                 "kd_weight and ce_weight are both 0: nothing would be optimized")
        # inf passed `> 0` and turned every logit into 0/0: a NaN loss on the first step
        _require(math.isfinite(self.temperature) and self.temperature > 0, "distill.temperature",
                 f"{self.temperature} must be finite and positive")
        _require(self.chunk_size > 0, "distill.chunk_size", "must be positive")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


@dataclass
class RunConfig:
    run_dir: str = setting("runs/default", "where config.yaml, train_log.jsonl, checkpoints/ and results.jsonl go")
    resume: str = setting("auto", "auto: newest complete checkpoint of run_dir, if any | never | a checkpoint "
                                  "directory")
    deepspeed_config: str = setting(
        "ds_configs/zero2_bf16.json", "DeepSpeed engine tuning (ZeRO stage, buckets, overlap); batch sizes, "
        "precision, clipping and the optimizer are derived from this config, and the file may not disagree with them")
    model: ModelConfig = setting(help="the model to continue", factory=ModelConfig)
    data: DataConfig = setting(help="training (and validation) data", factory=DataConfig)
    train: TrainConfig = setting(help="batch, budget, precision, failure policy", factory=TrainConfig)
    optim: OptimConfig = setting(help="AdamW and the learning-rate schedule", factory=OptimConfig)
    checkpoint: CheckpointConfig = setting(help="when and how checkpoints are written", factory=CheckpointConfig)
    eval: EvalConfig = setting(help="inline or watched evaluation", factory=EvalConfig)
    log: LogConfig = setting(help="console, TensorBoard and train_log.jsonl", factory=LogConfig)
    distill: DistillConfig = setting(help="knowledge distillation from a frozen teacher (off unless distill.teacher "
                                          "is set)", factory=DistillConfig)

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir", "must be set")
        _require(bool(self.resume), "resume", "must be auto, never or a checkpoint path")
        dynamic = self.data.dynamic
        _require(not (dynamic.enabled and dynamic.reference == "model" and not dynamic.reference_model
                      and not self.distill.enabled), "data.dynamic.reference_model",
                 "reference=model needs the model to measure: set data.dynamic.reference_model (the unpruned source "
                 "model), or distill.teacher")


DTYPES = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class PruneConfig:
    """`launch/prune.py`: score blocks on calibration text, remove the least important, save an HF model."""

    model: str = setting("", "Hugging Face model directory (or a hub id already in the local cache)", required=True)
    out: str = setting("", "output directory for the pruned model and prune_report.json (new or empty)",
                       required=True)
    criterion: Literal["ppl", "taylor", "magnitude", "bi", "angular"] = setting(
        "ppl", "block importance: calibration perplexity without the block, first-order Taylor, weight magnitude, "
               "block influence (1 - cosine of input and output), angular distance")
    # None, not 0, is "not given", so that `--remove 0` is reported as a wrong count rather than a missing one.
    remove: int | None = setting(None, "number of blocks to remove (exactly one of remove / ratio / keep_blocks)")
    ratio: float | None = setting(None, "fraction of all parameters to remove; see shortened/prune/budget.py for the "
                                        "block count")
    keep_blocks: int | None = setting(None, "number of blocks to keep")
    calib: str = setting("", ".txt / .jsonl / .jsonl.zst file, a directory of them, or a token-shard directory",
                         required=True)
    calib_field: str = setting("text", "JSON field holding the text (jsonl input)")
    calib_samples: int = setting(10, "calibration windows; the published protocol: 10 windows of 128 tokens")
    calib_len: int = setting(128, "tokens per calibration window")
    calib_batch_size: int = setting(10, "calibration windows per forward pass")
    seed: int = setting(1234, "seed of the calibration window choice")
    protect_first: int = setting(4, "never remove the first N blocks (the \"+\" heuristic: the first 4 and last 2)")
    protect_last: int = setting(2, "never remove the last N blocks")
    iterative: bool = setting(False, "remove one block, re-score, repeat (not for taylor)")
    dtype: DTYPES = setting("auto", "auto: bfloat16 on GPU, float32 on CPU")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    tokenizer: str = setting("", "tokenizer.model (or a directory) when the model directory has none")

    def __post_init__(self) -> None:
        _require(bool(self.model), "prune.model", "set the model directory (--model)")
        _require(bool(self.out), "prune.out", "set the output directory (--out)")
        _require(bool(self.calib), "prune.calib", "set the calibration text or shards (--calib)")
        sizes = [v for v in (self.remove, self.ratio, self.keep_blocks) if v is not None]
        _require(len(sizes) == 1, "prune.remove", "give exactly one of --remove, --ratio, --keep-blocks")
        for flag, key in (("--remove", "remove"), ("--keep-blocks", "keep_blocks")):
            count = getattr(self, key)
            _require(count is None or count >= 1, f"prune.{key}", f"{flag} {count}: must be >= 1 (a number of blocks)")
        _require(self.ratio is None or 0.0 < self.ratio < 1.0, "prune.ratio",
                 f"--ratio {self.ratio}: must lie strictly between 0 and 1 (a fraction of all parameters)")
        _require(self.calib_samples > 0 and self.calib_len > 1, "prune.calib_samples",
                 "need at least one calibration sample of at least 2 tokens")
        _require(self.calib_batch_size > 0, "prune.calib_batch_size", "must be positive")
        _require(self.protect_first >= 0 and self.protect_last >= 0, "prune.protect_first", "must be >= 0")
        _require(not (self.iterative and self.criterion == "taylor"), "prune.iterative",
                 "taylor needs gradients of the full model; use --iterative with ppl, magnitude, bi or angular")


@dataclass
class LoraTrainConfig:
    """`launch/lora.py`: the Shortened LLaMA v1 recovery recipe (LLM-Pruner's post-training), PEFT LoRA."""

    model: str = setting("", "the (pruned) Hugging Face model directory", required=True)
    data: str = setting("", "instruction data, .json (a list) or .jsonl: Alpaca records (instruction / input / "
                            "output), conversations (ShareGPT / Vicuna: conversations: [{from, value}]) or plain "
                            "documents ({text}: every token in the loss)",
                        required=True)
    out: str = setting("", "run directory: checkpoints/, train_log.jsonl, merged/ (the fp16 HF model); re-running "
                           "with it resumes", required=True)
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    target_modules: list[str] = setting(
        help="module names that get LoRA adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    epochs: int = setting(2, "passes over the data")
    lr: float = setting(1e-4, "peak learning rate")
    micro_batch_size: int = setting(4, "examples per forward/backward")
    grad_accum: int = setting(16, "micro-batches per optimizer step: batch 64 = 4 x 16")
    cutoff_len: int = setting(256, "tokens kept of each example")
    warmup_steps: int = setting(100, "linear warmup steps")
    max_grad_norm: float = setting(1.0, "gradient-norm clipping")
    train_on_inputs: bool = setting(False, "also train on the prompt tokens (default: the loss covers the response "
                                           "tokens only, alpaca-lora's default)")
    seed: int = setting(42, "seed of the data order and the LoRA initialisation")
    save_every_steps: int = setting(200, "optimizer steps between checkpoints")
    keep_last: int = setting(2, "checkpoints kept")
    dtype: DTYPES = setting("auto", "autocast dtype; LoRA weights stay fp32")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    tokenizer: str = setting("", "tokenizer.model (or a directory) when the model directory has none")

    def __post_init__(self) -> None:
        _require(bool(self.model), "lora.model", "set the model directory (--model)")
        _require(bool(self.data), "lora.data", "set the instruction data file (--data)")
        _require(bool(self.out), "lora.out", "set the output directory (--out)")
        _require(self.r > 0 and self.alpha > 0, "lora.r", "rank and alpha must be positive")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", f"{self.dropout} must lie in [0, 1)")
        _require(bool(self.target_modules), "lora.target_modules", "name at least one module")
        # one check per key: a NaN fails every comparison, and a shared check named the other key
        _require(self.epochs > 0, "lora.epochs", "must be positive")
        _require(math.isfinite(self.lr) and self.lr > 0, "lora.lr", f"{self.lr} must be finite and positive")
        _require(self.micro_batch_size > 0 and self.grad_accum > 0, "lora.micro_batch_size", "must be positive")
        _require(self.cutoff_len > 1, "lora.cutoff_len", "must be > 1")
        _require(self.warmup_steps >= 0, "lora.warmup_steps", "must be >= 0")
        _require(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "lora.max_grad_norm",
                 f"{self.max_grad_norm} must be finite and >= 0 (0: no clipping)")
        _require(self.save_every_steps > 0, "lora.save_every_steps", "must be positive")
        _require(self.keep_last >= 1, "lora.keep_last", "must be >= 1")


@dataclass
class PrepareConfig:
    """`data_prep/slimpajama.py`: raw documents -> tokenized, packed, versioned token shards."""

    input: str = setting(help="SlimPajama tree (chunkN/*.jsonl.zst), a folder of .jsonl/.jsonl.zst, one file, or "
                              "hf://DATASET_ID to stream a Hugging Face dataset (e.g. hf://cerebras/SlimPajama-627B)")
    tokenizer: str = setting(help="tokenizer.model, or a model directory holding it")
    output: str = setting(help="output directory for manifest.json and shards")
    seq_len: int = setting(2048, "tokens per packed sequence")
    workers: int = setting(1, "tokenizer processes (the output does not depend on it)")
    split: str | None = setting(None, "sub-folder of --input to read, e.g. train or validation")
    sources: list[str] | None = setting(None, "meta.redpajama_set_name values to keep, comma-separated, e.g. "
                                              "RedPajamaC4,Github", sep=",")
    max_tokens: int = setting(0, "stop after the document that reaches this many tokens (0: everything)")
    strict: bool = setting(False, "stop at the first bad line with file:line: reason")
    pack_by_source: bool = setting(False, "pack each source (meta.redpajama_set_name) on its own: every sequence "
                                          "and every shard holds one source, and each shard's manifest entry "
                                          "names it")
    shard_tokens: int = setting(1 << 27, "tokens per shard file (about 256 MiB of uint16 tokens)")
    unit_bytes: int = setting(0, "decompressed bytes per work unit (0: chosen from the corpus size and workers)")
    verify: bool = setting(False, "on a finished output, also check every shard's sha256 against the manifest "
                                  "(reads all shards) and rebuild the damaged ones; without it a rerun checks "
                                  "presence, size and header")
    hf_data_files: list[str] | None = setting(None, "data files for an hf:// builder input such as hf://json")
    num_partitions: int = setting(1, "split the input files into this many disjoint parts, one per node or array "
                                     "task (data_prep/merge_shards.py joins the parts' outputs into one corpus)")
    partition: int = setting(0, "the part this run prepares, 0 .. num_partitions-1: every num_partitions-th input "
                                "file of the sorted list, from this one on")
    progress: bool = setting(True, "the live progress bar")
    verbose: bool = setting(True, "resume notes and the final summary")

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {self.max_tokens}")
        if self.shard_tokens < self.seq_len:
            raise ConfigError(f"--shard-tokens ({self.shard_tokens}) must hold one sequence ({self.seq_len})")
        if self.num_partitions < 1 or not 0 <= self.partition < self.num_partitions:
            raise ConfigError(f"--partition must be in 0 .. --num-partitions - 1 ({self.num_partitions - 1}), got "
                              f"--partition {self.partition} --num-partitions {self.num_partitions}")
        if self.unit_bytes < 0 or 0 < self.unit_bytes < MIN_UNIT_BYTES:
            raise ConfigError(f"--unit-bytes must be 0 (chosen automatically) or at least {MIN_UNIT_BYTES}, "
                              f"got {self.unit_bytes}")

    @property
    def sequences_per_shard(self) -> int:
        return self.shard_tokens // self.seq_len


@dataclass
class MergeConfig:
    """`data_prep/merge_shards.py`: several prepared shard directories (the parts of a partitioned data prep, or
    any corpora of one tokenizer and seq_len) as one corpus for data.path and data.validation_path."""

    inputs: list[str] = setting(help="the prepared directories, in the order their sequences are numbered")
    output: str = setting(help="directory for the merged manifest.json; it lists the parts' shards where they lie")

    def __post_init__(self) -> None:
        if len(self.inputs) < 2:
            raise ConfigError(f"--inputs: give at least two prepared directories to merge, got {len(self.inputs)}")


# ---------------------------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides, validating every key."""
    raw = read_config_file(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    source = "defaults" if path is None else str(path)
    if overrides:
        source = f"{source} + overrides {' '.join(overrides)}"
    return from_dict(cls, raw, source=source)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a config file; unreadable files and non-mappings are ConfigErrors naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except DuplicateKey as err:
        raise ConfigError(f"{path}: line {err.line}: key {err.key!r} is given twice in one mapping (first on line "
                          f"{err.first_line}); YAML would keep the last value without a word, so delete one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


class DuplicateKey(yaml.YAMLError):
    """A mapping of a config file names one key twice (lines are 1-based)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: key {key!r} given twice (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, where PyYAML keeps the last value silently (a recipe
    with two `lr:` lines trained with the second while its author read the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys (<<) may be overridden on purpose; other node kinds are not config keys
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise DuplicateKey(key, line, first_lines[key])
            first_lines[key] = line
        return super().construct_mapping(node, deep)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, 1e-4, true, [a, b] work)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Construct dataclass `cls` from a mapping, checking names and types; errors name key and source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {prefix + str(key)!r} (known keys here: {', '.join(sorted(known))})"
            )
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}", source) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_hash(config: Any) -> str:
    """Stable sha256 of the resolved config, recorded in checkpoints."""
    blob = json.dumps(to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


class KeyDoc(NamedTuple):
    """One leaf setting of a config class, as `--help` and `--print-config` show it."""

    key: str  # dotted, e.g. train.max_tokens
    type: str
    default: Any
    help: str


def config_keys(cls: type, prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf setting of dataclass `cls`, sections walked depth first in field order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from config_keys(hint, f"{prefix}{f.name}.")
        else:
            yield KeyDoc(prefix + f.name, type_name(hint), field_default(f), f.metadata.get("help", ""))


def field_default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one for default_factory fields); MISSING when it has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def type_name(hint: Any) -> str:
    """A short spelling of a field's type: int, list[str], bf16|fp32, int | None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def value_sources(cls: type, path: str | Path | None, overrides: Sequence[str]) -> dict[str, str]:
    """Where each dotted key's value comes from: `override`, `file` or `default` (the later wins)."""
    in_file = set(_leaf_keys(read_config_file(path))) if path is not None else set()
    overridden = {item.partition("=")[0] for item in overrides}
    sources = {}
    for doc in config_keys(cls):
        source = "override" if _given(doc.key, overridden) else "file" if _given(doc.key, in_file) else "default"
        sources[doc.key] = source
    return sources


def _given(key: str, given: set[str]) -> bool:
    """`key` is set by one of the `given` dotted keys: itself, its section, or a part of it (a mapping-valued
    setting given one entry at a time, data.mixture.RedPajamaC4=0.5)."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in given)


def render_config(config: Any, sources: dict[str, str]) -> str:
    """The resolved config as YAML, each value followed by a `# <source>` comment; it loads back unchanged."""
    rows: list[tuple[str, str]] = []

    def walk(data: dict[str, Any], prefix: str, indent: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict) and prefix + key not in sources:  # a section, not a mapping-valued setting
                rows.append((f"{indent}{key}:", ""))
                walk(value, f"{prefix}{key}.", indent + "  ")
            else:
                rows.append((f"{indent}{key}: {yaml_value(value)}", sources[prefix + key]))

    walk(to_dict(config), "", "")
    width = min(ALIGN_COMMENTS_AT, max(len(text) for text, source in rows if source))
    return "".join(f"{text.ljust(width)}  # {source}\n" if source else f"{text}\n" for text, source in rows)


def yaml_value(value: Any) -> str:
    """`value` as one line of YAML flow style: the spelling a file or a `key=value` override takes."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()  # a bare scalar document ends with an explicit end marker


MISSING = object()  # dotted_value: no such key


def dotted_value(tree: dict[str, Any], key: str) -> Any:
    """The value at dotted `key` (a.b.c) of a nested dict, or MISSING where the path ends early."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _as_number(value: Any) -> float | int | None:
    """A number, or a string YAML 1.1 left unparsed such as 1e-4 or 37e9 (it needs a dot to see a float)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, source=source, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping such as {{name: value, ...}}, got {value!r}")
        key_hint, value_hint = args if args else (Any, Any)
        return {_coerce(key_hint, name, f"{key} (a key)", source): _coerce(value_hint, item, f"{key}.{name}", source)
                for name, item in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            number = _as_number(value)
            if number is not None and float(number).is_integer():
                return int(number)  # token budgets are written 37e9 or 3.7e10; a whole number is meant
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported config type {hint!r}")
