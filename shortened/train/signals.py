"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary, then a clean exit 0.

The handler only records the signal; the loop agrees on stopping across ranks (one rank receiving it is
enough) inside the all-reduce it does every step anyway. DataLoader workers ignore both signals: a signal
sent to the whole process group (SLURM, a container stop) must not kill the workers the rank still reads from
before it reaches the step boundary (PyTorch's own worker handler would end them). They still exit with their
rank, whose death they watch.
"""
from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.signal_name is not None


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the rank, not its workers, reacts to preemption."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
