"""The task table (`tasks.yaml`): which tasks exist, how each is scored, which metric is reported, where rows live."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from shortened.config import ConfigError, EvalConfig
from shortened.eval.rows import SCHEMAS

DEFAULT_TASK_FILE = Path(__file__).with_name("tasks.yaml")
PERPLEXITY_METRIC = "ppl"


@dataclass(frozen=True)
class HubSource:
    """Arguments of `datasets.load_dataset` that give the rows the mirror stores."""

    path: str
    name: str | None = None
    split: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class LmEvalTask:
    name: str
    lm_eval_task: Path  # the task YAML lm-eval ships (or the user's own), used unchanged via `include:`
    metric: str
    in_mean: bool
    splits: dict[str, str]  # split name -> file relative to the mirror directory
    hub: HubSource | None
    rows: str | None = None  # the row schema of shortened/eval/rows.py its files are checked against

    kind = "lm_eval"


@dataclass(frozen=True)
class PerplexityTask:
    name: str
    file: str  # relative to the mirror directory
    field: str
    join: str
    hub: HubSource | None

    kind = "perplexity"
    metric = PERPLEXITY_METRIC


TaskSpec = Union[LmEvalTask, PerplexityTask]


def load_task_table(path: str | Path | None = None) -> dict[str, TaskSpec]:
    """Parse a task table; `None` or "" gives the shipped `tasks.yaml`. Errors name the file and the key."""
    path = Path(path) if path else DEFAULT_TASK_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read task table ({err.strerror}); "
                          "set eval.task_file to a readable file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: task table is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'tasks:' mapping of task name -> entry")
    return {name: _parse_entry(path, name, entry) for name, entry in raw["tasks"].items()}


def configured_tasks(config: EvalConfig, validation_path: str | Path = "") -> list[TaskSpec]:
    """The task table's entries for `config.tasks`, as every evaluator (launch/evaluate.py, the inline hook, the
    watcher) checks them at start-up: ConfigError for an unknown or repeated name, and for an evaluation with
    nothing to evaluate (no task and no validation shards), which would record nothing and look like success."""
    table = load_task_table(config.task_file)
    if not config.tasks and not validation_path:
        raise ConfigError(f"eval.tasks: empty, and no validation shards are given: nothing to evaluate; name tasks "
                          f"(known: {', '.join(table)}) or give held-out token shards (data.validation_path, "
                          "--validation-shards)")
    return select_tasks(table, config.tasks)


def select_tasks(table: dict[str, TaskSpec], names: Sequence[str], source: str = "eval.tasks") -> list[TaskSpec]:
    repeated = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if repeated:  # a task run twice would also count twice in the zero-shot mean
        raise ConfigError(f"{source}: {', '.join(repeated)} given more than once; each task is scored once and "
                          "counts once in the zero-shot mean, so give each name once")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(
            f"{source}: unknown task(s) {', '.join(unknown)}; known: {', '.join(table)} "
            "(add an entry to a copy of shortened/eval/tasks.yaml and set eval.task_file)"
        )
    return [table[n] for n in names]


def _parse_entry(path: Path, name: str, entry: Any) -> TaskSpec:
    where = f"{path}: tasks.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    kind = entry.get("kind")
    hub = _parse_hub(where, entry.get("hub"))
    if kind == "lm_eval":
        _check_keys(where, entry, {"kind", "lm_eval_task", "metric", "in_mean", "splits", "hub", "rows"})
        splits = _required(where, entry, "splits", dict)
        if not splits or not all(isinstance(k, str) and isinstance(v, str) for k, v in splits.items()):
            raise ConfigError(f"{where}.splits: expected a mapping of split name -> file under the mirror")
        return LmEvalTask(
            name=name,
            lm_eval_task=_resolve_lm_eval_yaml(where, _required(where, entry, "lm_eval_task", str)),
            metric=_required(where, entry, "metric", str),
            in_mean=bool(entry.get("in_mean", False)),
            splits=dict(splits),
            hub=hub,
            rows=_parse_rows(where, entry.get("rows")),
        )
    if kind == "perplexity":
        _check_keys(where, entry, {"kind", "file", "field", "join", "hub"})
        return PerplexityTask(
            name=name,
            file=_required(where, entry, "file", str),
            field=_required(where, entry, "field", str),
            join=str(entry.get("join", "\n\n")),
            hub=hub,
        )
    raise ConfigError(f"{where}.kind: {kind!r} is not one of 'lm_eval', 'perplexity'")


def _resolve_lm_eval_yaml(where: str, value: str) -> Path:
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = lm_eval_tasks_dir() / value
    if not candidate.is_file():
        raise ConfigError(
            f"{where}.lm_eval_task: {candidate} does not exist; give a path under lm_eval/tasks/ or an absolute path"
        )
    return candidate


def lm_eval_tasks_dir() -> Path:
    """The installed lm-eval's task definitions, found without importing lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("lm-eval is not installed; install the pinned lm-eval==0.4.13 (see setup.py)")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _parse_rows(where: str, value: Any) -> str | None:
    if value is not None and value not in SCHEMAS:
        raise ConfigError(f"{where}.rows: {value!r} is not a row schema; known: {', '.join(SCHEMAS)} "
                          "(or leave it out: then only 'one JSON object a line' is checked)")
    return value


def _parse_hub(where: str, raw: Any) -> HubSource | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise ConfigError(f"{where}.hub: expected a mapping with at least 'path' (a datasets hub id)")
    _check_keys(f"{where}.hub", raw, {"path", "name", "split", "revision"})
    return HubSource(**raw)


def _required(where: str, entry: dict, key: str, kind: type) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: required, expected a {kind.__name__}, got {value!r}")
    return value


def _check_keys(where: str, entry: dict, known: set[str]) -> None:
    extra = set(entry) - known
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))} (known: {', '.join(sorted(known))})")
