"""Streaming mode produces the same sequences as offline preparation of the same files."""
from __future__ import annotations

import numpy as np

from shortened.data.packing import document_position_ids
from shortened.data.shards import PackedShards
from shortened.data.streaming import StreamSpec, build_streaming_loader, stream_sequences


def test_stream_equals_offline_shards(sample_shards, slimpajama_sample, tokenizer_model):
    spec = StreamSpec(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model), seq_len=2048)
    shards = PackedShards(sample_shards)
    streamed = list(stream_sequences(spec))
    assert len(streamed) == len(shards) == 655
    for position, (tokens, doc_starts) in enumerate(streamed):
        assert np.array_equal(tokens, shards[position]), position
        assert np.array_equal(doc_starts, shards.doc_starts(position)), position


def test_streaming_loader_ranks_workers_and_resume(sample_shards, slimpajama_sample, tokenizer_model):
    spec = StreamSpec(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model), seq_len=2048)
    shards = PackedShards(sample_shards)
    global_batch, micro, steps = 8, 2, 3

    def read(world: int, consumed: int, num_workers: int) -> list[int]:
        loaders = [iter(build_streaming_loader(spec, global_batch_size=global_batch, micro_batch_size=micro,
                                               dp_rank=r, dp_world_size=world, consumed_samples=consumed,
                                               num_workers=num_workers, document_mask=True)) for r in range(world)]
        order = []
        for _ in range(steps):
            for loader in loaders:
                for _ in range(global_batch // (micro * world)):
                    batch = next(loader)
                    for row, positions, index in zip(batch["input_ids"], batch["position_ids"],
                                                     batch["sample_index"].tolist()):
                        assert np.array_equal(row.numpy(), shards[index])
                        expected = document_position_ids(shards.doc_starts(index), shards.seq_len)
                        assert np.array_equal(positions.numpy(), expected)
                    order += batch["sample_index"].tolist()
        return order

    assert read(world=2, consumed=0, num_workers=2) == list(range(steps * global_batch))
    resumed = read(world=1, consumed=steps * global_batch, num_workers=0)
    assert resumed == list(range(steps * global_batch, 2 * steps * global_batch))
