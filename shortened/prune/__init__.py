"""Depth pruning: block-importance criteria, one-shot removal of whole blocks, LoRA retraining."""
