"""Checkpoint evaluation: lm-eval zero-shot tasks, perplexity, validation loss, curves over tokens.

Modules (imported where needed; lm-eval is loaded only by `zero_shot`):
`tasks` (the task table), `mirror` (offline datasets, lm-eval overrides, prepare), `hf_tokenizer` (SentencePiece ids
for lm-eval), `zero_shot`, `perplexity`, `validation`, `scoring`, `suite` (one model, all tasks, failures recorded),
`dist` (sharding over ranks), `rng`, `results` (results.jsonl), `hook` (the trainer's inline evaluator), `watch`
(the checkpoint watcher), `single` (launch/evaluate.py), `report`, `curves`. See docs/evaluation.md.
"""
