"""A Hugging Face model directory, checked the same way by every command that takes one before it loads it.

`from_pretrained` on a directory without weights, on a safetensors file cut short, or beside a damaged tokenizer
fails deep inside transformers (or SentencePiece) with a traceback. These checks read headers only (milliseconds
for a 7B checkpoint) and name the setting, the file and the fix on one line: a `ModelDirError` is a `ConfigError`,
which every command reports as bad input (one `error:` line, exit 2). Nothing heavy is imported here, so the
commands still answer --help and bad arguments without transformers.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from shortened.config import ConfigError
from shortened.tokenizer import TokenizerNotFound, TokenizerUnreadable, load_tokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# The weight files transformers loads, in its order of preference.
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6; older pickles are left to torch


class ModelDirError(ConfigError):
    """A model directory (or cached hub id) given to a command cannot be loaded; the message names the setting, the
    file and the fix."""


def resolve_model_dir(ref: str, setting: str) -> Path:
    """`ref` as a local directory, or a hub id's copy in the local cache (never downloaded here), checked loadable.

    `setting` is where `ref` was given, for the messages: a config key (`model.init_from`) or a flag (`--model`).
    """
    if not ref:
        raise ModelDirError(f"{setting}: must name a Hugging Face model directory (or a cached hub id)")
    path = Path(ref)
    if not path.is_dir():
        path = _cached_snapshot(ref, setting)
    return check_model_dir(path, setting)


def check_model_dir(path: Path, setting: str) -> Path:
    """`path` when `from_pretrained` can load it: a readable config.json, complete weight files, and a tokenizer that
    loads where there is one (a model may come without; the commands that need one say so)."""
    name = given_as(setting, path)
    config = path / "config.json"
    if not config.is_file():
        raise ModelDirError(f"{name}: no such Hugging Face model directory ({config} is missing); pass the directory "
                            "save_pretrained wrote")
    _read_json(config, name)
    for weights in _weight_files(path, name):
        _check_weight_file(weights, name)
    try:
        load_tokenizer(path)
    except TokenizerUnreadable as err:
        raise ModelDirError(f"{name}: {err}") from None
    except TokenizerNotFound:
        pass
    return path


def given_as(setting: str, ref: str | Path) -> str:
    """How the user gave it: `--model DIR` for a flag, `model.init_from=DIR` for a config key."""
    return f"{setting} {ref}" if setting.startswith("-") else f"{setting}={ref}"


def _cached_snapshot(ref: str, setting: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as err:  # the hub client raises several types for "not cached" / "bad id"
        raise ModelDirError(f"{given_as(setting, ref)}: not a model directory, and not a hub id in the local Hugging "
                            f"Face cache ({type(err).__name__}); where a network exists run `huggingface-cli download "
                            f"{ref}` first, or pass the model's directory") from None


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelDirError(f"{name}: {path} is unreadable ({type(err).__name__}: {err}); copy it again") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{name}: {path} must hold a JSON object; copy it again")
    return data


def _weight_files(path: Path, name: str) -> list[Path]:
    """The files transformers would read the weights from: the preferred format's single file, or its index's
    shards."""
    for file in WEIGHT_FILES:
        if (path / file).is_file():
            if file not in (SAFETENSORS_INDEX, BIN_INDEX):
                return [path / file]
            weight_map = _read_json(path / file, name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelDirError(f"{name}: {path / file} has no weight_map; copy it again")
            return [path / shard for shard in sorted(set(weight_map.values()))]
    raise ModelDirError(f"{name}: no weights in {path} (none of {', '.join(WEIGHT_FILES)}); a model directory holds "
                        "what save_pretrained writes, config.json and the weights beside it")


def _check_weight_file(file: Path, name: str) -> None:
    """A file cut short (an interrupted copy or download) or missing fails here, reading its header or directory
    only."""
    if not file.is_file():
        raise ModelDirError(f"{name}: {file} is missing (its index lists it); copy the model again")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt"):  # checks the header against the file's size
                pass
        elif _starts_with(file, ZIP_MAGIC):
            with zipfile.ZipFile(file):  # a zip's directory is at its end: a truncated file has none
                pass
    except Exception as err:  # safetensors raises its own SafetensorError, derived from Exception only
        raise ModelDirError(f"{name}: {file} is damaged or cut short ({' '.join(str(err).split())}); copy the model "
                            "again") from None


def _starts_with(file: Path, magic: bytes) -> bool:
    with open(file, "rb") as handle:
        return handle.read(len(magic)) == magic
