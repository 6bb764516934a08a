"""A model directory that cannot be loaded, done for real and given to the commands that take one: no weights, a
`model.safetensors` cut short, a damaged `tokenizer.model`. Each is one `error: ...` line naming the setting and
the file, exit 2, no traceback (shortened/model_dir.py, checked before any weight is loaded).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_train_faults import assert_one_line_error, train

import warm_start
from conftest import EVAL_DATA, ROOT, subprocess_env

pytestmark = pytest.mark.timeout(300)
WEIGHTS = "model.safetensors"


def without_weights(model: Path) -> Path:
    (model / WEIGHTS).unlink()
    return model


def weights_cut_short(model: Path) -> Path:
    weights = model / WEIGHTS
    with open(weights, "r+b") as handle:  # an interrupted copy: the header is whole, the tensors are not
        handle.truncate(weights.stat().st_size // 2)
    return weights


def damaged_tokenizer(model: Path) -> Path:
    tokenizer = model / "tokenizer.model"
    data = bytearray(tokenizer.read_bytes())
    data[1000:1100] = b"\xff" * 100  # overwritten in place: the size is unchanged
    tokenizer.write_bytes(bytes(data))
    return tokenizer


@pytest.fixture
def model(tmp_path, tiny_init_model) -> Path:
    return Path(shutil.copytree(tiny_init_model, tmp_path / "model"))


def evaluate(model: Path) -> subprocess.CompletedProcess:
    return warm_start.run([ROOT / "launch" / "evaluate.py", "--model", str(model), "--data-dir", str(EVAL_DATA),
                           "--tasks", "piqa", "--limit", "2"], env=subprocess_env(), timeout=240)


@pytest.mark.parametrize("fault, said", [(without_weights, "no weights in"), (weights_cut_short, "cut short")])
def test_evaluate_refuses_a_model_without_whole_weights(model, fault, said):
    damaged = fault(model)
    assert_one_line_error(evaluate(model), f"--model {model}", str(damaged), said)


@pytest.mark.parametrize("fault, said", [(without_weights, "no weights in"), (weights_cut_short, "cut short"),
                                         (damaged_tokenizer, "SentencePiece")])
def test_training_refuses_an_init_model_that_does_not_load(tmp_path, train_shards_64, model, fault, said):
    damaged = fault(model)
    result = train(tmp_path / "run", train_shards_64, model)
    assert_one_line_error(result, f"model.init_from={model}", str(damaged), said)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("fault, said", [(without_weights, "no weights in"), (damaged_tokenizer, "SentencePiece")])
def test_training_refuses_a_teacher_that_does_not_load(tmp_path, train_shards_64, tiny_init_model, model, fault,
                                                       said):
    damaged = fault(model)
    result = train(tmp_path / "run", train_shards_64, tiny_init_model, f"distill.teacher={model}")
    assert_one_line_error(result, f"distill.teacher={model}", str(damaged), said)
