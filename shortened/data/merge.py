"""Several prepared shard directories as one corpus: a merged manifest that lists the parts' shards where they lie.

A partitioned data prep (`--num-partitions N --partition i`, one part per node or array task) writes N complete
outputs; merging them copies no token. The merged directory holds only `manifest.json`: its shard entries are
paths relative to it (`../part_1/shard_00000.bin`), its counts are the parts' sums, and its fingerprint is made
of the parts' fingerprints, so a training run resumed on it checks the data identity as for any corpus. Every
reader of shards (trainer, validation loss, calibration) reads it unchanged. Sequences are numbered part after
part: the parts of a partitioned prep in partition order, whatever order `inputs` lists them in (a shell's `part_*`
puts part_10 before part_2), other corpora in the order of `inputs`. A merge into an existing merged manifest that
would renumber its sequences (the parts it shares with the new merge in another order) is refused: a job training
on it would read another order after its next resume.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from shortened.config import MergeConfig
from shortened.data.prep_stats import MAX_EXAMPLES
from shortened.data.shards import MANIFEST_NAME, ShardFormatError, check_shards, read_manifest, shard_path
from shortened.data.sources import InputError
from shortened.fsutil import atomic_write_json

# What every part must share for its token ids and sequences to mean the same as the others'.
MUST_AGREE = ("seq_len", "dtype", "tokenizer_sha256", "vocab_size", "bos_id", "eos_id", "shard_format_version")
SUMMED = ("num_sequences", "tokens_total", "tokens_in_sequences", "tokens_dropped", "docs_total", "max_tokens")


def merge_corpora(config: MergeConfig) -> dict:
    """Check the parts and write the merged manifest into `config.output`; returns it."""
    output = Path(config.output)
    parts = [Path(p) for p in config.inputs]
    manifests = [check_shards(part) for part in parts]  # each part complete: presence, sizes, headers
    _check_distinct(parts, output)
    _check_agree(parts, manifests)
    _check_packing(parts, manifests)
    _check_partitions(parts, manifests)
    parts, manifests = _in_partition_order(parts, manifests)
    merged = _merged_manifest(parts, manifests, output)
    _check_output(output, parts, merged)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(merged, output / MANIFEST_NAME)
    return merged


def _check_distinct(parts: list[Path], output: Path) -> None:
    seen: dict[Path, Path] = {}
    for part in parts:
        resolved = part.resolve()
        if resolved in seen:
            raise InputError(f"--inputs: {part} is given twice ({seen[resolved]}): each part's sequences would be "
                             "read twice")
        seen[resolved] = part
    if output.resolve() in seen:
        raise InputError(f"--output {output}: is one of the --inputs; write the merged manifest to a new directory")


def _check_agree(parts: list[Path], manifests: list[dict]) -> None:
    first, reference = parts[0], manifests[0]
    for part, manifest in zip(parts[1:], manifests[1:]):
        for key in MUST_AGREE:
            if manifest.get(key) != reference.get(key):
                raise InputError(f"{part}: {key} {manifest.get(key)!r}, but {first} has {reference.get(key)!r}: "
                                 "merge only corpora prepared with one tokenizer and one --seq-len")


def _check_packing(parts: list[Path], manifests: list[dict]) -> None:
    """Every part packed by source or none: a reader of per-source shards expects a `source` in every entry."""
    by_source = [bool(m.get("pack_by_source")) for m in manifests]
    if any(by_source) and not all(by_source):
        packed = parts[by_source.index(True)]
        mixed = parts[by_source.index(False)]
        raise InputError(f"{packed}: packed by source, but {mixed} is not: prepare every part with --pack-by-source, "
                         "or none")


def _check_partitions(parts: list[Path], manifests: list[dict]) -> None:
    """Parts of a partitioned prep come all together, each once; a merge of unpartitioned corpora is free."""
    partitions = [m.get("partition") for m in manifests]
    if all(p is None for p in partitions):
        return
    if any(p is None for p in partitions):
        lone = next(part for part, p in zip(parts, partitions) if p is None)
        raise InputError(f"{lone}: not a partition, but other --inputs are; merge the parts of one partitioned "
                         "prep, or corpora that are not partitioned")
    sizes = {m["partition"]["of"] for m in manifests}
    if len(sizes) > 1:
        raise InputError(f"--inputs: parts of preps with different --num-partitions ({sorted(sizes)})")
    size = sizes.pop()
    indices = [m["partition"]["index"] for m in manifests]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise InputError(f"--inputs: partition(s) {twice} given more than once (each part holds other input files)")
    missing = sorted(set(range(size)) - set(indices))
    if missing:
        raise InputError(f"--inputs: partition(s) {missing} of {size} missing: the merged corpus would lack their "
                         "input files; prepare them (--partition I --num-partitions N) and pass every part")


def _in_partition_order(parts: list[Path], manifests: list[dict]) -> tuple[list[Path], list[dict]]:
    """The parts of a partitioned prep by partition index: one prep gives one corpus, in one order, however its
    parts are listed. Unpartitioned corpora keep the order of --inputs, the user's choice."""
    if manifests[0].get("partition") is None:  # none is a partition (`_check_partitions`)
        return parts, manifests
    order = sorted(range(len(parts)), key=lambda i: manifests[i]["partition"]["index"])
    return [parts[i] for i in order], [manifests[i] for i in order]


def _check_output(output: Path, parts: list[Path], merged: dict) -> None:
    """An existing merge may be rewritten, but not renumbered; any other corpus there is not ours to overwrite."""
    if not (output / MANIFEST_NAME).is_file():
        return
    try:
        existing = read_manifest(output)
    except ShardFormatError:  # unreadable: not known to be a merge, so not ours to overwrite
        existing = {}
    if "merged_from" not in existing:
        raise InputError(f"--output {output}: holds a prepared corpus, not a merge; write the merge to a new "
                         "directory")
    _check_same_order(output, existing, parts, merged)


def _check_same_order(output: Path, existing: dict, parts: list[Path], merged: dict) -> None:
    """The parts both merges hold must come in the same order: sequences are numbered part after part, and a run
    training on the merge resumes by sample index, so another order would feed it other samples without a word."""
    before = [entry["path"] for entry in existing["merged_from"]]
    after = [entry["path"] for entry in merged["merged_from"]]
    shared = set(before) & set(after)
    if [p for p in before if p in shared] == [p for p in after if p in shared]:
        return
    listed = ", ".join(str(shard_path(output, p)) for p in before)
    raise InputError(f"--output {output}: {output / MANIFEST_NAME} merges {listed} in this order, but --inputs gives "
                     f"{', '.join(map(str, parts))}: a job training on it would read its sequences in another order "
                     "after its next resume; keep that manifest, or write this merge to a new --output")


def _merged_manifest(parts: list[Path], manifests: list[dict], output: Path) -> dict[str, Any]:
    relative = [Path(os.path.relpath(part.resolve(), output.resolve())) for part in parts]
    merged: dict[str, Any] = {key: manifests[0][key] for key in ("format_version", *MUST_AGREE)}
    merged.update({key: sum(m.get(key, 0) for m in manifests) for key in SUMMED})
    merged["fingerprint"] = hashlib.sha256(json.dumps([m["fingerprint"] for m in manifests]).encode()).hexdigest()
    merged["sources"] = _sum_nested(m.get("sources", {}) for m in manifests)
    merged["filtered"] = _sum_flat(m.get("filtered", {}) for m in manifests)
    merged["bad"] = _sum_flat(m.get("bad", {}) for m in manifests)
    merged["bad_by_file"] = _sum_nested(m.get("bad_by_file", {}) for m in manifests)
    merged["bad_examples"] = [e for m in manifests for e in m.get("bad_examples", [])][:MAX_EXAMPLES]
    merged["inputs"] = [entry for m in manifests for entry in m.get("inputs", [])]
    merged["shards"] = [{**entry, "file": (rel / entry["file"]).as_posix()}
                        for rel, m in zip(relative, manifests) for entry in m["shards"]]
    merged["merged_from"] = [_part_entry(rel, m) for rel, m in zip(relative, manifests)]
    if manifests[0].get("pack_by_source"):  # the parts agree on it (`_check_packing`)
        merged["pack_by_source"] = True
        merged["tokens_dropped_by_source"] = _sum_flat(m["tokens_dropped_by_source"] for m in manifests)
    return merged


def _part_entry(relative: Path, manifest: dict) -> dict[str, Any]:
    entry = {"path": relative.as_posix(), "fingerprint": manifest["fingerprint"],
             "num_sequences": manifest["num_sequences"]}
    if "partition" in manifest:
        entry["partition"] = manifest["partition"]
    return entry


def _sum_flat(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def _sum_nested(dicts) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for d in dicts:
        for name, counts in d.items():
            entry = total.setdefault(name, {})
            for key, value in counts.items():
                entry[key] = entry.get(key, 0) + value
    return dict(sorted(total.items()))
