"""Offline preparation of the real SlimPajama sample with the real LLaMA tokenizer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm

from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.shards import PackedShards, ShardFormatError, read_header

from conftest import ROOT, read_original_documents, shard_documents, subprocess_env

PREP = [sys.executable, str(ROOT / "data_prep" / "slimpajama.py")]


def prep_cmd(sample: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [*PREP, "--input", str(sample), "--split", "train", "--tokenizer", str(tokenizer), "--output", str(out),
            "--no-progress", *extra]


def output_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of an output except the run log (which holds timings and the command)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "prepare_run.json"}


def test_shards_decode_back_to_the_original_documents(sample_shards, slimpajama_sample, tokenizer_model):
    originals = read_original_documents(slimpajama_sample / "train")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    docs, tail = shard_documents(sample_shards)
    manifest = json.loads((sample_shards / "manifest.json").read_text())

    assert len(originals) == manifest["docs_total"] == 1775
    for ids, record in zip(docs, originals):
        assert ids[0] == 1 and ids[-1] == 2
        assert ids[1:-1] == sp.encode(record["text"])  # exactly SentencePiece's ids
        assert sp.decode(ids[1:-1]) == record["text"]
    # Only the final partial sequence is missing from the shards.
    rest = sum(len(sp.encode(r["text"])) + 2 for r in originals[len(docs):])
    assert rest == len(tail) + manifest["tokens_dropped"]

    expected_tokens = sum(len(sp.encode(r["text"])) + 2 for r in originals)
    assert manifest["tokens_total"] == expected_tokens
    assert manifest["tokens_in_sequences"] + manifest["tokens_dropped"] == expected_tokens
    assert 0 <= manifest["tokens_dropped"] < manifest["seq_len"]
    assert manifest["num_sequences"] == expected_tokens // 2048

    per_source: dict[str, int] = {}
    for record in originals:
        name = record["meta"]["redpajama_set_name"]
        per_source[name] = per_source.get(name, 0) + 1
    assert {k: v["docs"] for k, v in manifest["sources"].items()} == per_source
    assert sum(v["bytes"] for v in manifest["sources"].values()) == sum(len(r["text"].encode()) for r in originals)
    assert manifest["bad"] == {} and manifest["tokenizer_sha256"] == (
        "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347")


def test_shard_header_is_self_describing_and_checked(sample_shards, tmp_path):
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    shard_path = sample_shards / manifest["shards"][0]["file"]
    header = read_header(shard_path)
    assert (header.dtype, header.seq_len, header.format_version) == ("uint16", 2048, 2)
    assert header.tokenizer_sha256 == manifest["tokenizer_sha256"]
    PackedShards(sample_shards, verify=True)  # checksums in the manifest match

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in sample_shards.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    with open(broken / shard_path.name, "r+b") as handle:
        handle.truncate(shard_path.stat().st_size - 10)
    with pytest.raises(ShardFormatError, match="truncated"):
        read_header(broken / shard_path.name)


def test_byte_identical_for_any_worker_count_and_after_kill_9(tmp_path, slimpajama_sample, tokenizer_model):
    # Small units and shards so that a run has many checkpoints to be killed between.
    small = ["--unit-bytes", str(96 << 10), "--shard-tokens", str(32 * 2048)]
    one, two, killed = tmp_path / "w1", tmp_path / "w2", tmp_path / "killed"
    env = subprocess_env()
    subprocess.run(prep_cmd(slimpajama_sample, tokenizer_model, one, "--workers", "1", *small), check=True,
                   env=env, timeout=300)
    subprocess.run(prep_cmd(slimpajama_sample, tokenizer_model, two, "--workers", "2", *small), check=True,
                   env=env, timeout=300)
    reference = output_bytes(one)
    assert len([n for n in reference if n.startswith("shard_")]) > 10
    assert output_bytes(two) == reference

    # kill -9 the whole job (main process and its workers) once it has finished some shards but not all.
    proc = subprocess.Popen(prep_cmd(slimpajama_sample, tokenizer_model, killed, "--workers", "1", *small),
                            env=env, start_new_session=True)
    state = killed / ".work" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert state.exists() and not (killed / "manifest.json").exists(), "the kill did not land mid-run"
    done_before = json.loads(state.read_text())["shards"]

    resumed = subprocess.run(prep_cmd(slimpajama_sample, tokenizer_model, killed, "--workers", "2", *small),
                             env=env, timeout=300, capture_output=True, text=True, check=True)
    assert f"resuming: {len(done_before)} shard(s) finished" in resumed.stdout
    assert output_bytes(killed) == reference
    assert not (killed / ".work").exists()

    again = subprocess.run(prep_cmd(slimpajama_sample, tokenizer_model, killed, "--workers", "2", *small),
                           env=env, timeout=300, capture_output=True, text=True, check=True)
    assert "already complete" in again.stdout and output_bytes(killed) == reference


def test_missing_input_or_tokenizer_is_one_line_and_exit_2(tmp_path, slimpajama_sample, tokenizer_model):
    env = subprocess_env()
    for cmd, needle in [
        (prep_cmd(tmp_path / "nope", tokenizer_model, tmp_path / "o1"), "nope: input does not exist"),
        (prep_cmd(slimpajama_sample, tmp_path / "tok.model", tmp_path / "o2"), "tok.model: no such tokenizer"),
        (prep_cmd(slimpajama_sample, tokenizer_model, tmp_path / "o3", "--seq-len", "1"), "--seq-len"),
        # Without --split the tree's train and validation folders would be mixed into one training set.
        ([*PREP, "--input", str(slimpajama_sample), "--tokenizer", str(tokenizer_model), "--output",
          str(tmp_path / "o4")], "holds the splits train, validation; choose one with --split"),
    ]:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_sources_filter_and_token_budget(tmp_path, slimpajama_sample, tokenizer_model):
    originals = read_original_documents(slimpajama_sample / "train")
    wanted = {"RedPajamaGithub", "RedPajamaArXiv"}
    kept = [r for r in originals if r["meta"]["redpajama_set_name"] in wanted]
    manifest = prepare_shards(PrepareConfig(
        input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model), output=str(tmp_path / "src"),
        seq_len=512, workers=2, sources=sorted(wanted), progress=False))
    assert set(manifest["sources"]) == wanted
    assert manifest["docs_total"] == len(kept)
    assert sum(manifest["filtered"].values()) == len(originals) - len(kept)

    budget = 100_000
    capped = prepare_shards(PrepareConfig(
        input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model), output=str(tmp_path / "cap"),
        seq_len=512, workers=2, max_tokens=budget, progress=False))
    # Whole documents in input order until the budget is reached: the last one kept crosses it.
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    total, count = 0, 0
    while total < budget:
        total += len(sp.encode(originals[count]["text"])) + 2
        count += 1
    assert (capped["docs_total"], capped["tokens_total"]) == (count, total)


def test_other_settings_on_a_finished_output_are_refused(tmp_path, slimpajama_sample, tokenizer_model):
    out = tmp_path / "out"
    base = dict(input=str(slimpajama_sample), split="validation", tokenizer=str(tokenizer_model), output=str(out),
                workers=1, progress=False)
    prepare_shards(PrepareConfig(seq_len=256, **base))
    from shortened.config import ConfigError

    with pytest.raises(ConfigError, match="other inputs or settings"):
        prepare_shards(PrepareConfig(seq_len=512, **base))


def test_hf_streaming_input_gives_the_same_shards(tmp_path, sample_shards, slimpajama_sample, tokenizer_model):
    # The hub cannot be reached here: the same `datasets` streaming path runs its json builder on local files.
    files = [str(p) for p in sorted((slimpajama_sample / "train").rglob("*.jsonl.zst"))]
    out = tmp_path / "hf"
    manifest = prepare_shards(PrepareConfig(
        input="hf://json", hf_data_files=files, split="train", tokenizer=str(tokenizer_model), output=str(out),
        seq_len=2048, workers=2, progress=False, verbose=False))
    offline = json.loads((sample_shards / "manifest.json").read_text())
    assert len(manifest["inputs"]) == len(files)  # one work unit per streamed shard (file)
    for key in ("num_sequences", "tokens_total", "tokens_dropped", "docs_total", "sources", "bad"):
        assert manifest[key] == offline[key], key
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in offline["shards"]]


def test_data_prep_does_not_import_torch():
    # Every worker process pays for what data prep imports: torch would add ~400 MB and seconds per worker.
    code = "import sys, shortened.data.prepare, shortened.data.tokenize_worker; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "False"
