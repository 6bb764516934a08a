"""Static mixture weights over the sources of shards packed by source (`data.mixture`): per-source sample orders,
the per-step split of the global batch, and the batch sampler that reads it.

Each source (a SlimPajama `meta.redpajama_set_name`) is a domain with its own samples (`SourceIndex`: ranges of
`PackedShards`' global index), its own seeded Feistel permutation per epoch and its own consumed counter; a domain
that runs out starts its next epoch alone. Step t's global batch of G samples is split into per-domain counts
(`advance`) so that every domain's cumulative count stays within one sample of weight x samples, and is the
concatenation of each domain's next samples in source-name order; rank r of W takes the slice [rG/W, (r+1)G/W).
Everything is a function of the `MixtureState` (weights, per-domain consumed, carried remainders), which the trainer
saves in the checkpoint, so a job resumed on any world size reads exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from shortened.data.sampler import FeistelPermutation


class MixtureError(ValueError):
    """A mixture state that cannot be used; the message names what is wrong."""


class SourceIndex:
    """Each source's samples as ranges of the global sample index of `PackedShards` (shards in manifest order):
    domain-local index j in [0, N_s) of source s is the j-th sample of its shards, in manifest order."""

    def __init__(self, shard_sources: list[str], shard_sizes: list[int]) -> None:
        starts = np.concatenate([[0], np.cumsum(shard_sizes, dtype=np.int64)[:-1]]).astype(np.int64)
        self._starts: dict[str, np.ndarray] = {}  # global index of each of the source's shards' first sample
        self._ends: dict[str, np.ndarray] = {}  # cumulative local count at the end of each of its shards
        for name in sorted(set(shard_sources)):
            mine = [k for k, source in enumerate(shard_sources) if source == name and shard_sizes[k]]
            self._starts[name] = starts[mine]
            self._ends[name] = np.cumsum([shard_sizes[k] for k in mine], dtype=np.int64)
        self._bounds = np.cumsum(shard_sizes, dtype=np.int64)
        self._shard_sources = np.asarray(shard_sources, dtype=object)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> SourceIndex | None:
        """The index of shards packed by source (`pack_by_source` in the manifest); None for mixed shards."""
        if not manifest.get("pack_by_source"):
            return None
        entries = manifest["shards"]
        return cls([entry["source"] for entry in entries], [entry["num_sequences"] for entry in entries])

    @property
    def num_samples(self) -> int:
        """All samples of the shards, every source's."""
        return int(self._bounds[-1]) if len(self._bounds) else 0

    @property
    def sources(self) -> list[str]:
        return sorted(source for source in self._ends if self.size(source))

    def size(self, source: str) -> int:
        ends = self._ends.get(source)
        return int(ends[-1]) if ends is not None and len(ends) else 0

    def sizes(self) -> dict[str, int]:
        return {source: self.size(source) for source in self.sources}

    def to_global(self, source: str, local: np.ndarray) -> np.ndarray:
        """Global sample indices of the source's local indices."""
        ends = self._ends[source]
        shard = np.searchsorted(ends, local, side="right")
        before = np.where(shard > 0, ends[np.maximum(shard - 1, 0)], 0)
        return self._starts[source][shard] + (local - before)

    def count_by_source(self, global_ids: np.ndarray) -> dict[str, int]:
        """How many of `global_ids` each source holds (every source named, in name order)."""
        owners = self._shard_sources[np.searchsorted(self._bounds, global_ids, side="right")]
        return {source: int(np.sum(owners == source)) for source in self.sources}


def source_seed(seed: int, source: str) -> int:
    """Each domain's permutation seed, from data.seed and the source's name: the same in every process (Python's
    hash() of a string is salted per process) and unrelated between sources."""
    digest = hashlib.sha256(f"{seed}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def domain_samples(index: SourceIndex, seed: int, source: str, start: int, count: int) -> np.ndarray:
    """Global sample indices at positions [start, start + count) of the source's own order: position p is local
    sample perm_e(p mod N_s) of its epoch e = p // N_s."""
    size = index.size(source)
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs = positions // size
    local = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        local[mask] = FeistelPermutation(size, source_seed(seed, source), int(epoch))(positions[mask] % size)
    return index.to_global(source, local)


# ---------------------------------------------------------------------------------------------- state and rounding


@dataclass(frozen=True)
class MixtureState:
    """Where a mixture stands: what a checkpoint saves and a resume starts from, identical on every rank.

    Every source of the shards is named, in name order. `weights` sum to 1 (0: not sampled); `consumed` counts each
    source's samples read so far over all its epochs; `remainders` are each source's share owed minus samples given
    since these weights were set (weight x samples - count), carried from step to step so the rounding never drifts.
    """

    weights: dict[str, float]
    consumed: dict[str, int]
    remainders: dict[str, float]

    @classmethod
    def start(cls, weights: Mapping[str, float], sources: list[str]) -> MixtureState:
        """A fresh mixture over `sources` (those `weights` does not name get weight 0)."""
        names = sorted(sources)
        return cls(weights={s: float(weights.get(s, 0.0)) for s in names}, consumed={s: 0 for s in names},
                   remainders={s: 0.0 for s in names})

    def with_weights(self, weights: Mapping[str, float], sources: list[str]) -> MixtureState:
        """New weights from this state on: each source keeps its consumed count (0 for one it did not have), and the
        rounding starts afresh (remainders 0: at most one sample per source off the old weights' share)."""
        fresh = MixtureState.start(weights, sources)
        return dataclasses.replace(fresh, consumed={s: self.consumed.get(s, 0) for s in fresh.consumed})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> MixtureState:
        """Strict: the three maps, over the same sources, of the right types; else MixtureError saying what."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != fields:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise MixtureError(f"a mixture state has the keys {sorted(fields)}, not {keys}")
        if not all(isinstance(data[name], dict) for name in fields):
            raise MixtureError("a mixture state's weights, consumed and remainders are objects keyed by source")
        if not set(data["weights"]) == set(data["consumed"]) == set(data["remainders"]):
            raise MixtureError("a mixture state's weights, consumed and remainders name different sources")
        names = sorted(data["weights"])
        consumed = {s: data["consumed"][s] for s in names}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in consumed.values()):
            raise MixtureError(f"a mixture state's consumed counts must be integers >= 0, got {consumed}")
        floats = {}
        for name in ("weights", "remainders"):
            values = {s: data[name][s] for s in names}
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                   for v in values.values()):
                raise MixtureError(f"a mixture state's {name} must be finite numbers, got {values}")
            floats[name] = {s: float(v) for s, v in values.items()}
        return cls(weights=floats["weights"], consumed=consumed, remainders=floats["remainders"])


def same_weights(a: Mapping[str, float], b: Mapping[str, float], tolerance: float = 1e-12) -> bool:
    """Equal up to the float noise of normalising the same numbers again."""
    return set(a) == set(b) and all(abs(a[s] - b[s]) <= tolerance for s in a)


def advance(state: MixtureState, global_batch_size: int) -> tuple[dict[str, int], MixtureState]:
    """One step: each source's share of the global batch (every source named, summing to the batch), and the state
    after it.

    The G samples are handed out one at a time. Before each, every source is owed its weight more (remainder r_s +=
    w_s); a source may take the sample only while it is owed some (r_s > 0, so its count never passes the ceiling of
    its share), and of those the one whose share reaches its next whole sample soonest ((1 - r_s) / w_s, ties by
    name) takes it (r_s -= 1). That is earliest-deadline-first over the windows in which each sample keeps the count
    between floor and ceiling of weight x samples; such a sequence exists for any weights (Balinski and Young's quota
    method), and EDF finds one, so every cumulative count stays within one sample of its share at every step. The
    simpler per-step largest-remainder split of the carried shares can give a source a negative count (weights 6/14,
    6/14, 2/14 at G=1, steps 4 and 11: the Alabama paradox). float64, the same operations on every rank.
    """
    names = [source for source, weight in state.weights.items() if weight > 0]
    weights = [state.weights[source] for source in names]
    owed = [state.remainders[source] for source in names]
    counts = [0] * len(names)
    for _ in range(global_batch_size):
        owed = [r + w for r, w in zip(owed, weights)]
        # r <= 0 sorts last, so a sample always finds a taker even if float noise left every source at 0
        pick = min(range(len(names)), key=lambda i: (owed[i] <= 0, (1 - owed[i]) / weights[i], names[i]))
        counts[pick] += 1
        owed[pick] -= 1
    step = {source: 0 for source in state.weights} | dict(zip(names, counts))
    after = MixtureState(weights=dict(state.weights),
                         consumed={s: state.consumed[s] + step[s] for s in state.weights},
                         remainders=dict(state.remainders) | dict(zip(names, owed)))
    return step, after


def epochs_begun(index: SourceIndex, before: MixtureState, after: MixtureState) -> dict[str, int]:
    """Sources whose samples between two states include the first of a new epoch (they ran out and started over),
    with that epoch."""
    begun = {}
    for source, count in after.consumed.items():
        size, start = index.size(source), before.consumed.get(source, 0)
        if size and count > start and (count - 1) // size > max(start - 1, 0) // size:
            begun[source] = (count - 1) // size
    return begun


def global_batch(index: SourceIndex, seed: int, state: MixtureState, counts: Mapping[str, int]) -> np.ndarray:
    """The step's global batch: each source's next `counts[s]` samples from `state`, sources in name order."""
    parts = [domain_samples(index, seed, s, state.consumed[s], counts[s]) for s in state.weights if counts[s]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class MixtureSampler:
    """Yields this rank's micro-batches of global sample indices under a mixture, from `state` on.

    A DataLoader `batch_sampler`, endless like `GlobalOrderSampler`: every world size dividing the global batch
    sees the same global batches, because they depend on the state alone and each rank takes its contiguous slice.
    The trainer keeps its own copy of the state (this one runs ahead by the prefetched batches).
    """

    def __init__(self, index: SourceIndex, state: MixtureState, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, seed: int) -> None:
        per_rank, rest = divmod(global_batch_size, dp_world_size)
        if rest or per_rank % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} does not split into {dp_world_size} ranks x micro "
                             f"batches of {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"rank {dp_rank} outside world size {dp_world_size}")
        missing = [s for s, w in state.weights.items() if w > 0 and not index.size(s)]
        if missing:
            raise MixtureError(f"the mixture samples {missing}, which the shards do not hold")
        self.index, self.state, self.seed = index, state, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.per_rank = dp_rank, per_rank

    def __iter__(self) -> Iterator[list[int]]:
        state = self.state
        while True:
            counts, after = advance(state, self.global_batch_size)
            batch = global_batch(self.index, self.seed, state, counts)
            mine = batch[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank]
            for lo in range(0, self.per_rank, self.micro_batch_size):
                yield mine[lo : lo + self.micro_batch_size].tolist()
            state = after
