"""--pack-by-source on the real SlimPajama sample with the real LLaMA tokenizer: every sequence and every shard holds
documents of one source, checked against the raw records read and tokenized here; byte-identical for any worker
count, after kill -9 and after a crash at each step of a shard's close; damaged shards rebuilt; partitions merged."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from test_data_prep import output_bytes, prep_cmd

from shortened.config import ConfigError
from shortened.data.loader import build_train_loader
from shortened.data.packing import document_position_ids
from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.shards import PackedShards, Shard, read_manifest

from conftest import launcher, read_original_documents, subprocess_env

SEQ_LEN = 64
SHARD_TOKENS = 256 * SEQ_LEN  # ~80 shards of the sample, several per source
PACKING = ["--seq-len", str(SEQ_LEN), "--shard-tokens", str(SHARD_TOKENS), "--pack-by-source"]
# Small units: a run has many checkpoints to be killed between (the output does not depend on the unit size).
SMALL = [*PACKING, "--unit-bytes", str(96 << 10)]
BOS, EOS = 1, 2


def prep_main(argv: list[str]) -> int:
    return launcher("data_prep/slimpajama.py").main(argv)


def merge_main(argv: list[str]) -> int:
    return launcher("data_prep/merge_shards.py").main(argv)


@pytest.fixture(scope="module")
def raw(slimpajama_sample, tokenizer_model) -> list[dict]:
    """Every raw train record in input order with its source and its ids framed as <s> ids </s>, read with
    zstandard and tokenized with SentencePiece here, independently of the code under test."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert (sp.bos_id(), sp.eos_id()) == (BOS, EOS)
    return [{"source": r["meta"]["redpajama_set_name"], "ids": [BOS, *sp.encode(r["text"]), EOS],
             "bytes": len(r["text"].encode("utf-8"))} for r in read_original_documents(slimpajama_sample / "train")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, slimpajama_sample, tokenizer_model) -> dict[int, Path]:
    """The train sample packed by source through the command line: with 1 worker and 96 KiB units, and with 2
    workers and the unit size chosen for them (256 KiB)."""
    root = tmp_path_factory.mktemp("by_source")
    outputs = {workers: root / f"w{workers}" for workers in (1, 2)}
    for workers, settings in ((1, SMALL), (2, PACKING)):
        subprocess.run(prep_cmd(slimpajama_sample, tokenizer_model, outputs[workers], "--workers", str(workers),
                                *settings), check=True, env=subprocess_env(), timeout=300, capture_output=True)
    return outputs


def shard_tokens(directory: Path, entry: dict) -> tuple[list[int], list[int]]:
    shard = Shard(directory / entry["file"])
    return np.asarray(shard.tokens).reshape(-1).tolist(), np.asarray(shard.doc_starts).tolist()


def expected_stream(raw: list[dict], source: str) -> tuple[list[int], list[int]]:
    """A source's documents in input order, concatenated, and where each starts."""
    tokens: list[int] = []
    starts = []
    for record in raw:
        if record["source"] == source:
            starts.append(len(tokens))
            tokens += record["ids"]
    return tokens, starts


def test_byte_identical_for_one_or_two_workers_and_any_unit_size(prepared):
    units = [json.loads((prepared[w] / "prepare_run.json").read_text())["unit_bytes"] for w in (1, 2)]
    assert units == [96 << 10, 256 << 10]
    reference = output_bytes(prepared[1])
    shards = read_manifest(prepared[1])["shards"]
    assert len(shards) > 20 and len({e["source"] for e in shards}) == 6  # the sample's six sources
    assert output_bytes(prepared[2]) == reference


def as_text(ids: list[int]) -> str:
    """Ids as a string, one character each, so that str's substring search applies to them."""
    return "".join(map(chr, ids))


def test_every_document_in_a_shard_is_a_raw_record_of_the_shards_source(prepared, raw):
    sources_of: dict[tuple[int, ...], set[str]] = {}
    for record in raw:
        sources_of.setdefault(tuple(record["ids"]), set()).add(record["source"])
    # Each source's records as one string, each between two separators (no token id is that large).
    sep = chr(0xFFFF)
    records_of: dict[str, str] = {}
    for record in raw:
        records_of[record["source"]] = records_of.get(record["source"], sep) + as_text(record["ids"]) + sep
    manifest = read_manifest(prepared[1])
    seen_whole = 0
    for entry in manifest["shards"]:
        tokens, starts = shard_tokens(prepared[1], entry)
        records = records_of[entry["source"]]
        if not starts:  # the shard lies inside one long document
            assert as_text(tokens) in records, entry["file"]
            continue
        if starts[0]:  # the rest of a document begun in this source's previous shard: one's end
            assert as_text(tokens[: starts[0]]) + sep in records, entry["file"]
        for a, b in zip(starts, starts[1:] + [len(tokens)]):
            piece = tokens[a:b]
            if piece[-1] == EOS:
                assert sources_of[tuple(piece)] == {entry["source"]}, entry["file"]
                seen_whole += 1
            else:  # the shard ends inside this document: one's start
                assert sep + as_text(piece) in records, entry["file"]
    assert seen_whole > len(raw) * 0.9  # nearly every document lies whole in one shard at these sizes


def test_each_source_is_its_records_in_input_order_cut_into_sequences(prepared, raw):
    """Together with the test above: no sequence holds two sources, nothing is lost but each source's tail."""
    manifest = read_manifest(prepared[1])
    for source in {r["source"] for r in raw}:
        expected, expected_starts = expected_stream(raw, source)
        entries = [e for e in manifest["shards"] if e["source"] == source]
        got: list[int] = []
        got_starts: list[int] = []
        for entry in entries:
            tokens, starts = shard_tokens(prepared[1], entry)
            got_starts += [len(got) + s for s in starts]
            got += tokens
        assert got == expected[: len(got)], source
        assert got_starts == [s for s in expected_starts if s < len(got)], source
        assert len(expected) - len(got) == len(expected) % SEQ_LEN == manifest["tokens_dropped_by_source"][source]
        assert all(e["num_tokens"] == SHARD_TOKENS for e in entries[:-1]) and entries[-1]["num_tokens"] > 0


def test_manifest_counts_equal_the_raw_records(prepared, raw):
    manifest = read_manifest(prepared[1])
    sources: dict[str, dict[str, int]] = {}
    for record in raw:
        entry = sources.setdefault(record["source"], {"docs": 0, "tokens": 0, "bytes": 0})
        entry["docs"] += 1
        entry["tokens"] += len(record["ids"])  # <s> and </s> included
        entry["bytes"] += record["bytes"]
    assert manifest["sources"] == sources
    assert manifest["tokens_dropped_by_source"] == {name: s["tokens"] % SEQ_LEN for name, s in sources.items()}
    assert manifest["tokens_dropped"] == sum(s["tokens"] % SEQ_LEN for s in sources.values())
    assert manifest["num_sequences"] == sum(s["tokens"] // SEQ_LEN for s in sources.values())
    assert (manifest["docs_total"], manifest["tokens_total"]) == (len(raw), sum(len(r["ids"]) for r in raw))
    assert manifest["tokens_in_sequences"] + manifest["tokens_dropped"] == manifest["tokens_total"]
    assert manifest["pack_by_source"] is True and manifest["bad"] == {}


def test_shards_are_numbered_by_where_their_last_token_lies_in_the_input(prepared, raw):
    # Full shards in the order of their last token's position in the whole input; then each source's last (partial)
    # shard, by source name: an order of the input alone.
    manifest = read_manifest(prepared[1])
    record_start = np.cumsum([0] + [len(r["ids"]) for r in raw])
    full, last = [], []
    for source in sorted({r["source"] for r in raw}):
        records = [i for i, r in enumerate(raw) if r["source"] == source]
        lens = np.array([len(raw[i]["ids"]) for i in records])
        within = np.cumsum(np.concatenate([[0], lens]))  # where each record starts in the source's stream
        in_sequences = int(within[-1]) // SEQ_LEN * SEQ_LEN
        for k in range(in_sequences // SHARD_TOKENS):
            token = (k + 1) * SHARD_TOKENS - 1  # the shard's last token, in the source's stream
            doc = int(np.searchsorted(within, token, side="right")) - 1
            full.append((int(record_start[records[doc]] + token - within[doc]), source))
        if in_sequences % SHARD_TOKENS:
            last.append(source)
    assert [e["source"] for e in manifest["shards"]] == [s for _, s in sorted(full)] + last


def test_the_loader_reads_per_source_shards_unchanged(prepared):
    shards = PackedShards(prepared[1], verify=True)  # check_shards and every sha256: the extra keys are just data
    manifest = read_manifest(prepared[1])
    assert len(shards) == manifest["num_sequences"] and manifest["format_version"] == 1
    batch = next(iter(build_train_loader(prepared[1], global_batch_size=4, micro_batch_size=4, dp_rank=0,
                                         dp_world_size=1, seed=0, document_mask=True)))
    for row, index in enumerate(batch["sample_index"].tolist()):
        assert batch["input_ids"][row].tolist() == shards[index].tolist()
        expected = document_position_ids(shards.doc_starts(index), SEQ_LEN)
        assert batch["position_ids"][row].tolist() == expected.tolist()


def test_kill_9_mid_prep_then_rerun_is_byte_identical(tmp_path, prepared, slimpajama_sample, tokenizer_model):
    killed = tmp_path / "killed"
    env = subprocess_env()
    proc = subprocess.Popen(prep_cmd(slimpajama_sample, tokenizer_model, killed, "--workers", "1", *SMALL), env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL)
    state = killed / ".work" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers
    proc.wait(timeout=30)
    assert state.exists() and not (killed / "manifest.json").exists(), "the kill did not land mid-run"
    saved = json.loads(state.read_text())
    with np.load(killed / ".work" / saved["streams_file"]) as streams:
        assert any(s["writer"] for s in json.loads(str(streams["meta"])))  # open shards carried over the kill

    resumed = subprocess.run(prep_cmd(slimpajama_sample, tokenizer_model, killed, "--workers", "2", *SMALL),
                             env=env, timeout=300, capture_output=True, text=True, check=True)
    assert f"resuming: {len(saved['shards'])} shard(s) finished" in resumed.stdout
    assert output_bytes(killed) == output_bytes(prepared[1])
    assert not (killed / ".work").exists()


# A data prep that dies at the `call`-th call of one of the packer's steps, with os._exit: like kill -9 there,
# nothing is flushed or cleaned up.
CRASH_AT = """
import json, os, sys
from shortened.data.prepare import PrepareConfig, _SourcePacker, prepare_shards
step, call, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
original, calls = getattr(_SourcePacker, step), []
def crashing(self, *args):
    calls.append(step)
    if len(calls) == call:
        os._exit(9)
    return original(self, *args)
setattr(_SourcePacker, step, crashing)
prepare_shards(PrepareConfig(**config))
"""


@pytest.fixture(scope="module")
def budget_reference(tmp_path_factory, slimpajama_sample, tokenizer_model) -> Path:
    out = tmp_path_factory.mktemp("budget") / "out"
    prepare_shards(PrepareConfig(**budget_settings(slimpajama_sample, tokenizer_model, out)))
    return out


def budget_settings(sample: Path, tokenizer: Path, output: Path) -> dict:
    """Five sources, until --max-tokens ends the run mid-unit: a run resumed after the end must not read on (the
    units after it would add their documents filtered out by --sources to the counts)."""
    return dict(input=str(sample), split="train", tokenizer=str(tokenizer), output=str(output), seq_len=SEQ_LEN,
                shard_tokens=SHARD_TOKENS, unit_bytes=96 << 10, max_tokens=450_000, pack_by_source=True, workers=1,
                sources=["RedPajamaArXiv", "RedPajamaCommonCrawl", "RedPajamaGithub", "RedPajamaStackExchange",
                         "RedPajamaWikipedia"], progress=False, verbose=False)


# Each step of a close in turn: before the checkpoint (closed in place, not yet recorded), after it (recorded, not
# yet moved into the output), after the last one (every shard moved, no manifest yet).
@pytest.mark.parametrize("step, call", [("_checkpoint", 3), ("_finish_moves", 3), ("_write_manifest", 1)])
def test_a_crash_at_each_step_of_a_close_resumes_byte_identical(tmp_path, budget_reference, step, call,
                                                                slimpajama_sample, tokenizer_model):
    out = tmp_path / "out"
    settings = budget_settings(slimpajama_sample, tokenizer_model, out)
    crashed = subprocess.Popen([sys.executable, "-c", CRASH_AT, step, str(call), json.dumps(settings)],
                               env=subprocess_env(), start_new_session=True)
    assert crashed.wait(timeout=300) == 9
    with contextlib.suppress(ProcessLookupError):
        os.killpg(crashed.pid, signal.SIGKILL)  # its tokenizer workers, if any outlived it
    assert (out / ".work" / "state.json").exists() and not (out / "manifest.json").exists()
    prepare_shards(PrepareConfig(**settings))
    assert output_bytes(out) == output_bytes(budget_reference)


def test_a_damaged_shard_is_rebuilt_from_its_sources_stream(tmp_path, prepared, slimpajama_sample, tokenizer_model,
                                                            capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared[1], out)
    reference = output_bytes(out)
    entries = read_manifest(out)["shards"]
    wikipedia = [e["file"] for e in entries if e["source"] == "RedPajamaWikipedia"]
    second, last = out / wikipedia[1], out / entries[-1]["file"]  # one starts inside a document, one is partial
    second.unlink()
    last.write_bytes(last.read_bytes()[:5000])
    argv = ["--input", str(slimpajama_sample), "--split", "train", "--tokenizer", str(tokenizer_model), "--output",
            str(out), "--no-progress", *SMALL]
    assert prep_main(argv) == 0
    assert f"rebuilt {second.name}, {last.name} (byte-identical" in capsys.readouterr().out
    assert output_bytes(out) == reference

    (out / "prepare_run.json").unlink()  # without the recorded starts: each damaged source repacked from the start
    second.unlink()
    (out / entries[0]["file"]).unlink()
    assert prep_main(argv) == 0
    assert "repacking from the start of the inputs" in capsys.readouterr().out
    assert output_bytes(out) == reference


@pytest.fixture(scope="module")
def parts(tmp_path_factory, slimpajama_sample, tokenizer_model) -> list[Path]:
    root = tmp_path_factory.mktemp("source_parts")
    outputs = [root / f"part_{i}" for i in range(2)]
    for index, output in enumerate(outputs):
        prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model),
                                     output=str(output), seq_len=SEQ_LEN, shard_tokens=SHARD_TOKENS,
                                     pack_by_source=True, num_partitions=2, partition=index, workers=2,
                                     progress=False, verbose=False))
    return outputs


def test_partitions_merge_into_one_corpus_that_keeps_each_shards_source(parts, prepared, tmp_path):
    merged = tmp_path / "corpus"
    assert merge_main(["--inputs", *map(str, parts), "--output", str(merged)]) == 0
    union, whole = read_manifest(merged), read_manifest(prepared[1])
    pieces = [read_manifest(part) for part in parts]
    assert (union["docs_total"], union["tokens_total"], union["sources"]) == (
        whole["docs_total"], whole["tokens_total"], whole["sources"])
    assert [e["source"] for e in union["shards"]] == [e["source"] for m in pieces for e in m["shards"]]
    assert union["pack_by_source"] is True
    for name in whole["sources"]:  # at most one partial sequence per source and part
        dropped = [m["tokens_dropped_by_source"].get(name, 0) for m in pieces]
        assert union["tokens_dropped_by_source"][name] == sum(dropped) and max(dropped) < SEQ_LEN
    assert union["tokens_dropped"] == sum(union["tokens_dropped_by_source"].values())
    assert len(PackedShards(merged)) == union["num_sequences"] == sum(m["num_sequences"] for m in pieces)


def test_packing_by_source_is_part_of_the_outputs_identity(parts, tmp_path, slimpajama_sample, tokenizer_model,
                                                           capsys):
    single = tmp_path / "single"  # one stream, of the same seq_len: a corpus that is not packed by source
    config = dict(input=str(slimpajama_sample), split="validation", tokenizer=str(tokenizer_model),
                  output=str(single), seq_len=SEQ_LEN, max_tokens=5000, workers=1, progress=False, verbose=False)
    assert "source" not in prepare_shards(PrepareConfig(**config))["shards"][0]
    with pytest.raises(ConfigError, match="other inputs or settings"):
        prepare_shards(PrepareConfig(**config, pack_by_source=True))

    assert merge_main(["--inputs", str(parts[0]), str(single), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"error: {parts[0]}: packed by source, but {single} is not" in err and err.count("\n") == 1, err


def test_bad_input_is_counted_per_file(tmp_path, tokenizer_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [json.dumps({"text": f"document {i}: " + "word " * 80, "meta": {"redpajama_set_name": source}})
            for i in range(12) for source in ("RedPajamaC4", "RedPajamaGithub")]
    lines = [*good[:6], '{"text": "unterminated', "", json.dumps({"text": ""}), *good[6:],
             json.dumps({"meta": {}})]
    (corpus / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    manifest = prepare_shards(PrepareConfig(input=str(corpus), tokenizer=str(tokenizer_model),
                                            output=str(tmp_path / "out"), seq_len=SEQ_LEN, pack_by_source=True,
                                            progress=False, verbose=False))
    assert manifest["bad_by_file"] == {"mixed.jsonl": {"malformed_json": 1, "blank_line": 1, "empty_text": 1,
                                                       "missing_text": 1}}
    assert {name: s["docs"] for name, s in manifest["sources"].items()} == {"RedPajamaC4": 12, "RedPajamaGithub": 12}
    assert {e["source"] for e in manifest["shards"]} == {"RedPajamaC4", "RedPajamaGithub"}
