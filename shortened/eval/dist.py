"""Evaluation's own process groups: shard work over data-parallel ranks without ever stalling the training job.

Two gloo groups over the default group's ranks, created at the same point on every rank:
- `work`: lm-eval's internal collectives (instance counts, metric gathering) and nothing else. A rank that fails
  inside a task leaves the others waiting there; they give up after `timeout_s`. After any failure the group is
  replaced, so stale half-finished operations can never pair with the next task's.
- `control`: one exchange per task (`agree`), always reached by every rank whether its part failed or not, so all
  ranks record the same outcome and stay in lockstep. Its timeout outlasts the work group's.
gloo works next to NCCL, moves only small objects here, and keeps eval traffic off the training communicator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective of the work group failed or timed out: most likely another rank failed first."""


def _collective(fn):
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as err:
            raise PeerFailure(f"rank {self.rank} gave up waiting for the other ranks in {fn.__name__}: {err}") from err

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@dataclass
class EvalGroups:
    rank: int
    world_size: int
    timeout_s: float
    work: Any = field(repr=False)
    control: Any = field(repr=False)

    @classmethod
    def from_default_group(cls, timeout_s: float) -> "EvalGroups | None":
        """Groups over all ranks when torch.distributed is initialized with more than one rank, else None.

        Collective: every rank must call it at the same point of its program.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        work = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=3 * timeout_s + 60))
        return cls(dist.get_rank(), dist.get_world_size(), timeout_s, work, control)

    def agree(self, local: Any) -> list[Any]:
        """Every rank's `local` object, in rank order, on every rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self.control)
        return gathered

    def renew_work_group(self) -> None:
        """Replace the work group after a failure (collective; all ranks know of the failure from `agree`)."""
        stale = self.work
        self.work = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        try:
            dist.destroy_process_group(stale)
        except Exception:  # a group left mid-operation may refuse a clean shutdown; it is never used again
            pass

    @_collective
    def all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor from every rank along dim 0 (gloo: via CPU, returned on the input's device)."""
        cpu = tensor.detach().cpu().reshape(-1, *tensor.shape[1:]) if tensor.dim() else tensor.detach().cpu().reshape(1)
        parts = [torch.empty_like(cpu) for _ in range(self.world_size)]
        dist.all_gather(parts, cpu, group=self.work)
        return torch.cat(parts).to(tensor.device)

    @_collective
    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst, group=self.work)
        return result

    @_collective
    def barrier(self) -> None:
        dist.barrier(group=self.work)
