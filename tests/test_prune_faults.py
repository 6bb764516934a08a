"""Pruning faults done for real, through launch/prune.py: each bad input is one `error: ...` line and exit 2,
names what and where, and neither the source model nor an existing --out loses a byte."""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from shortened.tokenizer import load_tokenizer

from conftest import ROOT
from prune_fixtures import CALIB, CALIB_LEN, CALIB_SAMPLES, NUM_LAYERS

PRUNE = ROOT / "launch" / "prune.py"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def launch_prune(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """launch/prune.py run as __main__ in this process (the same code path as the command, without a Python
    start-up per case): its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", [str(PRUNE), *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(PRUNE), run_name="__main__")
    return exited.value.code, capsys.readouterr().err


def prune_args(model: Path, out: Path, *extra: str, calib: Path = CALIB) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--calib", str(calib), "--calib-samples", str(CALIB_SAMPLES),
            "--calib-len", str(CALIB_LEN), "--criterion", "magnitude", *extra]


def assert_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and stderr.endswith("\n"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def source(model_dir, tmp_path) -> Path:  # noqa: F811
    """A private copy of the trained test model, so a test that damaged it could not hide behind the cache."""
    return Path(shutil.copytree(model_dir, tmp_path / "source"))


@pytest.mark.parametrize("extra, fragments", [
    (["--remove", "0"], ["prune.remove: --remove 0: must be >= 1"]),
    (["--keep-blocks", "0"], ["prune.keep_blocks: --keep-blocks 0: must be >= 1"]),
    (["--ratio", "0"], ["prune.ratio: --ratio 0.0: must lie strictly between 0 and 1"]),
    (["--remove", "2", "--ratio", "0.1"], ["prune.remove: give exactly one of --remove, --ratio, --keep-blocks"]),
    (["--remove", str(NUM_LAYERS)], [f"--remove {NUM_LAYERS}, but the model has {NUM_LAYERS} blocks: at least one "
                                     "must go and one must stay"]),
    (["--remove", "5", "--protect-first", "1", "--protect-last", "1"],
     ["--remove 5, but only 4 of the model's 6 blocks may be removed: block 0 by --protect-first 1 and block 5 by "
      "--protect-last 1 are protected", "lower the count, or the protection"]),
    (["--remove", "1"],  # the defaults protect 4 + 2 blocks: all 6 of the test model
     ["--remove 1, but only 0 of the model's 6 blocks may be removed: blocks 0-3 by --protect-first 4 and blocks "
      "4-5 by --protect-last 2 are protected"]),
    (["--keep-blocks", "3", "--protect-first", "2", "--protect-last", "2"],
     ["--keep-blocks 3 removes 3 blocks, but only 2 of the model's 6 blocks may be removed: blocks 0-1 by "
      "--protect-first 2 and blocks 4-5 by --protect-last 2 are protected"]),
])
def test_bad_block_counts(extra, fragments, source, tmp_path, monkeypatch, capsys):
    before = snapshot(source)
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, tmp_path / "out", *extra))
    assert_error(code, err, *fragments)
    assert snapshot(source) == before and not (tmp_path / "out").exists()


def test_empty_and_too_short_calibration_files(source, tmp_path, monkeypatch, capsys, tokenizer_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, tmp_path / "out", "--remove", "1",
                                                              "--no-protect", calib=empty))
    assert_error(code, err, f"{empty}: no text", f"{CALIB_SAMPLES} samples of {CALIB_LEN} tokens need")

    documents = ["A short first document.", "And a second one, a little longer than the first."]
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(documents))
    tokenizer = load_tokenizer(tokenizer_model)
    tokens = sum(1 + len(tokenizer.encode(doc)) for doc in documents)  # <s> + the document's ids
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, tmp_path / "out", "--remove", "1",
                                                              "--no-protect", calib=short))
    assert_error(code, err, f"{short}: {tokens} tokens in 2 documents, only 0 of which have >= {CALIB_LEN} tokens",
                 f"{CALIB_SAMPLES} documents of at least {CALIB_LEN} tokens ({CALIB_SAMPLES * CALIB_LEN} tokens)",
                 "--calib-samples")
    assert not (tmp_path / "out").exists()


def test_model_directory_without_config_json(source, tmp_path, monkeypatch, capsys):
    (source / "config.json").unlink()
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, tmp_path / "out", "--remove", "1",
                                                              "--no-protect"))
    assert_error(code, err, f"--model {source}: no such Hugging Face model directory ({source / 'config.json'} is "
                            "missing)")
    code, err = launch_prune(monkeypatch, capsys, *prune_args(tmp_path / "nowhere", tmp_path / "out",
                                                              "--remove", "1", "--no-protect"))
    assert_error(code, err, f"--model {tmp_path / 'nowhere'}: not a model directory")


def test_out_never_overwrites_the_source_or_a_non_empty_directory(source, tmp_path, monkeypatch, capsys):
    before = snapshot(source)
    for extra in ([], ["--overwrite"]):
        code, err = launch_prune(monkeypatch, capsys, *prune_args(source, source, "--remove", "1", "--no-protect",
                                                                  *extra))
        assert_error(code, err, f"--out {source} is or contains the source model")
        code, err = launch_prune(monkeypatch, capsys, *prune_args(source, tmp_path, "--remove", "1", "--no-protect",
                                                                  *extra))  # tmp_path holds the source
        assert_error(code, err, f"--out {tmp_path} is or contains the source model")
    assert snapshot(source) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, other, "--remove", "1", "--no-protect"))
    assert_error(code, err, f"--out {other} is not empty (todo.txt)", "--overwrite")
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, other, "--remove", "1", "--no-protect",
                                                              "--overwrite"))
    assert_error(code, err, f"--out {other} holds todo.txt but no config.json")
    assert snapshot(other) == {"todo.txt": b"keep me"} and snapshot(source) == before


def test_overwrite_replaces_a_previous_output_whole(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pruned"
    code, _ = launch_prune(monkeypatch, capsys, *prune_args(source, out, "--remove", "1", "--no-protect"))
    assert code == 0
    first = snapshot(out)
    (out / "model.safetensors.index.json").write_text("{}")  # a stale file a sharded save would have left
    code, err = launch_prune(monkeypatch, capsys, *prune_args(source, out, "--remove", "2", "--no-protect"))
    assert_error(code, err, f"--out {out} is not empty", "--overwrite")
    assert (out / "model.safetensors.index.json").is_file() and snapshot(out)["model.safetensors"] == \
        first["model.safetensors"]

    code, _ = launch_prune(monkeypatch, capsys, *prune_args(source, out, "--remove", "2", "--no-protect",
                                                            "--overwrite"))
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["num_blocks_after"] == NUM_LAYERS - 2
    assert not (out / "model.safetensors.index.json").exists()  # replaced whole: nothing of the old model stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "source"]  # no staging leftovers


def test_lora_bad_input_is_one_error_line(source, tmp_path, monkeypatch, capsys):
    lora = ROOT / "launch" / "lora.py"
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))  # no "output"
    for args, fragment in ((["--model", str(tmp_path / "nowhere")], f"--model {tmp_path / 'nowhere'}: not a model"),
                           (["--model", str(source)], f"{data}: record 0 has no string 'output'"),
                           (["--model", str(source), "--lr", "fast"], "argument --lr: invalid float value")):
        monkeypatch.setattr(sys, "argv", [str(lora), *args, "--data", str(data), "--out", str(tmp_path / "run")])
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(lora), run_name="__main__")
        assert_error(exited.value.code, capsys.readouterr().err, fragment)
    assert not (tmp_path / "run").exists()
