"""Checkpoint evaluation: lm-eval zero-shot tasks, perplexity, validation loss, curves over tokens."""
