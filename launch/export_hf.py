"""Export a checkpoint as a Hugging Face model: `python launch/export_hf.py --checkpoint DIR --out DIR`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shortened.train.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
