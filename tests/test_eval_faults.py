"""Evaluation faults done for real: malformed mirror rows, bad command lines, a missing model or mirror.

A malformed row is reported with file, line and field and never scored: the accuracy is exactly the one of a
mirror with that row deleted. Bad input to launch/evaluate.py and launch/eval_watch.py ends in one
`error: ...` line and exit 2, without a traceback.
"""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from shortened.config import EvalConfig
from shortened.eval.report import paper_table
from shortened.eval.rows import MalformedMirrorError, check_file
from shortened.eval.suite import EvalSuite
from shortened.modeling import build_tiny_llama, save_with_tokenizer

import warm_start
from conftest import EVAL_DATA, ROOT, TOKENIZER_MODEL, subprocess_env
from train_support import CPT, RECIPE, overrides

ROWS = 20  # of the real PIQA rows, enough for accuracies that move when one row is scored wrongly
BAD_LINE = 5


def piqa_mirror(root: Path, lines: list[str]) -> Path:
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "validation.jsonl").write_text("".join(lines))
    return root


def real_lines(task_file: str, n: int = ROWS) -> list[str]:
    return (EVAL_DATA / task_file).read_text().splitlines(keepends=True)[:n]


def piqa_rows(mirror: Path, model) -> list[dict]:
    return EvalSuite(EvalConfig(tasks=["piqa"], data_dir=str(mirror)), TOKENIZER_MODEL).run(model)


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=1, num_layers=2)


@pytest.fixture(scope="module")
def without_bad_row(tmp_path_factory, model) -> dict:
    """piqa acc on the real rows with row BAD_LINE deleted: what a mirror with that row malformed must give."""
    lines = real_lines("piqa/validation.jsonl")
    del lines[BAD_LINE - 1]
    rows = piqa_rows(piqa_mirror(tmp_path_factory.mktemp("deleted"), lines), model)
    return next(r for r in rows if r["metric"] == "acc")


def _label_minus_one(line: str) -> str:
    return json.dumps({**json.loads(line), "label": -1}) + "\n"


def _not_json(line: str) -> str:
    return line[: len(line) // 2] + "\n"  # a row cut in half


def _missing_field(line: str) -> str:
    row = json.loads(line)
    del row["sol2"]
    return json.dumps(row) + "\n"


@pytest.mark.parametrize("corrupt, field, reason", [
    (_label_minus_one, "label", "-1 is not one of 0, 1"),
    (_not_json, "-", "not a JSON row"),
    (_missing_field, "sol2", "missing"),
])
def test_malformed_row_is_reported_and_never_scored(corrupt, field, reason, tmp_path, model, without_bad_row,
                                                    caplog):
    lines = real_lines("piqa/validation.jsonl")
    lines[BAD_LINE - 1] = corrupt(lines[BAD_LINE - 1])
    mirror = piqa_mirror(tmp_path / "mirror", lines)
    before = (mirror / "piqa" / "validation.jsonl").read_bytes()
    with caplog.at_level(logging.WARNING):
        rows = piqa_rows(mirror, model)
    acc = next(r for r in rows if r["metric"] == "acc")
    where = f"{mirror / 'piqa' / 'validation.jsonl'}:{BAD_LINE}: {field}: {reason}"
    assert acc["status"] == "ok" and acc["samples"] == ROWS - 1
    assert acc["value"] == without_bad_row["value"] and acc["stderr"] == without_bad_row["stderr"]
    assert acc["skipped_rows"] == 1 and acc["skipped"][0].startswith(where)
    assert where in caplog.text and "not scored" in caplog.text
    assert f"SKIPPED piqa: 1 malformed row(s) not scored, first: {where}" in paper_table(rows)
    assert (mirror / "piqa" / "validation.jsonl").read_bytes() == before  # the mirror is only read
    assert without_bad_row["skipped_rows"] == 0


def test_a_file_without_a_valid_row_fails_the_task_naming_it(tmp_path, model):
    lines = [_label_minus_one(line) for line in real_lines("piqa/validation.jsonl", 3)]
    mirror = piqa_mirror(tmp_path / "mirror", lines)
    [acc] = [r for r in piqa_rows(mirror, model) if r["task"] == "piqa"]
    assert acc["status"] == "failed" and acc["value"] is None
    assert f"{mirror / 'piqa' / 'validation.jsonl'}: no row can be scored" in acc["error"]
    assert "validation.jsonl:1: label: -1 is not one of 0, 1" in acc["error"]


def _set(field, value):
    def corrupt(row):
        row[field] = value
    return corrupt


def _set_choices(key, value):
    def corrupt(row):
        row["choices"][key] = value
    return corrupt


@pytest.mark.parametrize("task_file, schema, corrupt, where", [
    ("boolq/validation.jsonl", "boolq", _set("label", 2), "label: 2 is not one of 0, 1"),
    ("boolq/validation.jsonl", "boolq", _set("passage", None), "passage: expected a string, got null"),
    ("hellaswag/validation.jsonl", "hellaswag", _set("label", "4"), 'label: "4" is not one of 0, 1, 2, 3'),
    ("hellaswag/validation.jsonl", "hellaswag", _set("endings", ["a", "b", "c"]), "endings: expected 4 strings"),
    ("winogrande/validation.jsonl", "winogrande", _set("answer", 1), "answer: 1 is not '1' or '2'"),
    ("winogrande/validation.jsonl", "winogrande", _set("sentence", "no blank"), "sentence: has no '_'"),
    ("arc_easy/test.jsonl", "arc", _set("answerKey", "E"), 'answerKey: "E" is not one of the choice labels A'),
    ("arc_challenge/test.jsonl", "arc", _set_choices("label", ["A", "B"]), "choices: 4 texts but 2 labels"),
    ("openbookqa/test.jsonl", "openbookqa", _set("answerKey", " Z"), 'answerKey: " Z" is not one of the choice'),
    ("lambada_openai/test.jsonl", "lambada", _set("text", "word"), "text: needs a context and a last word"),
])
def test_each_task_schema_names_the_field(task_file, schema, corrupt, where, tmp_path):
    lines = real_lines(task_file, 4)
    assert not check_file(EVAL_DATA / task_file, schema).problems  # every real row of the mirror is valid
    row = json.loads(lines[2])
    corrupt(row)
    lines[2] = json.dumps(row) + "\n"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(lines))
    checked = check_file(path, schema)
    assert len(checked.problems) == 1 and str(checked.problems[0]).startswith(f"{path}:3: {where}")
    assert checked.valid_lines == lines[:2] + lines[3:]


def test_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MalformedMirrorError, match="empty.jsonl: no row can be scored .the file is empty"):
        check_file(tmp_path / "empty.jsonl", "piqa")


# ---------------------------------------------------------------------------------------------- command lines


def run_cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return warm_start.run([ROOT / "launch" / script, *args], env=subprocess_env(), timeout=240)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and result.stderr.endswith("\n"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_with_tokenizer(build_tiny_llama(seed=2, num_layers=2), tmp_path_factory.mktemp("m") / "model",
                               TOKENIZER_MODEL)


@pytest.mark.parametrize("args, fragments", [
    (["--tasks", "nosuchtask"], ["unknown task(s) nosuchtask", "known: boolq, piqa, hellaswag", "eval.task_file"]),
    (["--tasks", "piqa", "--limit", "-1"], ["eval.limit", "must be >= 0"]),
    (["--tasks", "piqa", "--batch-size", "x"], ["--batch-size", "invalid int value"]),
    # piqa twice would be scored twice and weigh double in the zero-shot mean
    (["--tasks", "piqa,piqa,arc_easy"], ["eval.tasks: piqa given more than once"]),
    # no task and no validation shards: nothing to evaluate, an empty result that looks like success
    (["--tasks", ""], ["eval.tasks: empty", "nothing to evaluate", "known: boolq", "--validation-shards"]),
])
def test_evaluate_bad_arguments(args, fragments, model_dir, tmp_path):
    result = run_cli("evaluate.py", "--model", str(model_dir), "--data-dir", str(EVAL_DATA), *args,
                     "--output", str(tmp_path / "res.json"))
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "res.json").exists()


def test_evaluate_missing_model_or_mirror(model_dir, tmp_path):
    result = run_cli("evaluate.py", "--model", str(tmp_path / "nope"), "--data-dir", str(EVAL_DATA))
    assert_one_error_line(result, f"--model {tmp_path / 'nope'}", "huggingface-cli download")
    (tmp_path / "no_config").mkdir()
    result = run_cli("evaluate.py", "--model", str(tmp_path / "no_config"), "--data-dir", str(EVAL_DATA))
    assert_one_error_line(result, f"{tmp_path / 'no_config' / 'config.json'}")
    result = run_cli("evaluate.py", "--model", str(model_dir), "--data-dir", str(tmp_path / "mirror"),
                     "--tasks", "piqa,wikitext2")
    assert_one_error_line(result, f"{tmp_path / 'mirror' / 'piqa' / 'validation.jsonl'}",
                          "launch/prepare_eval_data.py --data-dir")


def test_eval_watch_bad_input(tmp_path):
    result = run_cli("eval_watch.py", "--run", str(tmp_path / "no_run"), "--once")
    assert_one_error_line(result, f"{tmp_path / 'no_run'}: no such run directory")
    run = tmp_path / "run"
    run.mkdir()
    result = run_cli("eval_watch.py", "--run", str(run), "--once", f"eval.data_dir={EVAL_DATA}",
                     "eval.tasks=[nosuchtask]")
    assert_one_error_line(result, "unknown task(s) nosuchtask", "known: boolq")
    result = run_cli("eval_watch.py", "--run", str(run), "--once", f"eval.data_dir={tmp_path / 'mirror'}",
                     "eval.tasks=[piqa]")
    assert_one_error_line(result, f"{tmp_path / 'mirror' / 'piqa' / 'validation.jsonl'}")
    result = run_cli("eval_watch.py", "--run", str(run), "--once", "model.x=1")
    assert_one_error_line(result, "override 'model.x=1'")
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written into the run


@pytest.mark.parametrize("tasks, fragment", [
    ("eval.tasks=[piqa,arc_easy,piqa]", "eval.tasks: piqa given more than once"),
    ("eval.tasks=[]", "nothing to evaluate"),
])
def test_eval_watch_refuses_a_repeated_task_or_nothing_to_evaluate(tmp_path, tasks, fragment):
    run = tmp_path / "run"
    run.mkdir()
    result = run_cli("eval_watch.py", "--run", str(run), "--once", f"eval.data_dir={EVAL_DATA}", tasks)
    assert_one_error_line(result, fragment)
    assert sorted(p.name for p in run.iterdir()) == []


def test_a_repeated_inline_evaluation_task_stops_the_training_job_before_any_step(tmp_path, train_shards_64,
                                                                                   tiny_init_model):
    """The trainer's inline evaluation checks eval.tasks as evaluate.py and the watcher do."""
    run_dir = tmp_path / "run"
    args = overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=2", "eval.mode=inline",
                     "eval.every_steps=1", f"eval.data_dir={EVAL_DATA}", "eval.limit=4",
                     "eval.tasks=[piqa,arc_easy,piqa]")
    result = warm_start.run([CPT, "--config", RECIPE, *args], timeout=240,
                            env=subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "eval.tasks: piqa given more than once" in errors[0], errors[0]
    assert not (run_dir / "results.jsonl").exists()
    assert not (run_dir / "train_log.jsonl").exists() or not (run_dir / "train_log.jsonl").read_text()
