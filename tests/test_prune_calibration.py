"""Calibration windows from real text files: every supported input, determinism, and errors that name the fix."""
from __future__ import annotations

import json

import pytest
import torch

from shortened.prune.calibration import CalibrationError, calibration_windows, read_documents
from shortened.tokenizer import load_tokenizer

from conftest import EVAL_DATA, SLIMPAJAMA_SAMPLE

WIKITEXT = EVAL_DATA / "wikitext2"
SLIM_FILE = SLIMPAJAMA_SAMPLE / "validation" / "chunk1" / "example_holdout_0.jsonl.zst"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return load_tokenizer(tokenizer_model)


def contains(sequence: list[int], window: list[int]) -> bool:
    return any(sequence[i : i + len(window)] == window for i in range(len(sequence) - len(window) + 1))


@pytest.mark.parametrize("source", ["wikitext_jsonl", "wikitext_raw", "slimpajama_zst", "slimpajama_dir", "txt"])
def test_windows_are_token_slices_of_real_documents(source, tokenizer, tmp_path):
    path = {
        "wikitext_jsonl": WIKITEXT / "test.jsonl",
        "wikitext_raw": WIKITEXT / "wiki.test.raw",
        "slimpajama_zst": SLIM_FILE,
        "slimpajama_dir": SLIMPAJAMA_SAMPLE / "validation",
        "txt": tmp_path / "docs.txt",
    }[source]
    if source == "txt":
        rows = [json.loads(line)["text"] for line in (WIKITEXT / "test.jsonl").open()][:400]
        path.write_text("\n\n".join(r.strip() for r in rows if r.strip()))
    windows = calibration_windows(path, tokenizer, 4, 96, seed=1234)
    assert windows.shape == (4, 96) and windows.dtype == torch.int64
    documents = [[tokenizer.bos_id] + tokenizer.encode(doc) for doc in read_documents(path)]
    for window in windows.tolist():
        assert any(contains(doc, window) for doc in documents if len(doc) >= 96)
    assert torch.equal(windows, calibration_windows(path, tokenizer, 4, 96, seed=1234))
    assert not torch.equal(windows, calibration_windows(path, tokenizer, 4, 96, seed=1235))


def test_custom_field_and_errors_name_the_file_and_the_fix(tokenizer, tmp_path):
    rows = [json.loads(line) for line in (WIKITEXT / "test.jsonl").open()][:300]
    good = tmp_path / "body.jsonl"
    good.write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in rows))
    assert calibration_windows(good, tokenizer, 2, 64, seed=0, field="body").shape == (2, 64)
    with pytest.raises(CalibrationError, match=r"body.jsonl:1: no string field 'text'; pass --calib-field"):
        calibration_windows(good, tokenizer, 2, 64, seed=0)
    with pytest.raises(CalibrationError, match=r"only 0 of which have >= 4096 tokens; 2 samples of 4096 tokens "
                                               r"need 2 documents.*--calib-len"):
        calibration_windows(good, tokenizer, 2, 4096, seed=0, field="body")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(CalibrationError, match=r"broken.jsonl:2: not valid JSON"):
        read_documents(broken)
    (tmp_path / "body.jsonl.gz").write_bytes(b"")
    with pytest.raises(CalibrationError, match="unsupported calibration file"):
        read_documents(tmp_path / "body.jsonl.gz")
    with pytest.raises(CalibrationError, match="no such calibration file"):
        read_documents(tmp_path / "missing.jsonl")


def test_windows_from_real_token_shards(sample_shards, tokenizer, tmp_path):
    from shortened.data.shards import open_shards

    windows = calibration_windows(sample_shards, tokenizer, 6, 128, seed=1234)
    assert windows.shape == (6, 128) and windows.dtype == torch.int64
    shards = open_shards(sample_shards)
    sequences = [shards[i].tolist() for i in range(len(shards))]
    assert all(any(contains(seq, w) for seq in sequences) for w in windows.tolist())
    assert torch.equal(windows, calibration_windows(sample_shards, tokenizer, 6, 128, seed=1234))
    assert not torch.equal(windows, calibration_windows(sample_shards, tokenizer, 6, 128, seed=99))
    with pytest.raises(CalibrationError, match="sequences hold 2048 tokens"):
        calibration_windows(sample_shards, tokenizer, 2, 4096, seed=0)

    # Shards of another tokenizer: the manifest's sha256 is what a reader trusts, so change it there.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for item in sample_shards.iterdir():
        if item.is_file():
            (foreign / item.name).symlink_to(item)
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (foreign / "manifest.json").unlink()
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CalibrationError, match=r"manifest.json: shards were tokenized with tokenizer sha256 000000"):
        calibration_windows(foreign, tokenizer, 2, 128, seed=0)
