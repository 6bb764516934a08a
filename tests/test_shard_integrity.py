"""Damaged shards are never trained on: flipped bits, truncation, deletion and bad headers, each done for real."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from shortened.data.loader import build_train_loader
from shortened.data.shards import (
    HEADER_BYTES,
    MAGIC,
    PackedShards,
    Shard,
    ShardFormatError,
    check_shards,
    read_header,
)


@pytest.fixture
def shards_copy(sample_shards, tmp_path) -> Path:
    """A private copy of the sample shards to damage."""
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    return copy


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def test_a_flipped_low_bit_in_a_token_is_refused_when_read(shards_copy):
    before = PackedShards(shards_copy)
    shard_file = shards_copy / manifest_of(shards_copy)["shards"][0]["file"]
    row, column = 3, 100
    good = before[row].copy()
    flip_bit(shard_file, HEADER_BYTES + (row * before.seq_len + column) * 2)  # the low bit of one uint16 token

    shards = PackedShards(shards_copy)  # the start-up check cannot see it: size and header are intact
    with pytest.raises(ShardFormatError) as err:
        shards[row]
    message = str(err.value)
    assert str(shard_file) in message and f"sequence {row} fails its CRC32" in message
    assert "--verify" in message and f"--output {shards_copy}" in message
    assert np.array_equal(shards[row + 1], before[row + 1])  # the other rows still read, unchanged
    assert good[column] != 0  # (the damaged token was a real token, so the check is not vacuous)

    loader = iter(build_train_loader(shards_copy, global_batch_size=len(shards), micro_batch_size=len(shards),
                                     dp_rank=0, dp_world_size=1, seed=0))
    with pytest.raises(ShardFormatError, match="fails its CRC32"):
        next(loader)  # the whole epoch in one batch reads the damaged row too


def test_a_flipped_bit_in_the_document_starts_is_refused(shards_copy):
    entry = manifest_of(shards_copy)["shards"][0]
    path = shards_copy / entry["file"]
    header = read_header(path)
    flip_bit(path, header.doc_starts_offset + 8 * 5, bit=3)
    shards = PackedShards(shards_copy)
    assert len(shards[0]) == shards.seq_len  # tokens are fine
    with pytest.raises(ShardFormatError, match=f"{path}: the document starts fail their CRC32"):
        shards.doc_starts(0)


def test_a_flipped_bit_in_the_crc_array_is_refused_too(shards_copy):
    path = shards_copy / manifest_of(shards_copy)["shards"][0]["file"]
    flip_bit(path, read_header(path).crc_offset + 4 * 7)
    with pytest.raises(ShardFormatError, match="sequence 7 fails its CRC32"):
        PackedShards(shards_copy)[7]


def test_check_shards_names_the_missing_truncated_or_mismatched_shard(shards_copy):
    manifest = check_shards(shards_copy)
    assert manifest == manifest_of(shards_copy)
    entry = manifest["shards"][0]
    path = shards_copy / entry["file"]
    original = path.read_bytes()

    path.unlink()
    with pytest.raises(ShardFormatError, match=f"{path}: missing shard .*--verify"):
        check_shards(shards_copy)
    with pytest.raises(ShardFormatError, match="missing shard"):
        build_train_loader(shards_copy, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_world_size=1, seed=0)

    path.write_bytes(original[:-4096])
    with pytest.raises(ShardFormatError, match=f"{path}: {len(original) - 4096} bytes, manifest.json says "
                                               f"{len(original)}: truncated"):
        check_shards(shards_copy)

    path.write_bytes(b"\0" * len(original))  # right size, no header
    with pytest.raises(ShardFormatError, match=f"{path}: not a token shard"):
        check_shards(shards_copy)

    # A header that parses but disagrees with the manifest (another shard's counts, same size).
    fields = json.loads(original[12:12 + struct.unpack("<I", original[8:12])[0]])
    fields["num_docs"] += 1  # the size the header promises stays the file's
    blob = json.dumps(fields, sort_keys=True).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(blob)) + blob + original[12 + len(blob):])
    with pytest.raises(ShardFormatError, match=f"{path}: header .* disagrees with its manifest.json entry"):
        check_shards(shards_copy)


def test_check_shards_refuses_a_missing_or_corrupt_manifest(shards_copy):
    manifest_path = shards_copy / "manifest.json"
    text = manifest_path.read_text()
    manifest_path.write_text(text[: len(text) // 2])  # cut mid-file
    with pytest.raises(ShardFormatError, match=f"{manifest_path}: unreadable manifest"):
        check_shards(shards_copy)
    manifest_path.write_text(json.dumps({**json.loads(text), "shards": None}))
    with pytest.raises(ShardFormatError, match="incomplete manifest"):
        check_shards(shards_copy)
    manifest_path.unlink()
    with pytest.raises(ShardFormatError, match="no manifest; prepare shards with"):
        check_shards(shards_copy)


def test_format_1_shards_are_refused_with_the_fix(shards_copy):
    """Format 1 has no CRCs: rather than read unverified bytes, the reader asks for a new preparation."""
    manifest = manifest_of(shards_copy)
    path = shards_copy / manifest["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    fields = json.loads(data[12:12 + struct.unpack("<I", data[8:12])[0]])
    for key in ("crc_offset", "doc_starts_crc32"):
        del fields[key]
    fields["format_version"] = 1
    blob = json.dumps(fields, sort_keys=True).encode()
    data[8:HEADER_BYTES] = struct.pack("<I", len(blob)) + blob + b"\0" * (HEADER_BYTES - 12 - len(blob))
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="shard format version 1, this code reads 2; format 1 has no "
                                               "per-sequence checksums; prepare the corpus again"):
        Shard(path)

    (shards_copy / "manifest.json").write_text(json.dumps({**manifest, "shard_format_version": 1}))
    with pytest.raises(ShardFormatError, match="shards of format version 1.*new --output"):
        check_shards(shards_copy)


def test_verify_compares_sha256(shards_copy):
    PackedShards(shards_copy, verify=True)
    path = shards_copy / manifest_of(shards_copy)["shards"][-1]["file"]
    flip_bit(path, HEADER_BYTES + 10)
    with pytest.raises(ShardFormatError, match=f"{path}: sha256 differs"):
        PackedShards(shards_copy, verify=True)
