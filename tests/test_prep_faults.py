"""Data prep faults, each done for real: damaged outputs, edited inputs, stale files, two preps at once, bad flags.

Every bad case ends in one `error: ...` line on stderr and exit code 2, and nothing already on disk is lost.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from conftest import ROOT, subprocess_env

SCRIPT = ROOT / "data_prep" / "slimpajama.py"
_spec = importlib.util.spec_from_file_location("slimpajama_cli", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# ~7 shards of 32 sequences from the start of the validation split, in 64 KiB work units: a second or two.
SMALL = ["--seq-len", "256", "--shard-tokens", "8192", "--max-tokens", "60000", "--unit-bytes", "65536"]


def prep(capsys, source: Path, tokenizer: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["--input", str(source), "--tokenizer", str(tokenizer), "--output", str(out), "--no-progress",
                     *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def output_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "prepare_run.json"}


def shard_files(directory: Path) -> list[Path]:
    return [directory / e["file"] for e in json.loads((directory / "manifest.json").read_text())["shards"]]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def plain_copy(slimpajama_sample: Path, directory: Path) -> Path:
    """The validation split decompressed to one plain .jsonl (1 MB): a file that can be edited in place."""
    directory.mkdir()
    src = next((slimpajama_sample / "validation").rglob("*.jsonl.zst"))
    with open(src, "rb") as handle:
        text = zstandard.ZstdDecompressor().stream_reader(handle).read()
    (directory / "docs.jsonl").write_bytes(text)
    return directory / "docs.jsonl"


def test_a_rerun_rebuilds_deleted_truncated_and_bit_flipped_shards(capsys, tmp_path, slimpajama_sample,
                                                                   tokenizer_model):
    out = tmp_path / "out"
    source = slimpajama_sample / "validation"
    assert prep(capsys, source, tokenizer_model, out, *SMALL)[0] == 0
    reference = output_bytes(out)
    shards = shard_files(out)
    assert len(shards) >= 6

    shards[1].unlink()
    shards[3].write_bytes(shards[3].read_bytes()[:5000])
    flip_bit(shards[5], 4096 + 777)  # same size, intact header: only a hash sees it
    code, stdout, _ = prep(capsys, source, tokenizer_model, out, *SMALL, "--workers", "2")
    assert code == 0
    assert f"damaged: {shards[1]}: missing shard" in stdout
    assert f"damaged: {shards[3]}: 5000 bytes" in stdout
    assert f"rebuilt {shards[1].name}, {shards[3].name} (byte-identical" in stdout
    assert shards[5].read_bytes() != reference[shards[5].name]  # without --verify a flipped bit stays ...

    code, stdout, _ = prep(capsys, source, tokenizer_model, out, *SMALL, "--verify")
    assert code == 0 and f"damaged: {shards[5]}: sha256 differs" in stdout and f"rebuilt {shards[5].name} " in stdout
    assert output_bytes(out) == reference  # ... until --verify finds and rebuilds it

    code, stdout, _ = prep(capsys, source, tokenizer_model, out, *SMALL, "--verify")
    assert code == 0 and "already complete" in stdout and "size, header and sha256" in stdout

    # Without prepare_run.json (which records where each shard starts) the rebuild repacks from the first unit.
    (out / "prepare_run.json").unlink()
    shards[-1].unlink()
    code, stdout, _ = prep(capsys, source, tokenizer_model, out, *SMALL)
    assert code == 0 and "repacking from the start of the inputs" in stdout and f"rebuilt {shards[-1].name}" in stdout
    assert output_bytes(out) == reference


def test_the_fingerprint_sees_content_not_names_sizes_or_mtime(capsys, tmp_path, slimpajama_sample, tokenizer_model):
    docs = plain_copy(slimpajama_sample, tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["--seq-len", "256", "--shard-tokens", "32768"]
    assert prep(capsys, docs.parent, tokenizer_model, out, *args)[0] == 0
    reference = output_bytes(out)
    original = docs.read_bytes()

    # A copy (new mtime, same bytes) is the same input, and the changed mtime is said.
    os.utime(docs, (time.time() + 100, time.time() + 100))
    code, stdout, _ = prep(capsys, docs.parent, tokenizer_model, out, *args)
    assert code == 0 and "note: 1 input file(s) have another mtime" in stdout and "already complete" in stdout

    # Same name, same size, one letter changed in the first 64 KiB: another input, refused.
    edited = bytearray(original)
    at = edited.index(b"the", 1000)
    edited[at] = ord("T")
    docs.write_bytes(bytes(edited))
    code, _, err = prep(capsys, docs.parent, tokenizer_model, out, *args)
    assert code == 2 and "other inputs or settings; choose another --output" in one_error_line(err)
    assert output_bytes(out) == reference

    # An edit in the middle that keeps size, mtime and both ends is invisible to the fingerprint; rebuilding a
    # damaged shard then gives other bytes, and the damaged shard is refused rather than mixed in.
    edited = bytearray(original)
    at = edited.index(b"the", len(edited) // 2)
    edited[at] = ord("T")
    stat = docs.stat()
    docs.write_bytes(bytes(edited))
    os.utime(docs, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for shard in shard_files(out):
        shard.write_bytes(shard.read_bytes()[:100])
    code, stdout, err = prep(capsys, docs.parent, tokenizer_model, out, *args)
    assert code == 2 and "gave other bytes than the manifest's sha256: the inputs changed" in one_error_line(err)
    assert "rebuilt" not in stdout
    bad = [s for s in shard_files(out) if s.read_bytes() != reference[s.name]]
    assert bad and all(len(s.read_bytes()) == 100 for s in bad)  # the refused shard is left as it was
    assert not (out / ".work").exists()


def test_split_of_an_input_without_split_folders_is_an_error(capsys, tmp_path, slimpajama_sample, tokenizer_model):
    train = slimpajama_sample / "train"
    code, _, err = prep(capsys, train, tokenizer_model, tmp_path / "o1", "--split", "validation")
    assert code == 2
    assert f"{train}: has no split folders (train, validation, test), so it has no 'validation' split" in \
        one_error_line(err)
    one_file = next(train.rglob("*.jsonl.zst"))
    code, _, err = prep(capsys, one_file, tokenizer_model, tmp_path / "o2", "--split", "validation")
    assert code == 2 and f"{one_file}: lies in no 'validation' folder" in one_error_line(err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_stale_shards_without_a_manifest_are_refused(capsys, tmp_path, slimpajama_sample, tokenizer_model):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"shard_00000.bin": b"old shard", "shard_00009.bin": b"another old shard"}
    for name, data in stale.items():
        (out / name).write_bytes(data)
    code, _, err = prep(capsys, slimpajama_sample / "validation", tokenizer_model, out, *SMALL)
    assert code == 2
    assert f"{out}: holds shard files but no manifest.json" in one_error_line(err)
    assert "shard_00000.bin, shard_00009.bin" in err
    assert {n: (out / n).read_bytes() for n in stale} == stale and not (out / "manifest.json").exists()

    # A .work of another run (other settings) is refused too, rather than reusing its unit results.
    shutil.rmtree(out)
    assert prep(capsys, slimpajama_sample / "validation", tokenizer_model, out, *SMALL)[0] == 0
    (out / "manifest.json").unlink()
    (out / ".work").mkdir()
    (out / ".work" / "run.json").write_text(json.dumps({"fingerprint": "other", "unit_bytes": 65536}))
    code, _, err = prep(capsys, slimpajama_sample / "validation", tokenizer_model, out, *SMALL)
    assert code == 2 and "an interrupted run with other inputs or settings" in one_error_line(err)


def test_a_second_prep_into_the_same_output_is_refused_while_the_first_runs(tmp_path, sample_shards, slimpajama_sample,
                                                                            tokenizer_model):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--input", str(slimpajama_sample), "--split", "train", "--tokenizer",
           str(tokenizer_model), "--output", str(out), "--no-progress", "--workers", "2"]
    first = subprocess.Popen(cmd, env=subprocess_env(), start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = out / ".lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGSTOP)  # hold the first mid-run, lock and all, while the second tries
    try:
        assert first.poll() is None, "the first prep ended before the second could start"
        second = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert one_error_line(second.stderr).strip() == (
        f"error: {out} is in use by another data prep (pid {first.pid} on {socket.gethostname()}); wait for it or "
        "choose another --output")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert output_bytes(out) == output_bytes(sample_shards)  # the first run's output is whole and correct
    assert lock.read_text() == ""


def test_an_unwritable_output_is_one_line(capsys, tmp_path, slimpajama_sample, tokenizer_model):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    code, _, err = prep(capsys, slimpajama_sample / "validation", tokenizer_model, a_file / "out", *SMALL)
    assert code == 2
    assert f"{a_file / 'out'}: cannot create the output there (Not a directory); choose another --output" in \
        one_error_line(err)
    assert a_file.read_text() == "not a folder"


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def test_an_input_that_yields_no_sequence_is_an_error(capsys, tmp_path, tokenizer_model):
    cases = [
        (write_jsonl(tmp_path / "bad.jsonl", [b"{oops\n", b"\n", b'{"text": ""}\n']), [],
         "no good document, every line or file is bad (blank_line 1, empty_text 1, malformed_json 1; first: "
         "bad.jsonl:1: malformed_json)"),
        (write_jsonl(tmp_path / "short.jsonl", [json.dumps({"text": "a short document"}).encode() + b"\n"] * 2), [],
         "2 document(s), 10 tokens: fewer than one sequence of 2048; give more input or a smaller --seq-len"),
        (write_jsonl(tmp_path / "c4.jsonl", [json.dumps({"text": "x", "meta": {"redpajama_set_name": "C4"}}).encode()]),
         ["--sources", "Github"], "--sources Github keeps no document; the input has C4"),
    ]
    for path, extra, why in cases:
        out = tmp_path / f"out_{path.stem}"
        code, _, err = prep(capsys, path, tokenizer_model, out, *extra)
        assert code == 2, err
        assert f"error: {path}: {why}" in one_error_line(err)
        assert not (out / "manifest.json").exists() and not (out / ".work").exists()


def test_an_input_that_yields_no_sequence_prints_its_bad_input_report_before_the_error(tmp_path, tokenizer_model):
    """The error says how few good tokens there were; the report says what became of the rest."""
    path = write_jsonl(tmp_path / "short.jsonl", [b"{oops\n", json.dumps({"text": "a short document"}).encode() + b"\n",
                                                  b'{"text": ""}\n', b"\n"])
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(path), "--tokenizer", str(tokenizer_model),
                             "--output", str(tmp_path / "out"), "--no-progress"],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: 1 document(s), 5 tokens: fewer than one sequence of 2048" in one_error_line(result.stderr)
    assert "rejected input: blank_line 1, empty_text 1, malformed_json 1" in result.stdout, result.stdout
    assert "short.jsonl: blank_line 1, empty_text 1, malformed_json 1" in result.stdout, result.stdout
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--unit-bytes", "-5", "--unit-bytes must be 0 (chosen automatically) or at least 4096, got -5"),
    ("--unit-bytes", "10", "--unit-bytes must be 0 (chosen automatically) or at least 4096, got 10"),
    ("--shard-tokens", "-1", "--shard-tokens (-1) must hold one sequence (2048)"),
    ("--max-tokens", "-1", "--max-tokens must be >= 0, got -1"),
    ("--workers", "0", "--workers must be at least 1, got 0"),
])
def test_bad_numbers_are_refused(capsys, tmp_path, slimpajama_sample, tokenizer_model, flag, value, needle):
    code, _, err = prep(capsys, slimpajama_sample / "validation", tokenizer_model, tmp_path / "out", flag, value)
    assert code == 2 and needle in one_error_line(err)
    assert not (tmp_path / "out").exists()
