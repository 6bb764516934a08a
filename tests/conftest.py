"""Shared fixtures: paths to the real data in ../shared/data and a tiny real Llama."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shortened.ports import free_port  # noqa: F401  (the tests' one free_port)

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
# The virtualenv's tools first, as in an activated venv, so every process builds DeepSpeed's ops with the venv's ninja:
# a system ninja of another version hashes .ninja_log differently, and each would rebuild the shared op (~80 s of two
# compilers) whenever the other built it last.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

# The pruning tests' trained tiny model and calibration windows, shared by the prune and LoRA tests.
from prune_fixtures import model_dir, windows  # noqa: E402, F401

# The longest files first (seconds measured in one `make test` on 2 cores): `make test` hands whole files to its two
# workers in this order (xdist's --no-loadscope-reorder; by default it sorts files by their number of tests, which
# put the one-test demo last, running alone for minutes while the other core idled).
LONGEST_FIRST = ("test_train_dist.py",  # ~450 s
                 "test_preemption.py",  # ~400
                 "test_demo.py",  # ~300
                 "test_tied.py",  # 65-150 on a loaded box
                 "test_train_compile.py",  # 110-150 with inductor's cache warm, ~450 cold on a loaded box
                 "test_lora.py", "test_prune.py", "test_eval_watch.py", "test_eval_dist.py",  # 45-70
                 "test_mixture.py", "test_llama3.py", "test_dynamic.py",  # ~60-110 on a loaded box
                 "test_train_distill.py", "test_multinode.py", "test_eval_zero_shot.py",  # 35-45
                 "test_build_locks_job.py")  # ~40


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    assert TOKENIZER_MODEL.is_file(), f"missing {TOKENIZER_MODEL}: the shared data must sit beside the repo"
    return TOKENIZER_MODEL


@pytest.fixture(scope="session")
def slimpajama_sample() -> Path:
    assert SLIMPAJAMA_SAMPLE.is_dir(), f"missing {SLIMPAJAMA_SAMPLE}"
    return SLIMPAJAMA_SAMPLE


def launcher(path: str) -> ModuleType:
    """A launch script as a module (not run as __main__), so its main(argv) can be called here."""
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_under_test", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: this checkout first on PYTHONPATH, offline, extensions kept in the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def read_original_documents(root: Path) -> list[dict]:
    """The raw records of every .jsonl.zst under root, in sorted path order, read independently of our code."""
    import io
    import json

    import zstandard

    records = []
    for path in sorted(root.rglob("*.jsonl.zst")):
        with open(path, "rb") as handle:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(handle), encoding="utf-8")
            records.extend(json.loads(line) for line in text)
    return records


def shard_documents(shards_dir: Path) -> tuple[list[list[int]], list[int]]:
    """Complete documents (ids between <s> and </s>) recovered from shards via the recorded document starts,
    plus the ids of a final document cut by the dropped partial sequence."""
    import numpy as np

    from shortened.data.shards import Shard, read_manifest

    manifest = read_manifest(shards_dir)
    streams, starts, offset = [], [], 0
    for entry in manifest["shards"]:
        shard = Shard(shards_dir / entry["file"])
        streams.append(np.asarray(shard.tokens).reshape(-1))
        starts.append(np.asarray(shard.doc_starts) + offset)
        offset += shard.header.num_tokens
    stream = np.concatenate(streams).tolist()
    bounds = np.concatenate(starts).tolist() + [len(stream)]
    docs = [stream[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    tail = docs.pop() if docs and docs[-1][-1] != manifest["eos_id"] else []
    return docs, tail


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, slimpajama_sample, tokenizer_model) -> Path:
    """The shared SlimPajama train sample prepared once with the real tokenizer (seq_len 2048, 2 workers)."""
    from shortened.data.prepare import PrepareConfig, prepare_shards

    out = tmp_path_factory.mktemp("sample_shards")
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model),
                                 output=str(out), seq_len=2048, workers=2, progress=False,
                                 verbose=False))
    return out


@pytest.fixture(scope="session")
def train_shards_64(tmp_path_factory, slimpajama_sample, tokenizer_model) -> Path:
    """The shared train sample as 64-token sequences (~21k samples) for trainer tests, prepared once."""
    from shortened.data.prepare import PrepareConfig, prepare_shards

    out = tmp_path_factory.mktemp("train_shards_64")
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model),
                                 output=str(out), seq_len=64, workers=2, progress=False, verbose=False))
    return out


@pytest.fixture(scope="session")
def tiny_init_model(tmp_path_factory, tokenizer_model) -> Path:
    """A saved 2-layer, hidden-64 Llama (real 32k vocabulary) with tokenizer.model: the trainer's model.init_from."""
    from shortened.modeling import build_tiny_llama, save_with_tokenizer

    out = tmp_path_factory.mktemp("tiny_init_model")
    save_with_tokenizer(build_tiny_llama(seed=0, num_layers=2), out, tokenizer_model)
    return out
