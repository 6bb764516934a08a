"""shortened.rng: the one RNG capture / restore of the trainer, the LoRA run and the evaluation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from shortened.rng import (
    capture_rng_state,
    load_rng_state,
    preserved_rng,
    preserved_rng_and_mode,
    restore_rng_state,
    save_rng_state,
    seed_everything,
)


def draws() -> dict[str, object]:
    """The next numbers of every global generator; gaussians too, whose cached second value is part of the state."""
    out: dict[str, object] = {
        "python": [random.random(), random.gauss(0, 1), random.getrandbits(64)],
        "numpy": np.concatenate([np.random.rand(4), np.random.standard_normal(3), np.random.randint(0, 2**31, 4)]),
        "torch": torch.cat([torch.rand(4), torch.randn(3)]),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.rand(4, device="cuda").cpu()
    return out


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    assert a["python"] == b["python"]
    assert np.array_equal(a["numpy"], b["numpy"])
    assert torch.equal(a["torch"], b["torch"])
    if "cuda" in a:
        assert torch.equal(a["cuda"], b["cuda"])


def warm_up() -> None:
    """Leave every generator mid-stream, with a cached gaussian pending in python and numpy."""
    seed_everything(1234)
    if torch.cuda.is_available():
        torch.rand(1, device="cuda")  # initialises CUDA, so its generators are captured
    random.gauss(0, 1)
    np.random.standard_normal()
    torch.randn(5)


def test_round_trip_through_a_file_loaded_with_weights_only(tmp_path):
    warm_up()
    path = tmp_path / "rng" / "rank_00000.pt"
    save_rng_state(path)
    expected = draws()

    seed_everything(99)  # anything else in between
    draws()
    state = torch.load(path, map_location="cpu", weights_only=True)  # the safe loader accepts the file
    assert set(state) == {"python", "numpy", "torch"} | ({"cuda"} if torch.cuda.is_available() else set())
    restore_rng_state(state)
    assert_same(draws(), expected)

    restore_rng_state(load_rng_state(path))  # the same through the module's loader
    assert_same(draws(), expected)


def test_preserved_rng_leaves_the_streams_as_they_were_even_on_error():
    warm_up()
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    with pytest.raises(RuntimeError):
        with preserved_rng():
            draws()
            seed_everything(7)  # what lm-eval does
            raise RuntimeError("a failing evaluation")
    assert_same(draws(), expected)


def test_preserved_rng_and_mode_restores_modes_module_by_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.ReLU()))
    model.train()
    model[2].eval()  # a mixed mode must come back exactly, not as one model.train()
    before = [m.training for m in model.modules()]
    warm_up()
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    with pytest.raises(ValueError):
        with preserved_rng_and_mode(model, eval_mode=True):
            assert not any(m.training for m in model.modules())
            draws()
            raise ValueError("boom")
    assert [m.training for m in model.modules()] == before
    assert_same(draws(), expected)

    with preserved_rng_and_mode(model):  # without eval_mode: the mode is left alone inside, restored after
        assert [m.training for m in model.modules()] == before
        model.eval()
    assert [m.training for m in model.modules()] == before
