"""One deterministic global sample order, sliced per data-parallel rank from a global consumed-samples counter.

Position p of the global stream (p = 0, 1, 2, ... over all epochs) is sample `permutation_e(p mod N)` of epoch
e = p // N, where permutation_e is a seeded bijection of [0, N). Optimizer step s consumes positions
[s*G, (s+1)*G) for global batch G; rank r of W takes the contiguous slice [r*G/W, (r+1)*G/W) of it, cut into
micro-batches. The trainer saves only `consumed_samples` (= s*G at a step boundary), so a job resumed on any
world size reads exactly the global batches an uninterrupted run would have read next.

The permutation is a keyed Feistel network with cycle walking: O(1) memory whatever N (a materialised
permutation of SlimPajama's ~300M sequences would take 2.4 GB per rank) and O(1) work per index.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit bit mixer, vectorised."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A pseudo-random bijection of [0, n) determined by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n <= 0:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        with np.errstate(over="ignore"):  # wrapping 64-bit arithmetic is the point of the mixer
            base = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
            epoch_key = np.array([epoch], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            self.keys = _mix64(np.arange(_ROUNDS, dtype=np.uint64) + base + epoch_key)

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Permuted values of `index` (an int array within [0, n))."""
        with np.errstate(over="ignore"):
            x = np.asarray(index, dtype=np.uint64).copy()
            todo = np.ones(len(x), dtype=bool)
            # Cycle walking: the network permutes [0, 4^half_bits) ⊇ [0, n); re-apply until inside [0, n).
            # Each pass lands inside with probability > 1/4, so a handful of passes suffice.
            while todo.any():
                x[todo] = self._encrypt(x[todo])
                todo = x >= np.uint64(self.n)
            return x.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << shift) | right


def global_order_indices(num_samples: int, seed: int, start: int, count: int) -> np.ndarray:
    """Sample indices at positions [start, start + count) of the global order of `num_samples` samples."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs = positions // num_samples
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = FeistelPermutation(num_samples, seed, int(epoch))(positions[mask] % num_samples)
    return out


class GlobalOrderSampler:
    """Yields this rank's micro-batches of sample indices, starting after `consumed_samples` global samples.

    Used as a DataLoader `batch_sampler`; iteration is endless (epoch after epoch) and the trainer decides
    when to stop. `epoch_of(position)` tells which pass over the data a global position belongs to.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_world_size: int, seed: int, consumed_samples: int = 0) -> None:
        per_rank, rest = divmod(global_batch_size, dp_world_size)
        if rest or per_rank % micro_batch_size:
            raise ValueError(
                f"global batch {global_batch_size} does not split into {dp_world_size} ranks x micro batches of "
                f"{micro_batch_size}"
            )
        if consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples={consumed_samples} is not at a global-batch boundary")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"rank {dp_rank} outside world size {dp_world_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.per_rank = per_rank
        self.seed = seed
        self.consumed_samples = consumed_samples

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions [start, start + count)."""
        return global_order_indices(self.num_samples, self.seed, start, count)

    def epoch_of(self, position: int) -> int:
        return position // self.num_samples

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.consumed_samples
        while True:
            mine = self.global_indices(step_start + self.dp_rank * self.per_rank, self.per_rank)
            for lo in range(0, self.per_rank, self.micro_batch_size):
                yield mine[lo : lo + self.micro_batch_size].tolist()
            step_start += self.global_batch_size
