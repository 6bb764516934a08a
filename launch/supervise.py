"""Run a training launcher so that a stop signal returns only after every rank's checkpoint is complete:

    python launch/supervise.py -- deepspeed --num_gpus 8 launch/cpt.py --config configs/cpt/vicuna-2.7b.yaml ...

See docs/training.md (Preemption) and shortened/train/supervise.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened.train.supervise import supervise_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(supervise_main())
