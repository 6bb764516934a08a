"""What users see: one JSON line per optimizer step, TensorBoard scalars, and a console progress bar with ETA.

Throughput and MFU (docs/training.md): tokens/s = tokens per step / step time (forward, backward, optimizer
and the data wait; checkpoint saves and hooks excluded), MFU = tokens/s x `train_flops_per_token` / (world
size x peak dense bf16 FLOP/s of one device). Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from shortened.fsutil import truncate_log  # shared with the LoRA run; tests import it from here

log = logging.getLogger(__name__)
TRAIN_LOG = "train_log.jsonl"
# Dense bf16 peak FLOP/s per device (no sparsity), by the exact torch.cuda.get_device_name():
# a substring match read an H100 NVL (835) or PCIe (756) as the SXM part (989). A name not listed gives no MFU
# rather than a guess; log.peak_tflops sets it.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10G": 125e12,
}
TENSORBOARD_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "step_time_s",
                    "data_wait_s", "memory_gb")


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if name not in PEAK_FLOPS:
        log.warning("no dense bf16 peak known for %r: mfu is not logged; set log.peak_tflops", name)
    return PEAK_FLOPS.get(name)


def memory_gb(device: torch.device) -> float:
    """Peak device memory since the last call on CUDA; resident memory of this process on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class TrainLogger:
    def __init__(self, run_dir: Path, *, start_step: int, start_tokens: int, stop_tokens: int, every_steps: int,
                 tensorboard: bool) -> None:
        self.path = run_dir / TRAIN_LOG
        truncate_log(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        self.every_steps = every_steps
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of steps a resumed run re-does, exactly like truncate_log.
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=stop_tokens, initial=start_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                        mininterval=1 if tty else 30, desc="train", file=sys.stderr)
        # Log records (checkpoints, evaluations) print above the bar instead of through it.
        self._logging_via_bar = logging_redirect_tqdm()
        self._logging_via_bar.__enter__()

    def start_clock(self) -> None:
        """Measure speed and ETA from now: work before the first step (the step-0 evaluation, a minute on CPU)
        would otherwise count as training time and inflate the first ETAs many times over."""
        self.bar.start_t = self.bar.last_print_t = time.time()  # tqdm's own clock (its default timer)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        self.bar.update(record["tokens"] - self.bar.n)
        if step % self.every_steps == 0:
            self.bar.set_postfix(step=step, loss=_shown(record["loss"], ".4f"), lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.3g}", refresh=False)
            if self.writer is not None:
                for key in TENSORBOARD_KEYS:
                    if record.get(key) is not None:
                        self.writer.add_scalar(f"train/{key}", record[key], step)
                self.writer.add_scalar("train/tokens", record["tokens"], step)

    def message(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._logging_via_bar.__exit__(None, None, None)
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _shown(value: float | None, spec: str) -> str:
    """A logged value for the console; the log holds None for a non-finite loss (JSON has no NaN)."""
    return "nan" if value is None else format(value, spec)


class PhaseTimer:
    """Wall time of the phases of one step; with `sync`, the device is synchronised so GPU work is counted."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync and device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._start = 0.0

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._start
        self._start = now

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals
