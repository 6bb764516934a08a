"""Data prep across nodes: `--num-partitions N --partition i` prepares a disjoint part of the input files, and
data_prep/merge_shards.py joins the parts into one corpus with exactly the documents, tokens and per-source counts
of an unpartitioned run, which the trainer trains on like any other."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shortened.config import ConfigError, PrepareConfig
from shortened.data.prepare import prepare_shards
from shortened.data.shards import PackedShards, read_manifest
from shortened.data.sources import InputError

import warm_start
from conftest import ROOT, launcher, subprocess_env
from train_support import CPT, RECIPE, overrides, python, read_log, run_ok

PARTS = 3  # the shared sample has 5 train files: parts of 2, 2 and 1


def merge_main(argv: list[str]) -> int:
    return launcher("data_prep/merge_shards.py").main(argv)


def merge_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """data_prep/merge_shards.py as a user runs it (it imports no torch, so a cold start is cheap)."""
    return subprocess.run([sys.executable, str(ROOT / "data_prep" / "merge_shards.py"), *map(str, args)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The only line of stderr, an `error:` line of an exit 2 without a traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def prep_config(sample: Path, tokenizer: Path, output: Path, **extra) -> PrepareConfig:
    return PrepareConfig(input=str(sample), split="train", tokenizer=str(tokenizer), output=str(output), seq_len=64,
                         workers=1, progress=False, verbose=False, **extra)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, slimpajama_sample, tokenizer_model) -> list[Path]:
    root = tmp_path_factory.mktemp("partitions")
    outputs = [root / f"part_{i}" for i in range(PARTS)]
    for index, output in enumerate(outputs):
        prepare_shards(prep_config(slimpajama_sample, tokenizer_model, output, num_partitions=PARTS, partition=index))
    return outputs


@pytest.fixture(scope="module")
def merged(parts) -> Path:
    output = parts[0].parent / "corpus"
    assert merge_main(["--inputs", *map(str, parts), "--output", str(output)]) == 0
    return output


def test_the_parts_hold_each_input_file_once_and_together_every_document_token_and_source(parts, merged,
                                                                                          train_shards_64):
    whole = read_manifest(train_shards_64)  # the same sample, seq_len and tokenizer, unpartitioned
    manifests = [read_manifest(part) for part in parts]
    files = [[entry["file"] for entry in m["inputs"]] for m in manifests]
    assert [len(f) for f in files] == [2, 2, 1]
    assert sorted(name for part in files for name in part) == sorted(e["file"] for e in whole["inputs"])
    assert [m["partition"] for m in manifests] == [{"index": i, "of": PARTS} for i in range(PARTS)]
    assert "partition" not in whole  # an unpartitioned manifest is as it always was

    union = read_manifest(merged)
    assert (union["docs_total"], union["tokens_total"], union["sources"]) == (
        whole["docs_total"], whole["tokens_total"], whole["sources"])
    assert union["tokens_in_sequences"] + union["tokens_dropped"] == whole["tokens_total"]
    assert union["tokens_dropped"] == sum(m["tokens_dropped"] for m in manifests)  # < one sequence per part
    assert all(m["tokens_dropped"] < 64 for m in manifests)


def test_the_merged_corpus_numbers_the_parts_sequences_part_after_part(parts, merged):
    corpus = PackedShards(merged)
    pieces = [PackedShards(part) for part in parts]
    assert len(corpus) == sum(map(len, pieces))
    offset = 0
    for piece in pieces:
        for row in (0, len(piece) - 1):
            assert np.array_equal(corpus[offset + row], piece[row])
            assert np.array_equal(corpus.doc_starts(offset + row), piece.doc_starts(row))
        offset += len(piece)
    assert merge_main(["--inputs", *map(str, parts), "--output", str(merged)]) == 0  # a rerun rewrites the same
    assert read_manifest(merged) == corpus.manifest


def test_partitions_merge_in_partition_order_whatever_order_they_are_given_in(parts, merged):
    """A shell's `part_*` lists part_10 before part_2: one partitioned prep must still merge to one corpus."""
    output = parts[0].parent / "corpus_reordered"  # beside `merged`, so the relative paths are the same
    given = [parts[2], parts[0], parts[1]]
    assert merge_cli("--inputs", *given, "--output", output).returncode == 0
    assert read_manifest(output) == read_manifest(merged)
    result = merge_cli("--inputs", *reversed(given), "--output", output)  # a rerun into it, in yet another order
    assert result.returncode == 0, result.stderr
    assert read_manifest(output) == read_manifest(merged)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, slimpajama_sample, tokenizer_model) -> list[Path]:
    """Two small corpora that are not partitions (validation documents of one source each): their merge order is
    the user's to choose."""
    root = tmp_path_factory.mktemp("corpora")
    outputs = [root / source for source in ("RedPajamaC4", "RedPajamaStackExchange")]
    for output in outputs:
        prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="validation", tokenizer=str(tokenizer_model),
                                     output=str(output), seq_len=64, sources=[output.name], max_tokens=20_000,
                                     workers=1, progress=False, verbose=False))
    return outputs


def test_a_merge_that_would_renumber_an_existing_merge_is_refused_naming_both_orders(corpora, tmp_path):
    first, second = corpora
    output = tmp_path / "corpus"
    assert merge_cli("--inputs", first, second, "--output", output).returncode == 0
    before = (output / "manifest.json").read_bytes()
    error = one_error_line(merge_cli("--inputs", second, first, "--output", output))
    assert (f"--output {output}: {output / 'manifest.json'} merges {first}, {second} in this order, but --inputs "
            f"gives {second}, {first}: a job training on it would read its sequences in another order") in error
    assert (output / "manifest.json").read_bytes() == before
    assert merge_cli("--inputs", first, second, "--output", output).returncode == 0  # the same order: a rewrite
    assert (output / "manifest.json").read_bytes() == before


def test_a_moved_merged_manifest_names_the_part_it_lost_and_a_fix_that_exists(merged, tmp_path, tiny_init_model):
    """Its shards are not damaged but elsewhere: no --verify rerun (nor the prepare_run.json it cites) is the fix."""
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(merged, moved)  # a copy, as the fixture is shared: the same for the reader as a move
    result = warm_start.run([CPT, "--config", RECIPE, *overrides(tmp_path / "run", moved, tiny_init_model,
                                                                 "train.max_steps=2")],
                            timeout=240, env=subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert (f"{moved / 'manifest.json'}: a merge of ../part_0, ../part_1, ../part_2 (relative to it), but "
            f"{moved.parent / 'part_0'} holds no prepared corpus") in errors[0]
    assert "merge_shards.py --inputs" in errors[0] and "prepare_run.json" not in errors[0]
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_a_damaged_part_cites_its_run_record_only_where_it_is(parts, tmp_path):
    copies = [tmp_path / part.name for part in parts]
    for part, copy in zip(parts, copies):
        shutil.copytree(part, copy)
    (copies[1] / "shard_00000.bin").unlink()
    error = one_error_line(merge_cli("--inputs", *copies, "--output", tmp_path / "corpus"))
    assert f"{copies[1] / 'shard_00000.bin'}: missing shard" in error
    assert f"its command is in {copies[1] / 'prepare_run.json'}" in error
    (copies[1] / "prepare_run.json").unlink()  # a copy of the corpus may come without it
    error = one_error_line(merge_cli("--inputs", *copies, "--output", tmp_path / "corpus"))
    assert f"--output {copies[1]} --verify" in error and "prepare_run.json" not in error, error


def test_the_trainer_trains_on_the_merged_corpus(parts, merged, tmp_path, tiny_init_model):
    run_dir = tmp_path / "run"
    run_ok(python(overrides(run_dir, merged, tiny_init_model, "train.max_steps=2"), tmp_path / "train.out"))
    rows = read_log(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    first_part = len(PackedShards(parts[0]))
    assert any(i >= first_part for r in rows for i in r["sample_ids"])  # it reads beyond the first part


@pytest.mark.parametrize("inputs, fragment", [
    (lambda parts, other: [parts[0], parts[2]], "partition(s) [1] of 3 missing"),
    (lambda parts, other: [*parts, parts[1]], "is given twice"),
    (lambda parts, other: [*parts, other], "not a partition, but other --inputs are"),
    (lambda parts, other: [parts[0]], "--inputs: give at least two prepared directories"),
])
def test_a_merge_of_the_wrong_parts_is_one_error_line(parts, train_shards_64, tmp_path, capsys, inputs, fragment):
    code = merge_main(["--inputs", *map(str, inputs(parts, train_shards_64)), "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "m").exists()


def test_corpora_of_another_seq_len_or_over_a_prepared_output_are_refused(parts, train_shards_64, sample_shards,
                                                                          tmp_path, capsys):
    assert merge_main(["--inputs", str(train_shards_64), str(sample_shards), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{sample_shards}: seq_len 2048, but {train_shards_64} has 64" in err, err
    prepared = tmp_path / "prepared"  # a corpus of its own in the output directory: never overwritten
    prepared.mkdir()
    manifest = (train_shards_64 / "manifest.json").read_text()
    (prepared / "manifest.json").write_text(manifest)
    assert merge_main(["--inputs", *map(str, parts), "--output", str(prepared)]) == 2
    assert "holds a prepared corpus, not a merge" in capsys.readouterr().err
    assert (prepared / "manifest.json").read_text() == manifest


def test_a_partition_out_of_range_or_without_files_is_refused(slimpajama_sample, tokenizer_model, tmp_path):
    with pytest.raises(ConfigError, match="--partition must be in 0 .. --num-partitions - 1"):
        prep_config(slimpajama_sample, tokenizer_model, tmp_path / "x", num_partitions=3, partition=3)
    with pytest.raises(InputError, match="the input has only 5 file"):
        prepare_shards(prep_config(slimpajama_sample, tokenizer_model, tmp_path / "x", num_partitions=6, partition=5))
