"""The process group, whatever started the processes: `deepspeed`, `torchrun`, SLURM `srun`, or plain `python`.

The `deepspeed` launcher and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
`srun` exports SLURM_* variables instead, which are mapped here; a plain `python` process is a world of one.
Every collective has a timeout (train.dist_timeout_s), so a rank that died or hangs ends the job with an error
instead of leaving the others blocked forever.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from shortened.ports import free_port

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT this process should run with.

    Variables already set by a launcher win; under `srun` (SLURM_STEP_NUM_TASKS is set only inside a job step,
    so a batch script that runs python directly stays a world of one) they come from SLURM's.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        found = {key: environ[key] for key in LAUNCH_VARIABLES if key in environ}
        # MPI-style launchers export RANK without LOCAL_RANK; RANK would pick the wrong GPU on a second node.
        found.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID") or environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
                         or found["RANK"])
        return found
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        # One port per job, so two jobs sharing a node never join each other's rendezvous.
        port = environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
        return {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": port,
        }
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
            "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(free_port())}


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def setup_distributed(timeout_s: int) -> DistEnv:
    """Initialise the process group through DeepSpeed (gloo on CPU, NCCL on CUDA) with a collective timeout."""
    import deepspeed

    os.environ.update(launch_variables(os.environ))
    # NCCL only honours the timeout when errors are handled asynchronously: a hung collective then aborts
    # the process rather than blocking it forever.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    if device.type == "cpu":
        release_shm_buffer_name()
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                   backend=backend)


SHM_DIR = Path("/dev/shm")


def shm_buffer_path(rank: int, environ: Mapping[str, str] = os.environ) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's 67 MB workspace (its shm.cpp names it so)."""
    return SHM_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR')}_"
                      f"{environ.get('MASTER_PORT')}_{rank}")


def release_shm_buffer_name() -> None:
    """Unlink this rank's shared-memory workspace once every rank has mapped the others'.

    DeepSpeed's CPU communication op creates one 67 MB POSIX shared-memory segment per rank and never unlinks it,
    so every CPU job, finished or killed, left 67 MB x ranks in /dev/shm (RAM) until reboot: a day of test jobs
    filled 20 GB and the OOM killer ended a rank. Each rank opens its peers' segments inside `init_distributed`,
    so after a barrier the names are no longer needed; the mappings stay valid and the kernel frees the memory
    when the last process of the job exits, however it exits.
    """
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def apply_timeout_to_all_groups(timeout_s: int) -> None:
    """Give every process group the configured timeout.

    DeepSpeed builds its ZeRO data-parallel groups with `new_group()`, which takes torch's default (30 minutes)
    rather than the timeout of the default group: without this a stuck rank would block the others in a
    gradient reduction for half an hour.
    """
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of each value over ranks (float64, so sums of per-rank losses are exact to the last bit we log)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_ints(values: list[int], device: torch.device) -> list[int]:
    """This rank's values concatenated over ranks in rank order (equal lengths on every rank)."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.cat(gathered).tolist()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


