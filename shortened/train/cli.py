"""Command lines of the trainer: `launch/cpt.py` (train / resume) and `launch/export_hf.py`."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import warnings
from typing import Sequence

from shortened.config import ConfigError, RunConfig, load_config

log = logging.getLogger("shortened.train")
# How gloo and NCCL report a peer that died or stopped answering (their errors are plain RuntimeErrors).
LOST_RANK_SIGNS = ("Timed out", "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                   "Watchdog caught collective operation timeout")


def setup_logging() -> int:
    """INFO on rank 0, warnings and errors only elsewhere, each line tagged with its rank."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "torch.distributed", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Per-file progress bars of weight loading/saving would tear the training progress bar.
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")  # inside DeepSpeed
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID` prints where a rank is stuck
    return rank


def cpt_main(argv: Sequence[str] | None = None, hooks: Sequence[object] = ()) -> int:
    parser = argparse.ArgumentParser(
        description="Continued pretraining on DeepSpeed ZeRO. Run under `deepspeed`, `torchrun`, `srun`, or plain "
                    "python (one process).")
    parser.add_argument("--config", required=True, help="run recipe, e.g. configs/cpt/tiny-cpu.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="passed by the deepspeed launcher; LOCAL_RANK from the environment is used")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. run_dir=runs/x train.max_steps=10")
    args = parser.parse_intermixed_args(argv)
    rank = setup_logging()
    from shortened.train.evaluation import evaluation_hooks
    from shortened.train.loop import NonFiniteLoss, train
    from shortened.train.plan import SetupError

    input_errors = bad_input_errors()
    try:
        config = load_config(RunConfig, args.config, args.overrides)
        train(config, hooks=[*hooks, *evaluation_hooks(config)])
    except input_errors as err:  # a config, data or checkpoint problem: the user fixes it, then reruns
        print(f"error: {one_line(err)}" if rank == 0 else f"error (rank {rank}): {one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:  # the same on every rank: said once
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except SetupError as err:  # rank 0 printed the cause
        log.debug("%s", err)
        return 2 if err.rank0_error in {kind.__name__ for kind in input_errors} else 1
    except RuntimeError as err:
        if not any(sign in str(err) for sign in LOST_RANK_SIGNS):
            raise
        log.exception("lost contact with another rank")
        print(f"error: rank {rank} lost contact with another rank (it died, or hung for longer than "
              "train.dist_timeout_s); the newest complete checkpoint is intact: rerun with resume=auto",
              file=sys.stderr)
        return 1
    return 0


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input (config, shards, tokenizer, checkpoint): one line, exit 2."""
    from shortened.data.shards import ShardFormatError
    from shortened.data.sources import InputError
    from shortened.tokenizer import TokenizerNotFound
    from shortened.train.checkpoint import CheckpointError
    from shortened.train.loop import TokenOutOfRange

    return ConfigError, CheckpointError, ShardFormatError, InputError, TokenizerNotFound, TokenOutOfRange


def one_line(err: Exception) -> str:
    """The message alone: an error raised in a DataLoader worker arrives wrapped with the worker's traceback."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(err).__name__ + ":") else last
    return text


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a complete training checkpoint as a Hugging Face model.")
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/step_NNNNNNNN")
    parser.add_argument("--out", required=True, help="output directory (safetensors + config + tokenizer)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default: the training precision, which reproduces the trained logits exactly")
    args = parser.parse_args(argv)
    setup_logging()
    from shortened.train.checkpoint import CheckpointError
    from shortened.train.export import export_hf

    try:
        out = export_hf(args.checkpoint, args.out, args.dtype)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0
