"""Failpoints: named places in the trainer where a fault test can make one rank stall.

A stall makes a real `kill -9` or SIGTERM from the test land at an exact point (say, half-way through a
checkpoint save) instead of wherever a race puts it. Nothing is faked: the process is killed for real.
Off unless the environment names one:

    SHORTENED_FAILPOINT="checkpoint.after_engine_save:rank=1:step=6:sleep=300"
"""
from __future__ import annotations

import os
import sys
import time

ENV = "SHORTENED_FAILPOINT"


def failpoint(name: str, *, rank: int, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, *fields = spec.split(":")
    params = dict(field.split("=", 1) for field in fields)
    if target != name or int(params.get("rank", rank)) != rank or int(params.get("step", step)) != step:
        return
    seconds = float(params.get("sleep", 0))
    print(f"failpoint {name}: rank {rank} stalls {seconds:g} s at step {step}", file=sys.stderr, flush=True)
    time.sleep(seconds)
