"""Bad input to the trainer, done for real: a missing manifest, a truncated or deleted shard, a flipped bit, an empty
corpus, a vocabulary the model lacks, a mistyped key. Each ends in one `error: ...` line naming the file or key,
exit 2, no traceback, and no step trained on damaged data.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from shortened.config import RunConfig, load_config
from shortened.data.loader import SequenceDataset, collate
from shortened.data.sampler import GlobalOrderSampler
from shortened.data.shards import HEADER_BYTES, PackedShards, read_header
from shortened.modeling import build_tiny_llama, save_with_tokenizer
from shortened.train.loop import TokenOutOfRange, check_token_range
from shortened.train.plan import check_data_fits

import warm_start
from conftest import subprocess_env
from train_support import CPT, GLOBAL_BATCH, RECIPE, overrides

pytestmark = pytest.mark.timeout(300)
DATA_SEED = 1234  # the recipe's data.seed


def train(run_dir: Path, shards: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    """One process, no launcher; stderr kept apart so the test sees exactly what the user sees."""
    return warm_start.run([CPT, "--config", RECIPE, *overrides(run_dir, shards, model, "train.max_steps=2", *extra)],
                          timeout=240, env=subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def shards(tmp_path, train_shards_64) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(train_shards_64, copy)
    return copy


def truncate(shards: Path) -> str:
    shard = shards / "shard_00000.bin"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 4096)
    return str(shard)


def delete(shards: Path) -> str:
    (shards / "shard_00000.bin").unlink()
    return "shard_00000.bin: missing shard"


def remove_manifest(shards: Path) -> str:
    (shards / "manifest.json").unlink()
    return "manifest.json: no manifest"


def empty(shards: Path) -> str:
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["shards"]:
        (shards / entry["file"]).unlink()
    manifest.update(shards=[], num_sequences=0, tokens_in_sequences=0)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return "holds no sequences"


@pytest.mark.parametrize("fault", [truncate, delete, remove_manifest, empty])
def test_damaged_or_missing_data_is_one_line_exit_2_before_any_step(tmp_path, shards, tiny_init_model, fault):
    said = fault(shards)
    result = train(tmp_path / "run", shards, tiny_init_model)
    assert_one_line_error(result, said)
    assert not (tmp_path / "run" / "train_log.jsonl").exists() or not (tmp_path / "run" / "train_log.jsonl").read_text()


def test_a_config_mistake_is_exit_2_naming_the_key(tmp_path, train_shards_64, tiny_init_model):
    result = train(tmp_path / "run", train_shards_64, tiny_init_model, "train.grad_clipping=1")
    assert_one_line_error(result, "train.grad_clipping", "tiny-cpu.yaml")


def test_a_key_given_twice_in_the_config_file_is_refused_naming_file_line_and_key(tmp_path, train_shards_64,
                                                                                   tiny_init_model):
    """YAML keeps the last of two equal keys without a word: the recipe's reader would train with the other lr."""
    lines = RECIPE.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("lr:"))
    lines.insert(first + 1, "  lr: 3.0e-4\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(lines))
    result = warm_start.run([CPT, "--config", recipe, *overrides(tmp_path / "run", train_shards_64, tiny_init_model)],
                            timeout=240, env=subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert_one_line_error(result, str(recipe), f"line {first + 2}", "'lr'", f"first on line {first + 1}")
    assert not (tmp_path / "run").exists()


def test_a_model_with_a_smaller_vocabulary_than_the_shards_is_refused(tmp_path, train_shards_64, tokenizer_model):
    small = tmp_path / "small_vocab"
    save_with_tokenizer(build_tiny_llama(num_layers=2, vocab_size=1000), small, tokenizer_model)
    result = train(tmp_path / "run", train_shards_64, small)
    assert_one_line_error(result, "32000-token vocabulary", "vocab_size=1000")


def first_sample(shards: Path) -> int:
    sampler = GlobalOrderSampler(len(PackedShards(shards)), GLOBAL_BATCH, 1, 0, 1, DATA_SEED)
    return int(sampler.global_indices(0, 1)[0])


def test_a_flipped_bit_in_a_shard_stops_training_before_the_sample_reaches_the_model(tmp_path, shards,
                                                                                       tiny_init_model):
    """The first sample of step 1 gets one low bit flipped: the size is unchanged, so only its CRC can tell."""
    sample = first_sample(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    ends = np.cumsum([entry["num_sequences"] for entry in manifest["shards"]])
    shard_index = int(np.searchsorted(ends, sample, side="right"))
    row = sample - (int(ends[shard_index - 1]) if shard_index else 0)
    path = shards / manifest["shards"][shard_index]["file"]
    header = read_header(path)
    offset = header.tokens_offset + row * header.seq_len * np.dtype(header.dtype).itemsize + 10
    assert offset >= HEADER_BYTES
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))
    result = train(tmp_path / "run", shards, tiny_init_model)
    line = assert_one_line_error(result, path.name)
    assert "CRC" in line or "crc" in line, line
    log = tmp_path / "run" / "train_log.jsonl"
    assert not log.exists() or not log.read_text().strip()  # no step was trained
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_token_id_past_the_embedding_is_named_with_its_sample(train_shards_64):
    items = [SequenceDataset(PackedShards(train_shards_64))[i] for i in (5, 9)]
    batch = collate(items)
    check_token_range(batch, 32000)
    batch["input_ids"][1, 3] = 32000
    with pytest.raises(TokenOutOfRange, match=r"sample 9 holds token id 32000, outside the model's vocabulary "
                                              r"of 32000"):
        check_token_range(batch, 32000)
    batch["input_ids"] = torch.full_like(batch["input_ids"], -1)
    with pytest.raises(TokenOutOfRange, match="sample 5 holds token id -1"):
        check_token_range(batch, 32000)


def test_a_global_batch_larger_than_the_dataset_is_warned_about(caplog):
    config = load_config(RunConfig, RECIPE, ["train.global_batch_size=8", "train.micro_batch_size=1",
                                             "data.path=one-sequence"])
    with caplog.at_level(logging.WARNING):
        check_data_fits(config, {"num_sequences": 1, "vocab_size": 32000}, {"vocab_size": 32000})
    assert "larger than the whole dataset (1 sequences in one-sequence): every step trains on 8.0 copies" in caplog.text
