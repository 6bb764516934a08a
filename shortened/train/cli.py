"""Command lines of the trainer: `launch/cpt.py` (train / resume) and `launch/export_hf.py`."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING, Sequence

from shortened import cli
from shortened.config import ConfigError, RunConfig, load_config, render_config, value_sources
from shortened.fsutil import DISK_FULL_ERRNOS

if TYPE_CHECKING:  # the hooks module pulls in torch; --help and --print-config do without
    from shortened.train.hooks import TrainerHook

log = logging.getLogger("shortened.train")
# How gloo and NCCL report a peer that died or stopped answering (their errors are plain RuntimeErrors).
LOST_RANK_SIGNS = ("Timed out", "Connection closed by peer", "Connection reset by peer",
                   "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


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


def cpt_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        description="Continued pretraining on DeepSpeed ZeRO. Run under `deepspeed`, `torchrun`, `srun`, or plain "
                    "python (one process).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the --config file, or as key.sub=value overrides after it):\n"
               + cli.config_help(RunConfig))
    parser.add_argument("--config", required=True, help="run recipe, e.g. configs/cpt/tiny-cpu.yaml")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML, each value marked with where it came from "
                             "(default, file or override), and exit without training")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="passed by the deepspeed launcher; LOCAL_RANK from the environment is used")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. run_dir=runs/x train.max_steps=10")
    return parser


def cpt_main(argv: Sequence[str] | None = None, hooks: Sequence[TrainerHook] = ()) -> int:
    args = cpt_parser().parse_intermixed_args(argv)
    if args.print_config:  # before logging and the trainer's imports: no DeepSpeed, no torch.distributed
        return cli.run(lambda: print_config(args.config, args.overrides), (ConfigError,))
    rank = setup_logging()
    label = "error" if rank == 0 else f"error (rank {rank})"
    return cli.run(lambda: _train(args.config, args.overrides, hooks, rank), bad_input_errors(), label)


def print_config(path: str, overrides: Sequence[str]) -> int:
    config = load_config(RunConfig, path, overrides)
    print(render_config(config, value_sources(RunConfig, path, overrides)), end="")
    return 0


def _train(path: str, overrides: Sequence[str], hooks: Sequence[TrainerHook], rank: int) -> int:
    """Exit status of one training run; bad input propagates to `cli.run` (exit 2)."""
    from shortened.train.evaluation import evaluation_hooks
    from shortened.train.loop import NonFiniteLoss, train
    from shortened.train.plan import SetupError

    try:
        config = load_config(RunConfig, path, overrides)
        train(config, hooks=[*hooks, *evaluation_hooks(config)])
    except NonFiniteLoss as err:  # the same on every rank: said once
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except SetupError as err:  # rank 0 printed the cause
        log.debug("%s", err)
        return 2 if set(err.rank0_errors) & {kind.__name__ for kind in bad_input_errors()} else 1
    except RuntimeError as err:
        if not any(sign in str(err) for sign in LOST_RANK_SIGNS):
            raise
        log.exception("lost contact with another rank")
        print(f"error: rank {rank} lost contact with another rank (it died, or hung for longer than "
              "train.dist_timeout_s); the newest complete checkpoint is intact: rerun with resume=auto",
              file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        # Not bad input (2): the run was fine and goes on where it stopped once there is room, as after a lost rank.
        label = "error" if rank == 0 else f"error (rank {rank})"
        where = f" to write {err.filename}" if err.filename else ""
        print(f"{label}: disk full: no space left{where}; a checkpoint counts only once complete, so the newest "
              "complete one is intact: free space (or raise the quota) and rerun with resume=auto", file=sys.stderr)
        return 1
    return 0


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input (config, shards, tokenizer, checkpoint): one line, exit 2."""
    from shortened.data.shards import ShardFormatError
    from shortened.data.sources import InputError
    from shortened.tokenizer import TokenizerNotFound, TokenizerUnreadable
    from shortened.train.checkpoint import CheckpointError
    from shortened.train.loop import TokenOutOfRange

    return (ConfigError, CheckpointError, ShardFormatError, InputError, TokenizerNotFound, TokenizerUnreadable,
            TokenOutOfRange)


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(description="Export a complete training checkpoint as a Hugging Face model.")
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/step_NNNNNNNN")
    parser.add_argument("--out", required=True, help="output directory (safetensors + config + tokenizer)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default: the training precision, which reproduces the trained logits exactly")
    args = parser.parse_args(argv)
    setup_logging()
    from shortened.tokenizer import TokenizerUnreadable
    from shortened.train.checkpoint import CheckpointError
    from shortened.train.export import export_hf

    def export() -> int:
        print(f"exported {args.checkpoint} -> {export_hf(args.checkpoint, args.out, args.dtype)}")
        return 0

    return cli.run(export, (CheckpointError, TokenizerUnreadable))
