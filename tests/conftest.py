"""Shared fixtures: paths to the real data in ../shared/data and a tiny real Llama."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_MODEL = SHARED_DATA / "llama-tokenizer" / "tokenizer.model"
SLIMPAJAMA_SAMPLE = SHARED_DATA / "slimpajama-sample"
EVAL_DATA = SHARED_DATA / "eval"

# Nothing in the tests may reach a hub; the data lives in ../shared/data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))


def free_port() -> int:
    """A TCP port nobody listens on now, so two test runs never join each other's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    assert TOKENIZER_MODEL.is_file(), f"missing {TOKENIZER_MODEL}: the shared data must sit beside the repo"
    return TOKENIZER_MODEL


@pytest.fixture(scope="session")
def slimpajama_sample() -> Path:
    assert SLIMPAJAMA_SAMPLE.is_dir(), f"missing {SLIMPAJAMA_SAMPLE}"
    return SLIMPAJAMA_SAMPLE


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: this checkout first on PYTHONPATH, offline, extensions kept in the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env
