"""The offline mirror of every evaluation dataset, and how lm-eval's own task definitions are pointed at it.

Layout (the one of `../shared/data/eval/`): `<mirror>/<task>/<split>.jsonl`, one row a line, with the field names
and types of the Hugging Face dataset that lm-eval's task YAML reads. `prepare` writes it from the hub where a
network exists; evaluation only ever reads it. lm-eval runs its unmodified task YAML through a generated override
that `include:`s it and swaps the hub dataset for the mirror's files (`dataset_path: json`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml
from tqdm import tqdm

from shortened.config import ConfigError
from shortened.eval.tasks import HubSource, LmEvalTask, PerplexityTask, TaskSpec
from shortened.fsutil import atomic_write_json, atomic_write_text

PREPARE_COMMAND = "python launch/prepare_eval_data.py --data-dir {data_dir}"
MIRROR_MANIFEST = "mirror.json"
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


class MirrorError(FileNotFoundError):
    """The mirror lacks a file a task needs; the message names the file and the command that writes it."""


def mirror_files(spec: TaskSpec) -> list[str]:
    return list(spec.splits.values()) if isinstance(spec, LmEvalTask) else [spec.file]


def check_mirror(data_dir: str | Path, specs: Sequence[TaskSpec]) -> None:
    """Raise `MirrorError` naming every missing file and the command that writes the mirror."""
    if not str(data_dir):
        raise MirrorError(f"eval.data_dir is not set: point it at the evaluation mirror, or write one with "
                          f"`{PREPARE_COMMAND.format(data_dir='DIR')}`")
    root = Path(data_dir)
    missing = [str(root / f) for spec in specs for f in mirror_files(spec) if not (root / f).is_file()]
    if missing:
        raise MirrorError(
            f"evaluation mirror {root} lacks {', '.join(missing)}; write it (needs a network) with "
            f"`{PREPARE_COMMAND.format(data_dir=root)} --tasks {','.join(s.name for s in specs)}`"
        )


def lm_eval_task_name(spec: LmEvalTask) -> str:
    return f"mirror_{spec.name}"


def write_lm_eval_overrides(specs: Sequence[LmEvalTask], data_dir: str | Path, out_dir: str | Path,
                            data_files: dict[str, dict[str, Path]] | None = None) -> dict[str, str]:
    """Write one override YAML per task into `out_dir` (an lm-eval include path); return name -> lm-eval task name.

    `data_files`: task -> split -> the file lm-eval reads (default: the mirror's own files).
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own include resolution, for its split names

    root = Path(data_dir).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for spec in specs:
        base = load_yaml(spec.lm_eval_task, resolve_func=False)
        if base.get("output_type") == "loglikelihood_rolling":
            # HFLM puts <s> before the rolling windows itself and, with add_bos_token (the LLaMA protocol for every
            # other request), once more in front of the text: two <s>. Perplexity is scored by kind: perplexity.
            raise ConfigError(f"task table: tasks.{spec.name}: {spec.lm_eval_task} is a loglikelihood_rolling task, "
                              "which lm-eval would score after two <s>; use kind: perplexity for perplexities")
        override: dict[str, Any] = {
            "include": str(spec.lm_eval_task),
            "task": lm_eval_task_name(spec),
            "tag": [],  # the base's tags would register groups pointing at the mirror copies
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str((data_files or {}).get(spec.name, {}).get(split, root / f))
                                              for split, f in spec.splits.items()}},
        }
        for key in _SPLIT_KEYS:
            if base.get(key) is not None and base[key] not in spec.splits:
                override[key] = None  # a split the mirror does not hold (train, few-shot source) must not be read
        if override.get("validation_split", base.get("validation_split")) is None and \
                override.get("test_split", base.get("test_split")) is None:
            raise ConfigError(
                f"task table: tasks.{spec.name}.splits has {', '.join(spec.splits)} but {spec.lm_eval_task} scores "
                f"validation_split={base.get('validation_split')!r} / test_split={base.get('test_split')!r}"
            )
        (out / f"{spec.name}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
        names[spec.name] = lm_eval_task_name(spec)
    return names


def read_rows(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON row ({err.msg}); "
                                     "write the file again with launch/prepare_eval_data.py") from None
    return rows


# ---------------------------------------------------------------------------------------------- prepare

RowSource = Callable[[HubSource, str], Iterable[dict]]


def hub_rows(hub: HubSource, split: str) -> Iterable[dict]:
    """Rows of one split straight from the Hugging Face hub (needs a network)."""
    import datasets

    return datasets.load_dataset(hub.path, hub.name, split=split, revision=hub.revision)


def prepare(data_dir: str | Path, specs: Sequence[TaskSpec], source: RowSource = hub_rows,
            limit: int = 0) -> dict[str, int]:
    """Write the mirror files of `specs` under `data_dir`; return file -> rows. A file appears whole or not at all."""
    root = Path(data_dir)
    written: dict[str, int] = {}
    jobs = [(spec, split, rel) for spec in specs for split, rel in _splits(spec)]
    for spec, split, rel in tqdm(jobs, desc="prepare eval mirror", unit="file"):
        if spec.hub is None:
            raise ConfigError(f"task table: tasks.{spec.name} has no 'hub:' source, so prepare cannot fetch it")
        rows = source(spec.hub, split)
        written[rel] = _write_jsonl(root / rel, rows, limit)
    manifest = root / MIRROR_MANIFEST
    record = json.loads(manifest.read_text()) if manifest.is_file() else {"version": 1, "files": {}}
    for spec, split, rel in jobs:
        record["files"][rel] = {"task": spec.name, "rows": written[rel], "hub": spec.hub.__dict__, "split": split}
    atomic_write_json(record, manifest)
    return written


def _splits(spec: TaskSpec) -> list[tuple[str, str]]:
    if isinstance(spec, PerplexityTask):
        if spec.hub is None or spec.hub.split is None:
            raise ConfigError(f"task table: tasks.{spec.name}.hub.split is required for a perplexity task")
        return [(spec.hub.split, spec.file)]
    return list(spec.splits.items())


def _write_jsonl(path: Path, rows: Iterable[dict], limit: int) -> int:
    lines = []
    for row in rows:
        lines.append(json.dumps(dict(row), ensure_ascii=False))
        if limit and len(lines) == limit:
            break
    atomic_write_text("".join(line + "\n" for line in lines), path)
    return len(lines)
