"""Continued pretraining: `deepspeed launch/cpt.py --config configs/cpt/<recipe>.yaml [key=value ...]`.

Also runs under `torchrun`, SLURM `srun`, or plain `python` (one process). See docs/training.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened.train.cli import cpt_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cpt_main())
