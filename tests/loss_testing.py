"""What the chunked-loss tests share: a packed micro-batch of documents over the 32k vocabulary, and dispatch-level
probes (live memory, matmul operand dtypes, host synchronisations) that see every op the loss runs, backward too."""
from __future__ import annotations

import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from shortened.data.packing import document_position_ids
from shortened.modeling import LLAMA_VOCAB_SIZE

BATCH, SEQ_LEN = 2, 64
DOC_STARTS = [np.array([0, 17, 40]), np.array([0, 9, 33, 58])]
CHUNK = 40  # 2 * 63 = 126 predicted positions: the last chunk is partial


def packed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids) of 2 packed rows with 3 and 4 documents, position ids restarting at each."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, LLAMA_VOCAB_SIZE, (BATCH, SEQ_LEN), generator=generator)
    position_ids = torch.from_numpy(np.stack([document_position_ids(s, SEQ_LEN) for s in DOC_STARTS]))
    return input_ids, position_ids


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


class PeakLiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created under this mode and still alive, and their peak: torch's CPU allocator is
    invisible to tracemalloc, and RSS is noisy, but every tensor an op returns passes through here (backward too)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an argument's storage: nothing new, even if made before the mode was.
        shared = {arg.untyped_storage().data_ptr() for arg in tree_leaves((args, kwargs))
                  if isinstance(arg, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in shared and key not in self._seen:
                    self._seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of every matrix product's operands."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
               torch.ops.aten.bmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.dtypes |= {arg.dtype for arg in tree_leaves(args) if isinstance(arg, torch.Tensor)}
        return func(*args, **(kwargs or {}))


class HostSyncs(TorchDispatchMode):
    """The ops that need a tensor's value on the host: scalar reads, nonzero, and indexing by a boolean mask."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        by_mask = func is torch.ops.aten.index.Tensor and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in tree_leaves(args[1:]))
        if func in self.READS or by_mask:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
