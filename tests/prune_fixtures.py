"""The trained tiny Llama shared by the pruning and LoRA tests, built once per test session.

Blocks 2 and 3 are exact identities (o_proj and down_proj zero, kept frozen); the model is then trained until it
has memorised the calibration windows, so every other block matters on them, as every block of a pretrained LLM
matters on real text. (A barely-trained tiny model has blocks whose removal *lowers* perplexity, and logits too
flat for LoRA to move; neither pruning criteria nor LoRA could be checked against it.)
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from shortened.modeling import build_tiny_llama, save_with_tokenizer
from shortened.prune.calibration import calibration_windows
from shortened.tokenizer import load_tokenizer

from conftest import SLIMPAJAMA_SAMPLE

CALIB = SLIMPAJAMA_SAMPLE / "validation"
CALIB_SAMPLES, CALIB_LEN = 8, 64  # smaller than the published 10 x 128 only to keep the test model's training short
IDENTITY = [2, 3]
NUM_LAYERS = 6


def make_identity(model: torch.nn.Module, blocks: list[int]) -> None:
    with torch.no_grad():
        for index in blocks:
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


@functools.cache
def _windows(tokenizer_model: Path) -> torch.Tensor:
    return calibration_windows(CALIB, load_tokenizer(tokenizer_model), CALIB_SAMPLES, CALIB_LEN, 1234)


def _trained_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_model: Path) -> Path:
    """Trained once per test session: under xdist the workers share the session's temporary root, and the first to
    take the lock trains (alone, with every core) while the others wait for its result."""
    shared = tmp_path_factory.getbasetemp().parent if "PYTEST_XDIST_WORKER" in os.environ \
        else tmp_path_factory.getbasetemp()
    out = shared / "trained_tiny_model"
    with FileLock(str(shared / "trained_tiny_model.lock")):
        if not (out / "tokenizer.model").is_file():  # written last by save_with_tokenizer
            save_with_tokenizer(_train(tokenizer_model), out, tokenizer_model)
    return out


def _train(tokenizer_model: Path) -> torch.nn.Module:
    windows = _windows(tokenizer_model)
    model = build_tiny_llama(seed=0, num_layers=NUM_LAYERS)
    make_identity(model, IDENTITY)
    for index in IDENTITY:
        model.model.layers[index].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(40):
        model(input_ids=windows, labels=windows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def windows(tokenizer_model: Path) -> torch.Tensor:
    return _windows(tokenizer_model)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_model: Path) -> Path:
    return _trained_model_dir(tmp_path_factory, tokenizer_model)
