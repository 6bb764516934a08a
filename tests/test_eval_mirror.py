"""The offline mirror: prepare writes the layout lm-eval reads; missing files and bad task tables are clear errors."""
from __future__ import annotations

import json

import pytest
import yaml

from shortened.config import ConfigError
from shortened.eval.mirror import MirrorError, check_mirror, prepare, read_rows, write_lm_eval_overrides
from shortened.eval.tasks import load_task_table, select_tasks

from conftest import EVAL_DATA


def _local_source(hub, split):
    """Rows through the same `datasets` reader prepare uses on the hub, from the shared copy (no network here)."""
    import datasets

    folder = {"aps/super_glue": "boolq", "allenai/ai2_arc": "arc_easy", "Salesforce/wikitext": "wikitext2"}[hub.path]
    return datasets.load_dataset("json", data_files={split: str(EVAL_DATA / folder / f"{split}.jsonl")}, split=split)


def test_prepare_writes_the_shared_layout(tmp_path):
    specs = select_tasks(load_task_table(), ["boolq", "arc_easy", "wikitext2"])
    written = prepare(tmp_path, specs, source=_local_source)
    assert written == {"boolq/validation.jsonl": 200, "arc_easy/test.jsonl": 200, "arc_easy/validation.jsonl": 200,
                       "wikitext2/test.jsonl": 4358}
    for rel in written:
        assert read_rows(tmp_path / rel) == read_rows(EVAL_DATA / rel), rel
    manifest = json.loads((tmp_path / "mirror.json").read_text())
    assert manifest["files"]["boolq/validation.jsonl"]["hub"]["path"] == "aps/super_glue"
    check_mirror(tmp_path, specs)  # complete now
    assert prepare(tmp_path / "small", specs[:1], source=_local_source, limit=5) == {"boolq/validation.jsonl": 5}


def test_missing_mirror_names_the_command(tmp_path):
    specs = select_tasks(load_task_table(), ["piqa", "ptb"])
    with pytest.raises(MirrorError) as err:
        check_mirror(tmp_path, specs)
    assert "piqa/validation.jsonl" in str(err.value) and "ptb/validation.jsonl" in str(err.value)
    assert f"launch/prepare_eval_data.py --data-dir {tmp_path} --tasks piqa,ptb" in str(err.value)


def test_overrides_include_lm_evals_yaml_and_null_the_splits_the_mirror_lacks(tmp_path):
    specs = select_tasks(load_task_table(), ["openbookqa", "boolq"])
    names = write_lm_eval_overrides(specs, EVAL_DATA, tmp_path)
    assert names == {"openbookqa": "mirror_openbookqa", "boolq": "mirror_boolq"}
    obqa = yaml.safe_load((tmp_path / "openbookqa.yaml").read_text())
    assert obqa["include"].endswith("lm_eval/tasks/openbookqa/openbookqa.yaml")
    assert obqa["validation_split"] is None and obqa["training_split"] is None and "test_split" not in obqa
    assert obqa["dataset_kwargs"] == {"data_files": {"test": str((EVAL_DATA / "openbookqa/test.jsonl").resolve())}}
    boolq = yaml.safe_load((tmp_path / "boolq.yaml").read_text())
    assert "validation_split" not in boolq and boolq["training_split"] is None


@pytest.mark.parametrize("entry, message", [
    ({"kind": "lm_eval", "lm_eval_task": "nope/x.yaml", "metric": "acc", "splits": {"test": "a.jsonl"}},
     "tasks.t.lm_eval_task"),
    ({"kind": "lm_eval", "lm_eval_task": "piqa/piqa.yaml", "splits": {"test": "a.jsonl"}}, "tasks.t.metric"),
    ({"kind": "ppl", "file": "x"}, "tasks.t.kind"),
    ({"kind": "perplexity", "file": "x", "field": "text", "colour": 1}, r"unknown key\(s\) colour"),
])
def test_bad_task_table_names_file_and_key(tmp_path, entry, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": {"t": entry}}))
    with pytest.raises(ConfigError, match=message) as err:
        load_task_table(path)
    assert str(path) in str(err.value)


def test_task_whose_splits_lm_eval_never_scores_is_refused(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": {"piqa": {"kind": "lm_eval", "lm_eval_task": "piqa/piqa.yaml",
                                                       "metric": "acc", "splits": {"train": "piqa/train.jsonl"}}}}))
    with pytest.raises(ConfigError, match="scores validation_split='validation'"):
        write_lm_eval_overrides(list(load_task_table(path).values()), EVAL_DATA, tmp_path / "out")


def test_rolling_loglikelihood_tasks_are_refused_for_their_double_bos(tmp_path):
    path = tmp_path / "tasks.yaml"
    entry = {"kind": "lm_eval", "lm_eval_task": "wikitext/wikitext.yaml", "metric": "word_perplexity",
             "splits": {"test": "w.jsonl"}}
    path.write_text(yaml.safe_dump({"tasks": {"wikitext": entry}}))
    with pytest.raises(ConfigError, match="two <s>"):
        write_lm_eval_overrides(list(load_task_table(path).values()), EVAL_DATA, tmp_path / "out")
