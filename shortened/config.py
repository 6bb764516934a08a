"""One typed configuration for a run: dataclasses per concern, loaded from YAML with `a.b=c` overrides.

Every dataclass validates itself in `__post_init__`; the loader checks key names and value types first, so a
typo or a wrong type is reported with the dotted key and the file (or the command-line override) it came from.
DeepSpeed's JSON is derived from `RunConfig` by the trainer, never edited by hand to disagree with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names key and source."""


# ---------------------------------------------------------------------------------------------- concerns


@dataclass
class ModelConfig:
    init_from: str = ""  # Hugging Face Llama-family model directory (or hub id, resolved offline) to continue
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class DataConfig:
    path: str = ""  # format=shards: directory of manifest.json + token shards; format=stream: raw input
    # stream: data.path is a SlimPajama tree / .jsonl(.zst) file / hf://DATASET, tokenized on the fly with the
    # model's tokenizer, in input order (no global shuffle), for quick runs on unprepared corpora.
    format: Literal["shards", "stream"] = "shards"
    split: str = ""  # format=stream: the split folder of data.path to read (e.g. train)
    validation_path: str = ""  # held-out shards for validation loss (optional)
    seq_len: int = 2048  # must equal the shards' sequence length
    seed: int = 1234  # seed of the global sample permutation (shards)
    num_workers: int = 2  # DataLoader worker processes per rank
    # Attend only within each document of a packed sequence (position ids restart at every <s>). Off by default:
    # the published CPT, like LLaMA's pretraining, lets packed documents attend to each other. With sdpa/eager it
    # materializes a (seq_len x seq_len) mask per sequence; on GPUs use model.attn_implementation=flash_attention_2.
    document_mask: bool = False

    def __post_init__(self) -> None:
        _require(self.seq_len > 0, "data.seq_len", "must be positive")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(not self.split or self.format == "stream", "data.split",
                 "is read with data.format=stream only (a shard directory holds one split already)")


@dataclass
class TrainConfig:
    global_batch_size: int = 512  # sequences per optimizer step, over all ranks; the same on any world size
    micro_batch_size: int = 2  # sequences per rank per forward/backward
    max_tokens: int = 0  # token budget: the schedule's horizon and where the run stops (0: max_steps alone)
    max_steps: int = 0  # stop after this many optimizer steps (0: at the token budget); never changes the schedule
    seed: int = 1234  # model-side RNG (dropout, if any); the data order has its own data.seed
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16: bf16 weights/activations, fp32 master weights and gradients
    grad_clip: float = 1.0  # global gradient-norm clipping (0 disables), the LLaMA pretraining default
    nan_policy: Literal["stop", "skip"] = "stop"  # a non-finite loss stops the run, or skips that step's update
    max_consecutive_skips: int = 10  # with nan_policy=skip: this many non-finite steps in a row stop the run
    dist_timeout_s: int = 600  # a lost or stuck rank ends the job after this long instead of hanging it

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
    lr: float = 1e-4  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; not applied to norm weights and biases
    schedule: Literal["constant", "cosine"] = "cosine"  # after the linear warmup
    warmup_steps: int = 1000  # linear warmup from lr/warmup_steps: Adam's moment estimates start at zero
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr, reached at the token budget

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be positive")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "each beta must lie in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be positive")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # also saved at the end and on SIGTERM / SIGUSR1
    keep_last: int = 2  # complete checkpoints kept; an older one is deleted only after a newer one completes
    save_hf: bool = True  # also write an HF model (model/) so evaluation needs no DeepSpeed
    on_world_size_change: Literal["convert", "refuse"] = "convert"  # convert: to DeepSpeed's universal format

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, "checkpoint.every_steps", "must be positive")
        _require(self.keep_last >= 2, "checkpoint.keep_last", "must be >= 2 so one complete checkpoint survives a failed save")


@dataclass
class EvalConfig:
    mode: Literal["off", "inline", "watch"] = "off"
    every_tokens: int = 0
    every_steps: int = 0
    tasks: list[str] = field(
        default_factory=lambda: [
            "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
            "wikitext2", "ptb",
        ]
    )
    data_dir: str = ""  # local mirror of the evaluation datasets
    limit: int = 0  # rows per zero-shot task and windows per perplexity/validation set (0: all; smoke tests only)
    batch_size: int = 8
    task_file: str = ""  # task table: lm-eval YAML, reported metric, mirror files per task ("": the shipped one)
    ppl_seq_len: int = 128  # perplexity window, the Shortened LLaMA / LLM-Pruner protocol
    collective_timeout_s: int = 600  # a rank that fails inside a sharded task is given up on after this long
    poll_s: float = 30.0  # how often the watcher looks for new complete checkpoints

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


@dataclass
class LogConfig:
    every_steps: int = 1  # console and TensorBoard interval; train_log.jsonl always has every step
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per-device dense bf16 peak for MFU; 0: known GPUs are looked up, else no MFU
    sample_ids: bool = False  # record each step's global sample indices in train_log.jsonl (audits the data order)
    sync_timers: bool = False  # synchronise the device around phases so forward/backward/optimizer times are exact

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, "log.every_steps", "must be positive")
        _require(self.peak_tflops >= 0, "log.peak_tflops", "must be >= 0")


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto: newest complete checkpoint of run_dir, if any | never | a checkpoint directory
    # DeepSpeed engine tuning (ZeRO stage, buckets, overlap); batch sizes, precision, clipping and the optimizer
    # are derived from this config, and the file may not disagree with them
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir", "must be set")
        _require(bool(self.resume), "resume", "must be auto, never or a checkpoint path")


@dataclass
class PruneConfig:
    """`launch/prune.py`: score blocks on calibration text, remove the least important, save an HF model."""

    model: str = ""  # Hugging Face model directory (or a hub id already in the local cache)
    out: str = ""  # directory for the pruned model and prune_report.json
    criterion: Literal["ppl", "taylor", "magnitude", "bi", "angular"] = "ppl"
    remove: int = 0  # exactly one of remove / ratio / keep_blocks is set
    ratio: float = 0.0  # fraction of all parameters; see shortened/prune/budget.py for the block count
    keep_blocks: int = 0
    calib: str = ""  # .txt / .jsonl / .jsonl.zst file, a directory of them, or a token-shard directory
    calib_field: str = "text"  # JSON field holding the text
    calib_samples: int = 10  # the published protocol: 10 windows of 128 tokens
    calib_len: int = 128
    calib_batch_size: int = 10
    seed: int = 1234
    protect_first: int = 4  # the "+" heuristic: never remove the first 4 and last 2 blocks
    protect_last: int = 2
    iterative: bool = False  # remove one block, re-score, repeat (not for taylor)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda when available
    tokenizer: str = ""  # tokenizer.model (or a directory) when the model directory has none

    def __post_init__(self) -> None:
        _require(bool(self.model), "prune.model", "set the model directory (--model)")
        _require(bool(self.out), "prune.out", "set the output directory (--out)")
        _require(bool(self.calib), "prune.calib", "set the calibration text or shards (--calib)")
        given = [v for v in (self.remove, self.ratio, self.keep_blocks) if v]
        _require(len(given) == 1, "prune.remove", "give exactly one of --remove, --ratio, --keep-blocks")
        _require(self.remove >= 0 and self.keep_blocks >= 0, "prune.remove", "block counts must be >= 0")
        _require(0.0 <= self.ratio < 1.0, "prune.ratio", f"{self.ratio} is not a fraction in (0, 1)")
        _require(self.calib_samples > 0 and self.calib_len > 1, "prune.calib_samples",
                 "need at least one calibration sample of at least 2 tokens")
        _require(self.calib_batch_size > 0, "prune.calib_batch_size", "must be positive")
        _require(self.protect_first >= 0 and self.protect_last >= 0, "prune.protect_first", "must be >= 0")
        _require(not (self.iterative and self.criterion == "taylor"), "prune.iterative",
                 "taylor needs gradients of the full model; use --iterative with ppl, magnitude, bi or angular")


@dataclass
class LoraTrainConfig:
    """`launch/lora.py`: the Shortened LLaMA v1 recovery recipe (LLM-Pruner's post-training), PEFT LoRA."""

    model: str = ""  # the (pruned) Hugging Face model directory
    data: str = ""  # Alpaca-format .json (a list) or .jsonl: instruction / input / output
    out: str = ""  # run directory: checkpoints/, train_log.jsonl, merged/ (the fp16 HF model)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    epochs: int = 2
    lr: float = 1e-4
    micro_batch_size: int = 4
    grad_accum: int = 16  # batch 64 = 4 x 16
    cutoff_len: int = 256
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    train_on_inputs: bool = False  # False: the loss covers the response tokens only (alpaca-lora's default)
    seed: int = 42
    save_every_steps: int = 200
    keep_last: int = 2
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # autocast dtype; LoRA weights stay fp32
    device: str = "auto"
    tokenizer: str = ""  # tokenizer.model (or a directory) when the model directory has none

    def __post_init__(self) -> None:
        _require(bool(self.model), "lora.model", "set the model directory (--model)")
        _require(bool(self.data), "lora.data", "set the Alpaca-format data file (--data)")
        _require(bool(self.out), "lora.out", "set the output directory (--out)")
        _require(self.r > 0 and self.alpha > 0, "lora.r", "rank and alpha must be positive")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must lie in [0, 1)")
        _require(bool(self.target_modules), "lora.target_modules", "name at least one module")
        _require(self.epochs > 0 and self.lr > 0, "lora.epochs", "epochs and lr must be positive")
        _require(self.micro_batch_size > 0 and self.grad_accum > 0, "lora.micro_batch_size", "must be positive")
        _require(self.cutoff_len > 1, "lora.cutoff_len", "must be > 1")
        _require(self.warmup_steps >= 0 and self.max_grad_norm >= 0, "lora.warmup_steps", "must be >= 0")
        _require(self.save_every_steps > 0, "lora.save_every_steps", "must be positive")
        _require(self.keep_last >= 1, "lora.keep_last", "must be >= 1")


# ---------------------------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides, validating every key."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    if overrides:
        source = f"{source} + overrides {' '.join(overrides)}"
    return from_dict(cls, raw, source=source)


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
