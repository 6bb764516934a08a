"""Every kind of bad input, mixed with good lines: exact counts per reason and file, no good document lost."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from shortened.data.prepare import PrepareConfig, prepare_shards

from conftest import ROOT, shard_documents, subprocess_env


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


def doc(text: str, source: str = "RedPajamaC4") -> dict:
    return {"text": text, "meta": {"redpajama_set_name": source}}


def build_corpus(root: Path) -> list[str]:
    """Writes the fixture; returns the good texts in the order the pipeline must keep them."""
    (root / "chunk1").mkdir(parents=True)
    (root / "chunk2").mkdir()
    good: list[str] = []

    (root / "chunk1" / "empty.jsonl.zst").write_bytes(b"")
    (root / "chunk1" / "empty_frame.jsonl.zst").write_bytes(zst(b""))

    # Many good documents in a first frame (several work units), then garbage where a second frame should be.
    frame = [doc(f"garbage-file document {i}: " + "word " * 150) for i in range(200)]
    good += [d["text"] for d in frame]
    (root / "chunk1" / "garbage.jsonl.zst").write_bytes(zst(b"".join(map(line, frame))) + b"\x00garbage" * 50)

    mixed = [
        line(doc("first good line")),
        b'{"text": "unterminated\n',  # malformed_json
        line(doc("second good line", "RedPajamaGithub")),
        line({"meta": {"redpajama_set_name": "RedPajamaC4"}}),  # missing_text
        line({"text": 42}),  # non_string_text
        line({"text": ""}),  # empty_text
        b'{"text": "bad \xff byte"}\n',  # invalid_utf8
        b"\n",  # blank_line
        line(["not", "an", "object"]),  # missing_text
        b'{"text": "lone \\ud800 surrogate"}\n',  # invalid_utf8 (valid JSON, not encodable text)
        line(doc("na\u00efve caf\u00e9 \u2014 \u6771\u4eac  double  spaces\ttab")),
        line({"text": None}),  # non_string_text
        json.dumps(doc("last line, no newline")).encode(),
    ]
    good += ["first good line", "second good line", "na\u00efve caf\u00e9 \u2014 \u6771\u4eac  double  spaces\ttab",
             "last line, no newline"]
    (root / "chunk1" / "good_mixed.jsonl.zst").write_bytes(zst(b"".join(mixed)))

    (root / "chunk1" / "lfs.jsonl.zst").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")

    # A complete first frame of good documents, then a second frame cut in half (one long document).
    first = [doc(f"truncated-file document {i}: " + "token " * 120) for i in range(200)]
    good += [d["text"] for d in first]
    cut = zst(line(doc("never complete " + "x" * 300_000)))
    (root / "chunk1" / "truncated.jsonl.zst").write_bytes(zst(b"".join(map(line, first))) + cut[: len(cut) // 2])

    frames = zst(line(doc("frame one", "RedPajamaWikipedia"))) + zst(line(doc("frame two", "RedPajamaWikipedia")))
    (root / "chunk2" / "multi_frame.jsonl.zst").write_bytes(frames)
    good += ["frame one", "frame two"]

    (root / "chunk2" / "plain.jsonl").write_bytes(line(doc("plain file line")) + b"{oops}\n")
    good += ["plain file line"]
    return good


EXPECTED_BAD = {
    "blank_line": 1, "corrupt_zst": 2, "empty_file": 2, "empty_text": 1, "invalid_utf8": 2, "lfs_pointer": 1,
    "malformed_json": 2, "missing_text": 2, "non_string_text": 2,
}
EXPECTED_BY_FILE = {
    "chunk1/empty.jsonl.zst": {"empty_file": 1},
    "chunk1/empty_frame.jsonl.zst": {"empty_file": 1},
    "chunk1/garbage.jsonl.zst": {"corrupt_zst": 1},
    "chunk1/good_mixed.jsonl.zst": {"blank_line": 1, "empty_text": 1, "invalid_utf8": 2, "malformed_json": 1,
                                    "missing_text": 2, "non_string_text": 2},
    "chunk1/lfs.jsonl.zst": {"lfs_pointer": 1},
    "chunk1/truncated.jsonl.zst": {"corrupt_zst": 1},
    "chunk2/plain.jsonl": {"malformed_json": 1},
}


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_is_counted_exactly_and_good_documents_kept(tmp_path, tokenizer_model, workers):
    good = build_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    manifest = prepare_shards(PrepareConfig(
        input=str(tmp_path / "corpus"), tokenizer=str(tokenizer_model), output=str(out), seq_len=64,
        workers=workers, unit_bytes=32 << 10, progress=False, verbose=False))
    assert manifest["bad"] == EXPECTED_BAD
    assert manifest["bad_by_file"] == EXPECTED_BY_FILE
    assert "chunk1/good_mixed.jsonl.zst:2: malformed_json" in manifest["bad_examples"]

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert manifest["docs_total"] == len(good)
    assert manifest["tokens_total"] == sum(len(sp.encode(t)) + 2 for t in good)
    docs, tail = shard_documents(out)
    kept = [sp.decode(ids[1:-1]) for ids in docs]
    assert kept == good[: len(kept)]
    # What is not in a sequence is exactly the dropped partial sequence at the very end.
    rest = sum(len(sp.encode(t)) + 2 for t in good[len(kept):])
    assert rest == len(tail) + manifest["tokens_dropped"] < 64
    assert manifest["sources"]["RedPajamaWikipedia"]["docs"] == 2
    assert manifest["sources"]["RedPajamaGithub"]["docs"] == 1


def test_strict_stops_at_the_first_bad_line(tmp_path, tokenizer_model):
    build_corpus(tmp_path / "corpus")
    only_mixed = tmp_path / "mixed"
    only_mixed.mkdir()
    (only_mixed / "good_mixed.jsonl.zst").write_bytes((tmp_path / "corpus/chunk1/good_mixed.jsonl.zst").read_bytes())
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / "slimpajama.py"), "--input", str(only_mixed), "--tokenizer",
         str(tokenizer_model), "--output", str(tmp_path / "out"), "--seq-len", "64", "--strict", "--no-progress"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "good_mixed.jsonl.zst:2: malformed_json" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_summary_names_every_bad_file(tmp_path, tokenizer_model):
    build_corpus(tmp_path / "corpus")
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / "slimpajama.py"), "--input", str(tmp_path / "corpus"),
         "--tokenizer", str(tokenizer_model), "--output", str(tmp_path / "out"), "--seq-len", "64", "--no-progress"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120, check=True)
    for file_name in EXPECTED_BY_FILE:
        assert file_name in result.stdout
    assert "corrupt_zst 2" in result.stdout


@pytest.mark.parametrize("script", ["data_prep/slimpajama.py", "launch/prune.py", "launch/lora.py"])
def test_a_corrupt_tokenizer_given_to_a_tool_is_one_error_line(tmp_path, tokenizer_model, tiny_init_model, script):
    """A tokenizer.model cut short used to end these tools in SentencePiece's RuntimeError traceback."""
    corrupt = tmp_path / "tokenizer.model"
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Say yes.", "output": "Yes."}]))
    corrupt.write_bytes(tokenizer_model.read_bytes()[:1000])
    sample = ROOT.parent / "shared" / "data" / "slimpajama-sample"
    args = {"data_prep/slimpajama.py": ["--input", sample, "--split", "validation", "--tokenizer", corrupt,
                                        "--output", tmp_path / "out"],
            "launch/prune.py": ["--model", tiny_init_model, "--calib", sample / "validation", "--remove", 1,
                                "--no-protect", "--tokenizer", corrupt, "--out", tmp_path / "out"],
            "launch/lora.py": ["--model", tiny_init_model, "--data", tmp_path / "alpaca.json", "--tokenizer",
                               corrupt, "--out", tmp_path / "out"]}[script]
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.count("error: ") == 1, result.stderr[-2000:]
    assert f"error: {corrupt} does not load as a SentencePiece tokenizer" in result.stderr
