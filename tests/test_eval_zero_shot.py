"""Zero-shot through lm-eval: the numbers of simple_evaluate run directly, and a measurement that means something."""
from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from shortened.config import EvalConfig
from shortened.eval.hf_tokenizer import SentencePieceHFTokenizer
from shortened.eval.suite import EvalSuite
from shortened.eval.tasks import lm_eval_tasks_dir
from shortened.modeling import build_tiny_llama
from shortened.tokenizer import load_tokenizer

from conftest import EVAL_DATA
from eval_support import ZERO_SHOT, eval_config

LIMIT = 16
# The offline override of eval/README.md, written out by hand: lm-eval's own YAML, the mirror's files.
README_OVERRIDES = {
    "boolq": ("super_glue/boolq/default.yaml", {"validation": "boolq/validation.jsonl"}),
    "piqa": ("piqa/piqa.yaml", {"validation": "piqa/validation.jsonl"}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": "hellaswag/validation.jsonl"}),
    "winogrande": ("winogrande/default.yaml", {"validation": "winogrande/validation.jsonl"}),
    "arc_easy": ("arc/arc_easy.yaml", {"test": "arc_easy/test.jsonl"}),
    "arc_challenge": ("arc/arc_challenge.yaml", {"test": "arc_challenge/test.jsonl"}),
    "openbookqa": ("openbookqa/openbookqa.yaml", {"test": "openbookqa/test.jsonl"}),
}


def _direct(model, tokenizer_model, task: str) -> dict:
    """`lm_eval.simple_evaluate` itself on one task, as a user following eval/README.md would call it."""
    include, files = README_OVERRIDES[task]
    with tempfile.TemporaryDirectory() as tmp:
        override = {"include": str(lm_eval_tasks_dir() / include), "task": f"{task}_local", "dataset_path": "json",
                    "dataset_name": None, "training_split": None, "fewshot_split": None,
                    "dataset_kwargs": {"data_files": {k: str(EVAL_DATA / v) for k, v in files.items()}}}
        if "validation" not in files:
            override["validation_split"] = None
        Path(tmp, f"{task}.yaml").write_text(yaml.safe_dump(override))
        lm = HFLM(pretrained=model, tokenizer=SentencePieceHFTokenizer(tokenizer_model), add_bos_token=True,
                  batch_size=8)
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"{task}_local"], limit=LIMIT,
                                      task_manager=TaskManager(include_path=tmp, include_defaults=False))
    return out["results"][f"{task}_local"]


def test_same_numbers_as_simple_evaluate(tokenizer_model):
    model = build_tiny_llama(seed=11, num_layers=2)
    rows = EvalSuite(eval_config(ZERO_SHOT, limit=LIMIT), tokenizer_model).run(model)
    ours = {(r["task"], r["metric"]): r for r in rows}
    paper_metric = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                    "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
    for task in ZERO_SHOT:
        direct = _direct(model, tokenizer_model, task)
        metrics = [k.split(",")[0] for k in direct if k.endswith(",none") and "_stderr" not in k]
        assert metrics and paper_metric[task] in metrics
        for metric in metrics:
            row = ours[(task, metric)]
            assert row["value"] == direct[f"{metric},none"], (task, metric)
            assert row["stderr"] == direct[f"{metric}_stderr,none"], (task, metric)
            assert row["samples"] == LIMIT and row["primary"] == (metric == paper_metric[task])
    mean = ours[("zero_shot_mean", "mean")]
    assert abs(mean["value"] - sum(ours[(t, m)]["value"] for t, m in paper_metric.items()) / 7) < 1e-12
    assert mean["members"] == paper_metric  # what plot_curves takes a reference model's mean over
    assert mean["stderr"] == pytest.approx(math.sqrt(sum(ours[(t, m)]["stderr"] ** 2 for t, m in paper_metric.items()))
                                           / 7)


def _parity_prompt(n: int) -> str:
    return f"Number: {n}\nQuestion: even or odd?\nAnswer:"


def test_trained_model_solves_synthetic_task_untrained_is_at_chance(tmp_path, tokenizer_model):
    """A user-added task (own lm-eval YAML + task table entry): 2-way parity of a 4-digit number."""
    rng = random.Random(0)
    held_out = rng.sample(range(1000, 10000), 100)
    (tmp_path / "mirror" / "parity").mkdir(parents=True)
    (tmp_path / "mirror" / "parity" / "validation.jsonl").write_text(
        "".join(json.dumps({"number": n, "label": n % 2}) + "\n" for n in held_out))
    (tmp_path / "parity.yaml").write_text(
        "task: parity\ndataset_path: json\noutput_type: multiple_choice\nvalidation_split: validation\n"
        "doc_to_text: \"Number: {{number}}\\nQuestion: even or odd?\\nAnswer:\"\n"
        "doc_to_target: label\ndoc_to_choice: [\"even\", \"odd\"]\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"tasks": {"parity": {
        "kind": "lm_eval", "lm_eval_task": str(tmp_path / "parity.yaml"), "metric": "acc", "in_mean": True,
        "splits": {"validation": "parity/validation.jsonl"}}}}))
    config = EvalConfig(tasks=["parity"], data_dir=str(tmp_path / "mirror"), task_file=str(tmp_path / "tasks.yaml"),
                        batch_size=32)
    suite = EvalSuite(config, tokenizer_model)

    def acc(model) -> float:
        [row] = [r for r in suite.run(model) if r["task"] == "parity"]
        assert row["status"] == "ok" and row["samples"] == 100
        return row["value"]

    model = build_tiny_llama(seed=0, num_layers=2)
    untrained = acc(model)
    assert 0.35 <= untrained <= 0.65

    # Real training on numbers disjoint from the evaluated ones: next-token loss on the answer word.
    tok = load_tokenizer(tokenizer_model)
    train_numbers = sorted(set(range(1000, 10000)) - set(held_out))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    torch.manual_seed(0)
    for _ in range(60):
        ids = torch.tensor([[1] + tok.encode(_parity_prompt(n) + (" even" if n % 2 == 0 else " odd"))
                            for n in rng.sample(train_numbers, 32)])
        logits = model(input_ids=ids[:, :-1], logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, ids[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert acc(model) >= 0.95
    assert not model.training  # the suite scores in eval mode (the trainer's hook layer restores modes)


def test_failing_task_is_recorded_and_the_rest_still_run(tmp_path, tokenizer_model):
    mirror = tmp_path / "mirror"
    for task in ("boolq", "piqa"):
        (mirror / task).mkdir(parents=True)
        (mirror / task / "validation.jsonl").write_bytes((EVAL_DATA / task / "validation.jsonl").read_bytes())
    broken = mirror / "boolq" / "validation.jsonl"
    broken.write_text("<html><body>503 Service Unavailable</body></html>\n")  # an error page saved as the data
    config = EvalConfig(tasks=["boolq", "piqa"], data_dir=str(mirror), limit=8)
    rows = EvalSuite(config, tokenizer_model).run(build_tiny_llama(seed=1, num_layers=2))
    by_task = {r["task"]: r for r in rows if r["primary"]}
    assert by_task["boolq"]["status"] == "failed" and by_task["boolq"]["value"] is None
    assert "Traceback" in by_task["boolq"]["error"] and f"{broken}: no row can be scored" in by_task["boolq"]["error"]
    assert by_task["piqa"]["status"] == "ok" and by_task["piqa"]["samples"] == 8
    assert by_task["zero_shot_mean"]["status"] == "failed" and "boolq" in by_task["zero_shot_mean"]["error"]
