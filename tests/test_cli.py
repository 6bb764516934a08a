"""The command lines are generated from the config dataclasses: --help lists every key, --print-config says where
each value came from, the dataclass-built flags keep their names and defaults, and every entry point turns bad
input into one `error:` line and exit 2. In-process `main(argv)` calls where possible (no Python start-up each)."""
from __future__ import annotations

import dataclasses
import runpy
import sys

import pytest
import yaml

from shortened import cli
from shortened.config import (
    EvalConfig,
    LoraTrainConfig,
    MergeConfig,
    PrepareConfig,
    PruneConfig,
    RunConfig,
    config_keys,
    load_config,
    to_dict,
    yaml_value,
)
from shortened.train.cli import cpt_main, cpt_parser

import warm_start
from conftest import ROOT, launcher, subprocess_env

RECIPE = ROOT / "configs" / "cpt" / "tiny-cpu.yaml"


def assert_one_error_line(code: int | None, stderr: str, fragment: str) -> None:
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and stderr.endswith("\n"), stderr
    assert "Traceback" not in stderr and fragment in stderr, stderr


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_dataclass_field_has_help():
    for cls in (RunConfig, PruneConfig, LoraTrainConfig, PrepareConfig, MergeConfig):
        missing = [doc.key for doc in config_keys(cls) if not doc.help]
        assert not missing, f"{cls.__name__}: no metadata['help'] for {missing}"


def test_cpt_help_lists_every_key_with_type_default_and_help():
    text = flat(cpt_parser().format_help())
    keys = list(config_keys(RunConfig))
    assert len(keys) > 50
    for doc in keys:
        assert f"{doc.key} ({doc.type}, default: {yaml_value(doc.default)})" in text, doc.key
        assert flat(doc.help) in text, doc.key


def test_print_config_marks_default_file_and_override(capsys):
    assert cpt_main(["--config", str(RECIPE), "--print-config", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()}
    assert lines["max_steps"].endswith("# override") and ": 3 " in lines["max_steps"]
    assert lines["micro_batch_size"].endswith("# file")  # tiny-cpu.yaml sets it
    assert lines["nan_policy"].endswith("# default") and ": stop " in lines["nan_policy"]
    resolved = load_config(RunConfig, RECIPE, ["train.max_steps=3"])
    assert yaml.safe_load(out) == to_dict(resolved)  # the printout is a loadable config


def test_print_config_of_a_bad_override_is_one_error_line(capsys):
    code = cpt_main(["--config", str(RECIPE), "--print-config", "train.max_stepz=3"])
    assert_one_error_line(code, capsys.readouterr().err, "unknown key 'train.max_stepz'")


@pytest.mark.parametrize("override, fragment", [
    ("distill.temperature=inf", "distill.temperature: inf must be finite and positive"),
    ("distill.kd_weight=nan", "distill.kd_weight: nan must be finite and >= 0"),
    ("optim.lr=inf", "optim.lr: inf must be finite and positive"),
])
def test_a_non_finite_float_setting_is_refused(override, fragment, capsys):
    """temperature=inf and optim.lr=inf used to pass (inf > 0) and the first step's loss was NaN."""
    code = cpt_main(["--config", str(RECIPE), "--print-config", "distill.teacher=some/model", override])
    assert_one_error_line(code, capsys.readouterr().err, fragment)


def parse_defaults(cls: type) -> dict:
    parser = cli.ArgumentParser()
    cli.add_dataclass_arguments(parser, cls)
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def test_dataclass_flags_keep_their_names_and_defaults():
    prune = parse_defaults(PruneConfig)
    assert prune["criterion"].option_strings == ["--criterion"] and prune["criterion"].default == "ppl"
    assert prune["criterion"].choices == ["ppl", "taylor", "magnitude", "bi", "angular"]
    assert prune["keep_blocks"].option_strings == ["--keep-blocks"] and prune["keep_blocks"].default is None
    assert prune["protect_first"].default == 4 and prune["calib_samples"].default == 10
    assert prune["model"].required and prune["calib"].required and not prune["remove"].required
    lora = parse_defaults(LoraTrainConfig)
    assert lora["grad_accum"].option_strings == ["--grad-accum"] and lora["grad_accum"].default == 16
    assert lora["train_on_inputs"].option_strings == ["--train-on-inputs"] and lora["train_on_inputs"].default is False
    assert lora["target_modules"].nargs == "+" and "down_proj" in lora["target_modules"].default
    prep = parse_defaults(PrepareConfig)
    assert prep["progress"].option_strings == ["--no-progress"] and prep["progress"].default is True
    assert prep["shard_tokens"].default == 1 << 27 and prep["input"].required
    assert prep["hf_data_files"].nargs == "*"


def test_parsed_flags_build_the_config():
    prep = launcher("data_prep/slimpajama.py").parse_args(
        ["--input", "in", "--tokenizer", "t", "--output", "o", "--sources", "RedPajamaC4,Github", "--no-progress"])
    assert prep == PrepareConfig(input="in", tokenizer="t", output="o", sources=["RedPajamaC4", "Github"],
                                 progress=False)
    config, overwrite = launcher("launch/prune.py").parse_args(
        ["--model", "m", "--out", "o", "--calib", "c", "--ratio", "0.2", "--no-protect"])
    assert (config.ratio, config.remove, config.protect_first, config.protect_last, overwrite) == (0.2, None, 0, 0,
                                                                                                   False)
    lora = launcher("launch/lora.py").parse_args(["--model", "m", "--data", "d", "--out", "o", "--lr", "3e-4"])
    assert lora == dataclasses.replace(LoraTrainConfig(model="m", data="d", out="o"), lr=3e-4)


def test_evaluate_flags_come_from_eval_config_and_override_its_config_file(tmp_path, capsys):
    settings = tmp_path / "eval.yaml"
    settings.write_text("tasks: [piqa, ptb]\nlimit: 5\nbatch_size: 4\n")
    evaluate = launcher("launch/evaluate.py")
    _, config = evaluate.parse_args(["--model", "m", "--config", str(settings), "--tasks", "boolq,wikitext2",
                                     "--batch-size", "2"])
    assert (config.tasks, config.limit, config.batch_size) == (["boolq", "wikitext2"], 5, 2)
    assert evaluate.parse_args(["--model", "m"])[1] == EvalConfig()
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    help_text = flat(capsys.readouterr().out)
    for f in dataclasses.fields(EvalConfig):
        if f.name in evaluate.EVAL_FLAGS:
            assert f"--{f.name.replace('_', '-')}" in help_text and flat(f.metadata["help"]) in help_text, f.name


def test_eval_watch_help_lists_every_eval_key(capsys):
    with pytest.raises(SystemExit):
        launcher("launch/eval_watch.py").main(["--help"])
    help_text = flat(capsys.readouterr().out)
    for doc in config_keys(EvalConfig):
        assert f"{doc.key} ({doc.type}, default: {yaml_value(doc.default)})" in help_text, doc.key


@pytest.mark.parametrize("script, argv, fragment", [
    ("launch/prune.py", ["--model", "m", "--out", "o", "--calib", "c", "--remove", "0"],
     "prune.remove: --remove 0: must be >= 1"),
    ("launch/prune.py", ["--model", "m", "--out", "o", "--calib", "c"],
     "prune.remove: give exactly one of --remove, --ratio, --keep-blocks"),
    ("launch/evaluate.py", ["--model", "m", "--limit", "many"], "argument --limit: invalid int value: 'many'"),
    ("launch/eval_watch.py", ["--once"], "the following arguments are required: --run"),
    ("launch/prepare_eval_data.py", ["--data-dir", "d", "--tasks", "nosuchtask"], "unknown task(s) nosuchtask"),
    ("launch/plot_curves.py", ["no-such-run"], "no-such-run/results.jsonl: no results to plot"),
    ("launch/tiny_model.py", ["--out", "x", "--layers", "two"], "argument --layers: invalid int value"),
    ("launch/lora.py", ["--model", "m", "--data", "d", "--out", "o", "--r", "0"], "lora.r: rank and alpha"),
    ("data_prep/slimpajama.py", ["--input", "i", "--tokenizer", "t", "--output", "o", "--seq-len", "1"],
     "--seq-len must be at least 2, got 1"),
])
def test_each_entry_point_reports_bad_input_in_one_line(script, argv, fragment, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert_one_error_line(exited.value.code, capsys.readouterr().err, fragment)


@pytest.mark.parametrize("script, argv, fragment", [
    ("launch/export_hf.py", ["--checkpoint", "nowhere", "--out", "x", "--dtype", "fp8"],
     "argument --dtype: invalid choice: 'fp8'"),
    ("launch/cpt.py", ["--print-config"], "the following arguments are required: --config"),
])
def test_launcher_processes_exit_2_with_one_error_line(script, argv, fragment, tmp_path):
    result = warm_start.run([ROOT / script, *argv], cwd=tmp_path, env=subprocess_env(), timeout=120)
    assert_one_error_line(result.returncode, result.stderr, fragment)


def test_one_line_unwraps_a_dataloader_worker_error():
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: shard_0003.bin: CRC mismatch")
    assert cli.one_line(wrapped) == "shard_0003.bin: CRC mismatch"
    assert cli.one_line(ValueError("a: not valid YAML:\n  line 2\n  column 3")) == "a: not valid YAML: line 2 column 3"
