"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary, then a clean exit 0.

The handler only records the signal; the loop agrees on stopping across ranks (one rank receiving it is
enough) inside the all-reduce it does every step anyway. It is installed before the DataLoader forks its
workers, so they inherit a handler that sets a flag nobody reads instead of dying: a signal sent to the whole
process group (SLURM, a terminal) must not kill the workers the save still waits for.
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
