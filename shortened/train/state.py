"""The typed run state: what a checkpoint's training_state.json holds, and what a run must share with a checkpoint.

The file is the JSON of `TrainingState.to_dict()` (sorted keys, as `atomic_write_json` writes it). Its keys are
exactly the dataclass fields; a reader refuses a file with a key missing, an unknown key, a value of the wrong type or
another `format_version`, naming the file, so a checkpoint is never half-understood. A new field (per-domain
counters, a distillation teacher's state) bumps FORMAT_VERSION and gives `from_dict` a reader for the older versions.

Format 2 added `mixture` (the `data.mixture` sampler's state, null without one); a format-1 file reads as format 2
with `mixture` null, which is what it meant.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortened.data.mixture import MixtureError, MixtureState

FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the checkpoint, the difference and the fix."""


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run resuming it (the data fingerprint may differ, with a warning)."""

    seq_len: int
    tokenizer_sha256: str
    data_fingerprint: str | None  # None: shards from before manifests had one
    architecture: dict[str, Any]  # the Hugging Face config fields the weights depend on; not to be mutated

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path) -> RunIdentity:
        return cls(**_fields(cls, data, source, "identity"))


@dataclass(frozen=True)
class TrainingState:
    """A checkpoint's position in the run (step, samples, tokens) and the settings its states are laid out for."""

    format_version: int
    step: int
    consumed_samples: int
    tokens: int
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    zero_stage: int
    precision: str
    config_hash: str
    identity: RunIdentity
    versions: dict[str, str]  # deepspeed and torch that wrote it; informative only
    mixture: MixtureState | None = None  # data.mixture's per-source counters, remainders and weights (format 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # recurses into identity

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | Path) -> TrainingState:
        """`source` (the file) is named in every error."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: not a training state (a JSON object), but {type(data).__name__}")
        version = data.get("format_version")
        if version == 1:  # format 1 predates data.mixture
            data = {**data, "format_version": FORMAT_VERSION, "mixture": None}
        elif version != FORMAT_VERSION:  # checked first: another version may have other keys
            raise CheckpointError(f"{source}: training state format {version}, this trainer reads {FORMAT_VERSION}")
        values = _fields(cls, data, source)
        values["identity"] = RunIdentity.from_dict(values["identity"], source)
        if values["mixture"] is not None:
            try:
                values["mixture"] = MixtureState.from_dict(values["mixture"])
            except MixtureError as err:
                raise CheckpointError(f"{source}: mixture: {err}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str, source: str | Path) -> TrainingState:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise CheckpointError(f"{source}: not valid JSON ({err})") from None
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, path: Path) -> TrainingState:
        try:
            text = path.read_text()
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read the training state ({err})") from None
        return cls.from_json(text, path)


# JSON types of the fields (bool is an int to Python, never a count here).
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "str": (str,), "str | None": (str, type(None)),
                                            "RunIdentity": (dict,), "dict[str, Any]": (dict,),
                                            "dict[str, str]": (dict,), "MixtureState | None": (dict, type(None))}


def _fields(cls: type, data: Any, source: str | Path, where: str = "") -> dict[str, Any]:
    """`data`'s values for the fields of `cls`, or a CheckpointError naming the file and the keys that differ."""
    at = f" in {where!r}" if where else ""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: {where or 'the training state'} is {type(data).__name__}, not an object")
    fields = {field.name: str(field.type) for field in dataclasses.fields(cls)}
    missing, unknown = sorted(set(fields) - set(data)), sorted(set(data) - set(fields))
    if missing or unknown:
        said = [f"missing keys {missing}" if missing else "", f"unknown keys {unknown}" if unknown else ""]
        raise CheckpointError(f"{source}: not a format-{FORMAT_VERSION} training state: "
                              + ", ".join(s for s in said if s) + at)
    for name, kind in fields.items():
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[kind]):
            raise CheckpointError(f"{source}: {name}{at} is {value!r}, expected {kind}")
    return dict(data)
