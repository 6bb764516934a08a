"""The global-order loader: exact continuation across world sizes, full coverage within an epoch."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from shortened.data.loader import build_train_loader
from shortened.data.packing import document_position_ids
from shortened.data.sampler import FeistelPermutation, GlobalOrderSampler
from shortened.data.shards import PackedShards

GLOBAL, MICRO, SEED = 8, 2, 1234


def global_batches(shards_dir, world: int, steps: int, consumed: int = 0, num_workers: int = 0) -> list[list[int]]:
    """The samples of each optimizer step as the ranks of a `world`-rank job read them, rank by rank."""
    per_rank_steps = GLOBAL // (MICRO * world)
    loaders = [iter(build_train_loader(shards_dir, global_batch_size=GLOBAL, micro_batch_size=MICRO, dp_rank=r,
                                       dp_world_size=world, seed=SEED, consumed_samples=consumed,
                                       num_workers=num_workers)) for r in range(world)]
    batches = []
    for _ in range(steps):
        step: list[int] = []
        for loader in loaders:
            for _ in range(per_rank_steps):
                step += next(loader)["sample_index"].tolist()
        batches.append(step)
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_across_world_sizes_reads_the_uninterrupted_sequence(sample_shards, num_workers):
    k = 3
    straight_1 = global_batches(sample_shards, world=1, steps=2 * k, num_workers=num_workers)
    straight_2 = global_batches(sample_shards, world=2, steps=2 * k, num_workers=num_workers)
    assert straight_1 == straight_2  # the global order does not depend on the world size

    two_then_one = (global_batches(sample_shards, world=2, steps=k, num_workers=num_workers)
                    + global_batches(sample_shards, world=1, steps=k, consumed=k * GLOBAL, num_workers=num_workers))
    one_then_two = (global_batches(sample_shards, world=1, steps=k, num_workers=num_workers)
                    + global_batches(sample_shards, world=2, steps=k, consumed=k * GLOBAL, num_workers=num_workers))
    assert two_then_one == straight_1
    assert one_then_two == straight_1


def test_an_epoch_reads_every_sample_exactly_once_and_the_next_epoch_reshuffles(sample_shards):
    shards = PackedShards(sample_shards)
    n = len(shards)
    sampler = GlobalOrderSampler(n, GLOBAL, MICRO, dp_rank=0, dp_world_size=1, seed=SEED)
    epoch0 = sampler.global_indices(0, n)
    epoch1 = sampler.global_indices(n, n)
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.arange(n))  # actually shuffled

    # The same through the rank slices: steps crossing the epoch boundary continue into epoch 1.
    steps = -(-n // GLOBAL)
    read = list(itertools.chain.from_iterable(global_batches(sample_shards, world=2, steps=steps)))
    assert read[:n] == epoch0.tolist()
    assert read[n:] == epoch1[: steps * GLOBAL - n].tolist()


def test_batches_hold_the_shard_tokens(sample_shards):
    shards = PackedShards(sample_shards)
    batch = next(iter(build_train_loader(sample_shards, global_batch_size=GLOBAL, micro_batch_size=MICRO, dp_rank=1,
                                         dp_world_size=2, seed=SEED, num_workers=2)))
    assert batch["input_ids"].shape == (MICRO, 2048) and batch["input_ids"].dtype == torch.int64
    for row, index in zip(batch["input_ids"], batch["sample_index"].tolist()):
        assert torch.equal(row, torch.from_numpy(shards[index]))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65_537])
def test_feistel_is_a_permutation_and_seeded(n):
    values = FeistelPermutation(n, seed=7, epoch=0)(np.arange(n))
    assert np.array_equal(np.sort(values), np.arange(n))
    assert np.array_equal(values, FeistelPermutation(n, seed=7, epoch=0)(np.arange(n)))
    if n > 2:
        assert not np.array_equal(values, FeistelPermutation(n, seed=8, epoch=0)(np.arange(n)))


def test_sampler_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="does not split"):
        GlobalOrderSampler(100, 8, 3, dp_rank=0, dp_world_size=2, seed=0)
    with pytest.raises(ValueError, match="global-batch boundary"):
        GlobalOrderSampler(100, 8, 2, dp_rank=0, dp_world_size=2, seed=0, consumed_samples=4)


def test_document_position_ids_restart_at_every_document():
    assert document_position_ids(np.array([0, 3, 7]), 10).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    # A sequence that opens inside a document counts from 0, like any sequence; no start at all is one segment.
    assert document_position_ids(np.array([4]), 6).tolist() == [0, 1, 2, 3, 0, 1]
    assert document_position_ids(np.array([], dtype=np.int64), 4).tolist() == [0, 1, 2, 3]

