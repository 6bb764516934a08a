"""The trainer's RNG capture / restore: `shortened.rng`, the one implementation shared with evaluation and LoRA."""
from shortened.rng import (
    capture_rng_state,
    load_rng_state,
    preserved_rng,
    preserved_rng_and_mode,
    restore_rng_state,
    save_rng_state,
    seed_everything,
)

__all__ = ["capture_rng_state", "load_rng_state", "preserved_rng", "preserved_rng_and_mode", "restore_rng_state",
           "save_rng_state", "seed_everything"]
