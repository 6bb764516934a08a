"""The one error type of bad input to pruning and LoRA, so the command lines can tell it from a bug."""
from __future__ import annotations


class PruneInputError(ValueError):
    """A count, a file or a directory given to pruning or LoRA cannot be used; the message says what, where and the
    fix. launch/prune.py and launch/lora.py print it as one `error:` line and exit 2."""
