"""shortened: continued pretraining of depth-pruned LLaMA models (Shortened LLaMA, arXiv 2402.02834) on DeepSpeed."""

__version__ = "0.1.0"
