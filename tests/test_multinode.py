"""A two-"node" job on localhost through DeepSpeed's per-node launch path, resumed as one node.

`deepspeed --hostfile` runs `python -m deepspeed.launcher.launch --world_info=... --node_rank=N` on every node
over ssh/pdsh; here the two node-level launchers run side by side on this machine (one process each, gloo).
"""
from __future__ import annotations

import base64
import json
import sys

import pytest

from shortened.data.sampler import GlobalOrderSampler
from shortened.data.shards import PackedShards

from conftest import free_port
from train_support import CPT, GLOBAL_BATCH, RECIPE, Job, overrides, read_log, run_ok, warm

pytestmark = pytest.mark.timeout(600)


def node_launcher(node_rank: int, nodes: list[str], port: int, args: list[str], out) -> Job:
    world_info = base64.urlsafe_b64encode(json.dumps({node: [0] for node in nodes}).encode()).decode()
    return Job([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", CPT,
                "--config", RECIPE, *args], out)


def test_two_nodes_save_and_one_node_resumes_at_the_exact_data_position(tmp_path, train_shards_64, tiny_init_model):
    run_dir = tmp_path / "run"
    port = free_port()
    args = overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=8")
    nodes = [node_launcher(rank, ["node-a", "node-b"], port, args, tmp_path / f"node{rank}.out") for rank in (0, 1)]
    for node in reversed(nodes):  # node 1 first: node 0's rank 0 must wait for it at the rendezvous
        run_ok(node)
    two_nodes = read_log(run_dir)
    assert [r["step"] for r in two_nodes] == list(range(1, 9))
    assert (run_dir / "checkpoints" / "step_00000008" / "complete.json").is_file()
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "training_state.json").read_text())
    assert state["world_size"] == 2

    resumed_out = run_ok(warm(1, overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=12"),
                              tmp_path / "one_node.out"))
    assert "step_00000008" in resumed_out
    records = read_log(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))

    sampler = GlobalOrderSampler(len(PackedShards(train_shards_64)), GLOBAL_BATCH, 1, dp_rank=0, dp_world_size=1,
                                 seed=1234)
    for record in records:  # what the 2-process job read, then the 1-process job: the one global order
        step = record["step"]
        assert record["sample_ids"] == sampler.global_indices((step - 1) * GLOBAL_BATCH, GLOBAL_BATCH).tolist()
    assert records[8]["loss"] < two_nodes[0]["loss"]  # the one-node job continued the trained model
