"""Row checks of the mirror's files, before lm-eval reads them: a malformed row is reported and never scored.

lm-eval scores whatever its YAML's Jinja makes of a row: a PIQA `label: -1` indexes the last choice and is scored
as if it were a real answer, a missing field fails deep in `datasets` or Jinja without naming the row, and a line
that is not JSON stops the whole file with a `DatasetGenerationError` naming neither file nor line. So every line
of a task's files is checked here against the fields and label range its lm-eval task reads (the task table's
`rows:` key names the schema). Malformed rows are left out of a copy of the file that lm-eval reads instead, each
one reported as `file:line: field: reason`; a file left without a valid row fails the task.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shortened.fsutil import atomic_write_text

# A schema: None for a good row, else (field, reason).
Check = Callable[[dict], "tuple[str, str] | None"]
MAX_REPORTED_ROWS = 10  # malformed rows named in the log and in a result row; the count covers all of them


class MalformedMirrorError(ValueError):
    """A mirror file holds no row that can be scored; the message names the file and its first problems."""


@dataclass(frozen=True)
class RowProblem:
    path: Path
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class CheckedFile:
    path: Path
    valid_lines: list[str]  # the valid rows' text exactly as in the file, in file order
    problems: list[RowProblem]


def check_file(path: str | Path, schema: str | None) -> CheckedFile:
    """Every non-blank line of `path` checked: it must be a JSON object, and match `schema` when one is named."""
    path = Path(path)
    check = SCHEMAS[schema] if schema else None
    valid, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            problem = _problem(line, check)
            if problem:
                problems.append(RowProblem(path, number, *problem))
            else:
                valid.append(line if line.endswith("\n") else line + "\n")
    if not valid:
        shown = "; ".join(str(p) for p in problems[:3]) or "the file is empty"
        raise MalformedMirrorError(f"{path}: no row can be scored ({shown}); fix the file or write it again with "
                                   "launch/prepare_eval_data.py")
    return CheckedFile(path, valid, problems)


def scorable_files(files: dict[str, Path], schema: str | None, out_dir: str | Path) -> tuple[dict[str, Path],
                                                                                            list[RowProblem]]:
    """The files lm-eval should read per split, and the rows left out of them.

    A file without problems is read in place (so `datasets` keeps its cache of it); a file with problems is
    replaced by a copy of its valid rows under `out_dir`.
    """
    readable, problems = {}, []
    for split, path in files.items():
        checked = check_file(path, schema)
        problems += checked.problems
        readable[split] = path
        if checked.problems:
            readable[split] = Path(out_dir) / "valid_rows" / f"{split}.jsonl"
            atomic_write_text("".join(checked.valid_lines), readable[split])
    return readable, problems


def _problem(line: str, check: Check | None) -> tuple[str, str] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return "-", f"not a JSON row ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return "-", f"expected a JSON object, got {type(row).__name__}"
    return check(row) if check else None


# ---------------------------------------------------------------------------------------------- schemas
# Each lists what the task's lm-eval YAML (lm_eval/tasks/...) reads from a row, in the mirror's field layout.


def _strings(row: dict, *fields: str) -> tuple[str, str] | None:
    for name in fields:
        if name not in row:
            return name, "missing"
        if not isinstance(row[name], str):
            return name, f"expected a string, got {_show(row[name])}"
    return None


def _index(row: dict, name: str, allowed: range) -> tuple[str, str] | None:
    """An int label in `allowed`; lm-eval would index the choices with anything else (-1: the last one)."""
    if name not in row:
        return name, "missing"
    value = row[name]
    if not isinstance(value, int) or value not in allowed:
        return name, f"{_show(value)} is not one of {', '.join(map(str, allowed))}"
    return None


def _lettered_choices(row: dict, answer: object) -> tuple[str, str] | None:
    """ARC / OpenBookQA: `choices` {text: [...], label: [...]} of equal length, `answerKey` one of the labels."""
    choices = row.get("choices")
    if not isinstance(choices, dict):
        return "choices", "missing" if choices is None else f"expected an object, got {_show(choices)}"
    texts, labels = choices.get("text"), choices.get("label")
    for name, value in (("choices.text", texts), ("choices.label", labels)):
        if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value)):
            return name, f"expected a list of at least 2 strings, got {_show(value)}"
    assert isinstance(texts, list) and isinstance(labels, list)  # checked just above
    if len(texts) != len(labels):
        return "choices", f"{len(texts)} texts but {len(labels)} labels"
    if "answerKey" not in row:
        return "answerKey", "missing"
    if not isinstance(row["answerKey"], str) or answer not in labels:
        return "answerKey", f"{_show(row['answerKey'])} is not one of the choice labels {', '.join(labels)}"
    return None


def _boolq(row: dict) -> tuple[str, str] | None:
    return _strings(row, "question", "passage") or _index(row, "label", range(2))  # True/False are 1/0 too


def _piqa(row: dict) -> tuple[str, str] | None:
    return _strings(row, "goal", "sol1", "sol2") or _index(row, "label", range(2))


def _hellaswag(row: dict) -> tuple[str, str] | None:
    problem = _strings(row, "activity_label", "ctx_a", "ctx_b")
    if problem:
        return problem
    endings = row.get("endings")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        return "endings", f"expected 4 strings, got {_show(endings)}"
    label = row.get("label")
    if "label" not in row:
        return "label", "missing"
    # The hub stores the label as a string ("3"); lm-eval takes int(label).
    if not (isinstance(label, (int, str)) and str(label) in {"0", "1", "2", "3"}):
        return "label", f"{_show(label)} is not one of 0, 1, 2, 3"
    return None


def _winogrande(row: dict) -> tuple[str, str] | None:
    problem = _strings(row, "sentence", "option1", "option2")
    if problem:
        return problem
    if "_" not in row["sentence"]:
        return "sentence", "has no '_' where the options go"
    if row.get("answer") not in ("1", "2"):
        return "answer", "missing" if "answer" not in row else f"{_show(row['answer'])} is not '1' or '2'"
    return None


def _arc(row: dict) -> tuple[str, str] | None:
    return _strings(row, "question") or _lettered_choices(row, row.get("answerKey"))


def _openbookqa(row: dict) -> tuple[str, str] | None:
    answer = row.get("answerKey")
    return _strings(row, "question_stem") or _lettered_choices(
        row, answer.lstrip() if isinstance(answer, str) else answer)  # lm-eval strips the key's leading space


def _lambada(row: dict) -> tuple[str, str] | None:
    problem = _strings(row, "text")
    if problem:
        return problem
    if " " not in row["text"].strip():
        return "text", "needs a context and a last word separated by a space"
    return None


SCHEMAS: dict[str, Check] = {"boolq": _boolq, "piqa": _piqa, "hellaswag": _hellaswag, "winogrande": _winogrande,
                             "arc": _arc, "openbookqa": _openbookqa, "lambada": _lambada}


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
