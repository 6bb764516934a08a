"""Save and restore every global RNG an evaluation may touch (lm-eval reseeds python, numpy and torch)."""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch


@dataclass
class RngState:
    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> "RngState":
        # Only an initialised CUDA context has generator states; querying one would initialise it otherwise.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever runs inside leaves python, numpy, torch and CUDA generators as it found them, even on error."""
    state = RngState.capture()
    try:
        yield
    finally:
        state.restore()
