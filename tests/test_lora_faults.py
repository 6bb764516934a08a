"""LoRA retraining's faults done through its command line (launch/lora.py, forked warm): examples that --cutoff-len
cuts to no loss tokens are counted, and none left to learn from is an error (Alpaca, Vicuna's template and a Llama-3
chat template alike); a resume refuses a data file whose content changed since its checkpoints; a non-finite float
flag is refused under its own key."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_instruct import LLAMA3_CHAT_TEMPLATE
from test_llama3 import BOS, EOS, TRAIN_DOCS, VOCAB, train_llama3_like_tokenizer
from tokenizers import Tokenizer as ReferenceTokenizer

from shortened.modeling import build_tiny_llama, save_with_tokenizer, tiny_llama3_config
from shortened.prune.lora_checkpoint import complete_checkpoints

import warm_start
from conftest import EVAL_DATA, ROOT, TOKENIZER_MODEL, read_original_documents, subprocess_env

LORA = ROOT / "launch" / "lora.py"
CUTOFF = 96  # the short records' prompts fit with room for their replies; the long ones' do not (> 200 tokens)


@pytest.fixture(scope="module")
def vicuna_model(tmp_path_factory) -> Path:
    """A tiny Llama with the LLaMA SentencePiece tokenizer: Alpaca's template, or Vicuna's for conversations."""
    return save_with_tokenizer(build_tiny_llama(seed=3, num_layers=2), tmp_path_factory.mktemp("vicuna") / "model",
                               TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory, slimpajama_sample) -> Path:
    """A tiny Llama-3-layout model whose tokenizer.json comes with Llama-3-Instruct's chat template."""
    work = tmp_path_factory.mktemp("llama3")
    texts = [r["text"] for r in read_original_documents(slimpajama_sample / "train")[:TRAIN_DOCS]]
    tokenizer_dir = train_llama3_like_tokenizer(texts, work / "tokenizer")
    reference = ReferenceTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config = tiny_llama3_config(VOCAB, reference.token_to_id(BOS), reference.token_to_id(EOS), num_layers=2)
    model_dir = save_with_tokenizer(build_tiny_llama(seed=0, config=config), work / "model",
                                    tokenizer_dir / "tokenizer.json")
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config,
                                                                  "chat_template": LLAMA3_CHAT_TEMPLATE}))
    return model_dir


def rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL_DATA / task / "validation.jsonl").read_text().splitlines()]


def short_pairs(count: int, skip: int = 0) -> list[tuple[str, str]]:
    """PIQA goals and their right solutions, both under 120 characters: prompt and reply fit in CUTOFF tokens."""
    pairs = [(r["goal"], r["sol1"] if r["label"] == 0 else r["sol2"]) for r in rows("piqa")]
    return [(goal, sol) for goal, sol in pairs if len(goal) < 120 and len(sol) < 120][skip:skip + count]


def long_pairs(count: int) -> list[tuple[str, str]]:
    """BoolQ passages, doubled to over 1,000 characters (well over CUTOFF tokens), with their answers."""
    pairs = [(f"{r['passage']} {r['passage']}\nQuestion: {r['question']}?", "yes" if r["label"] else "no")
             for r in rows("boolq")]
    return [(prompt, answer) for prompt, answer in pairs if len(prompt) > 1000][:count]


def as_records(kind: str, pairs: list[tuple[str, str]]) -> list[dict]:
    """Alpaca records, or conversations (which Vicuna's template or the model's chat template renders)."""
    if kind == "alpaca":
        return [{"instruction": prompt, "input": "", "output": reply} for prompt, reply in pairs]
    return [{"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}
            for prompt, reply in pairs]


def lora_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--cutoff-len", str(CUTOFF),
            "--micro-batch-size", "2", "--grad-accum", "2", "--epochs", "1", "--device", "cpu", "--dtype", "float32",
            *extra]


def run_lora(args: list[str]) -> subprocess.CompletedProcess:
    return warm_start.run([LORA, *args], env=subprocess_env(), timeout=300)


def error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run's one `error:` line, its last on stderr (a warning about an ignored torn checkpoint may come before
    it), exit status 2, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ examples cut to no loss tokens


@pytest.mark.parametrize("kind", ["alpaca", "vicuna", "llama3"])
def test_data_cut_to_no_loss_tokens_everywhere_is_an_error_naming_the_file_and_the_cutoff(kind, tmp_path,
                                                                                       vicuna_model, llama3_model):
    """It used to train on nothing: loss 0, grad_norm 0, tokens 0 on every step, exit 0 and a merged/ model."""
    data = tmp_path / "long.json"
    data.write_text(json.dumps(as_records(kind, long_pairs(6))))
    out = tmp_path / "run"
    result = run_lora(lora_args(llama3_model if kind == "llama3" else vicuna_model, data, out))
    error_line(result, str(data), f"--cutoff-len {CUTOFF}", "all 6 examples", "raise --cutoff-len",
               "shorten the records")
    assert not out.exists()  # refused before anything was trained or written


def test_examples_cut_to_no_loss_tokens_are_counted_in_the_log_and_the_summary(tmp_path, vicuna_model):
    """They stay in their batches and add nothing to the loss; that used to go unreported."""
    records = as_records("alpaca", short_pairs(5) + long_pairs(3))
    records = [records[i] for i in (0, 5, 1, 2, 6, 3, 7, 4)]  # the long ones (5, 6, 7) spread over the file
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    result = run_lora(lora_args(vicuna_model, data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1, result.stderr[-3000:]
    for fragment in (str(data), "3 of 8 examples", f"--cutoff-len {CUTOFF}", "records 1, 4, 6"):
        assert fragment in warning[0], (fragment, warning[0])
    log = log_of(out)
    assert len(log) == 2 and sum(r["examples_without_loss"] for r in log) == 3
    assert all(r["tokens"] > 0 for r in log)
    assert f"3 of 8 examples without loss tokens within --cutoff-len {CUTOFF}" in result.stdout
    assert (out / "merged" / "config.json").is_file()


# ------------------------------------------------------------------------------ a data file changed before a resume


def test_a_resume_refuses_a_data_file_whose_content_changed_since_its_checkpoints(tmp_path, vicuna_model):
    """Killed mid-run, the file replaced, the rerun used to resume on other records; the original content (written
    again, at a new mtime) still resumes."""
    data = tmp_path / "alpaca.json"
    original = json.dumps(as_records("alpaca", short_pairs(24)))
    data.write_text(original)
    out = tmp_path / "run"
    args = lora_args(vicuna_model, data, out, "--micro-batch-size", "1", "--grad-accum", "1", "--epochs", "2",
                     "--save-every-steps", "1")
    victim = warm_start.WarmProcess([LORA, *args], subprocess_env(), ROOT, tmp_path / "victim.out")
    deadline = time.time() + 180
    while not (out / "checkpoints" / "step_00000003" / "complete.json").exists():
        assert victim.poll() is None, f"the LoRA run exited {victim.returncode}"
        assert time.time() < deadline, "the LoRA run never wrote its third checkpoint"
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    newest = complete_checkpoints(out / "checkpoints")[-1]
    assert 3 <= int(newest.name.split("_")[1]) < 48

    data.write_text(json.dumps(as_records("alpaca", short_pairs(24, skip=24))))  # other records, as many
    error_line(run_lora(args), str(data), "changed since", str(out), "a new --out", "the original file")
    assert complete_checkpoints(out / "checkpoints")[-1] == newest and not (out / "merged").exists()

    data.write_text(original)
    resumed = run_lora(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {newest}" in resumed.stdout
    assert [r["step"] for r in log_of(out)] == list(range(1, 49))


# ------------------------------------------------------------------------------ float flags


@pytest.mark.parametrize("flag, value, key", [
    ("--lr", "nan", "lora.lr"),  # was reported as lora.epochs (one check of both)
    ("--lr", "inf", "lora.lr"),  # passed (inf > 0)
    ("--max-grad-norm", "nan", "lora.max_grad_norm"),  # was reported as lora.warmup_steps
    ("--max-grad-norm", "inf", "lora.max_grad_norm"),
    ("--dropout", "nan", "lora.dropout"),
])
def test_a_non_finite_float_flag_is_refused_under_its_own_key(flag, value, key, tmp_path):
    result = run_lora(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"), "--out",
                       str(tmp_path / "run"), flag, value])
    error_line(result, f"command line: {key}: ", value)
