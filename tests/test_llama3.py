"""The Llama-3 family end to end: a `tokenizer.json` byte-level BPE tokenizer with more than 65,536 ids (so uint32
shards), a grouped-query-attention model with an untied head and rope_theta 500k, data prep, pruning (ppl and
taylor) through launch/prune.py, CPT resume parity on 2 ranks, export and evaluation. Nothing is fetched: the
tokenizer is trained here on the shared SlimPajama sample, as Llama-3's is a BPE over web text, and padded with
reserved special tokens as Llama-3's 128,256 ids are (a smaller pad keeps the tiny model's embedding cheap).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prune import skip_by_hooks
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.shards import PackedShards, read_header
from shortened.eval.hf_tokenizer import hf_tokenizer
from shortened.modeling import build_tiny_llama, save_with_tokenizer, tiny_llama3_config
from shortened.tokenizer import load_tokenizer
from shortened.train import checkpoint as ckpt
from shortened.train.cli import export_main
from shortened.train.export import master_weights

import warm_start
from conftest import EVAL_DATA, ROOT, read_original_documents, shard_documents, subprocess_env
from train_support import PRECISION, overrides, read_log, run_ok, same, warm

pytestmark = pytest.mark.timeout(600)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama-3's chat tokens, at their places among its 256 added special tokens (the others are reserved ones).
CHAT_TOKENS = {6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}
VOCAB = 70_000  # > 65,536: token ids need uint32
BPE_VOCAB = 3_000  # 256 bytes + ~2,700 merges: trains in about a second
RESERVED = 256  # added special tokens, as Llama-3 has
TRAIN_DOCS = 300
STRAIGHT, HALF = 8, 4


def train_llama3_like_tokenizer(texts: list[str], out: Path) -> Path:
    """Byte-level BPE laid out as Llama-3's: a base vocabulary (trained, then padded with entries no merge reaches,
    which keeps the padding as cheap to load as Llama-3's 128,000 base ids), then RESERVED added special tokens,
    BOS and EOS first and the chat tokens where Llama-3 has them, so their ids exceed 65,535; the post-processor
    puts BOS in front, as Llama-3's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), VOCAB - RESERVED)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.ByteLevel()
    reserved = iter(range(RESERVED))
    named = {0: BOS, 1: EOS, **CHAT_TOKENS}
    tok.add_special_tokens([named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(RESERVED)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}))
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llama3")


@pytest.fixture(scope="module")
def tokenizer_dir(work, slimpajama_sample) -> Path:
    texts = [r["text"] for r in read_original_documents(slimpajama_sample / "train")[:TRAIN_DOCS]]
    return train_llama3_like_tokenizer(texts, work / "tokenizer")


@pytest.fixture(scope="module")
def reference(tokenizer_dir) -> Tokenizer:
    """The `tokenizers` library's own tokenizer, loaded independently of our code."""
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def prep(sample: Path, split: str, tokenizer_dir: Path, out: Path, workers: int) -> Path:
    prepare_shards(PrepareConfig(input=str(sample), split=split, tokenizer=str(tokenizer_dir), output=str(out),
                                 seq_len=64, workers=workers, progress=False, verbose=False))
    return out


@pytest.fixture(scope="module")
def shards(work, slimpajama_sample, tokenizer_dir) -> Path:
    return prep(slimpajama_sample, "train", tokenizer_dir, work / "shards_w2", workers=2)


@pytest.fixture(scope="module")
def model_dir(work, tokenizer_dir, reference) -> Path:
    config = tiny_llama3_config(VOCAB, reference.token_to_id(BOS), reference.token_to_id(EOS))
    return save_with_tokenizer(build_tiny_llama(seed=0, config=config), work / "model",
                               tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def pruned(work, model_dir, slimpajama_sample) -> dict[str, Path]:
    """The model pruned by ppl and by taylor through `launch/prune.py`, as users prune, 2 of 4 blocks, calibrated on
    the validation split (4 x 32 tokens: every calibration forward computes 70,000 logits a token)."""
    outs = {}
    for criterion in ("ppl", "taylor"):
        outs[criterion] = work / f"pruned_{criterion}"
        out = warm_start.run([ROOT / "launch/prune.py", "--model", model_dir, "--out", outs[criterion],
                              "--criterion", criterion, "--calib", slimpajama_sample / "validation",
                              "--calib-samples", "4", "--calib-len", "32", "--remove", "2", "--no-protect"],
                             env=subprocess_env(), timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.splitlines()[-1])["num_blocks_after"] == 2
    return outs


# ---------------------------------------------------------------------------------------------- tokenizer and data


def test_tokenizer_json_is_read_with_llama3_special_tokens(tokenizer_dir, reference):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.vocab_size == VOCAB and (tok.bos_id, tok.eos_id) == (reference.token_to_id(BOS),
                                                                    reference.token_to_id(EOS))
    text = "Hello  world,\n\tcafé 1234 <|begin_of_text|>"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
    auto = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert hf_tokenizer(tokenizer_dir / "tokenizer.json")(text)["input_ids"] == [tok.bos_id] + tok.encode(text)


def test_shards_are_uint32_and_hold_the_reference_ids_of_every_document(work, shards, slimpajama_sample, reference,
                                                                        tokenizer_dir):
    originals = read_original_documents(slimpajama_sample / "train")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == VOCAB
    assert all(read_header(shards / e["file"]).dtype == "uint32" for e in manifest["shards"])
    docs, tail = shard_documents(shards)
    bos, eos = reference.token_to_id(BOS), reference.token_to_id(EOS)
    expected = [[bos, *e.ids, eos] for e in reference.encode_batch([r["text"] for r in originals],
                                                                  add_special_tokens=False)]
    assert len(originals) == manifest["docs_total"] and docs == expected[:len(docs)]
    assert sum(map(len, expected[len(docs):])) == len(tail) + manifest["tokens_dropped"]
    assert bos > 65_535 and manifest["tokens_total"] == sum(map(len, expected))  # uint16 could not hold BOS

    one_worker = prep(slimpajama_sample, "train", tokenizer_dir, work / "shards_w1", workers=1)
    assert sorted(p.name for p in one_worker.iterdir()) == sorted(p.name for p in shards.iterdir())
    for entry in manifest["shards"]:
        assert (one_worker / entry["file"]).read_bytes() == (shards / entry["file"]).read_bytes()

    assert PackedShards(shards)[0].tolist() == [t for d in expected for t in d][:64]  # the loader's view


# ---------------------------------------------------------------------------------------------- model and pruning


def test_model_has_the_llama3_layout(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads and not config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 500_000 and config.vocab_size == VOCAB
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").exists()


@pytest.mark.parametrize("criterion", ["ppl", "taylor"])
def test_pruned_model_equals_the_original_with_the_removed_blocks_skipped(criterion, pruned, model_dir, shards):
    out = pruned[criterion]
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["removed_blocks"]) == 2 and report["calibration"]["tokenizer_sha256"] == \
        load_tokenizer(model_dir).sha256
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    skip_by_hooks(original, report["removed_blocks"])
    ids = torch.from_numpy(np.stack([PackedShards(shards)[i] for i in (0, 5)]).astype(np.int64))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert load_tokenizer(out).bos_id == load_tokenizer(model_dir).bos_id


# ---------------------------------------------------------------------------------------------- CPT, export, eval


@pytest.fixture(scope="module")
def cpt_runs(work, shards, pruned) -> tuple[Path, Path]:
    """The ppl-pruned model trained 8 steps straight, and 4 steps then resumed to 8 in new processes, 2 ranks."""
    init = pruned["ppl"]
    straight, resumed = work / "cpt_straight", work / "cpt_resumed"
    run_ok(warm(2, overrides(straight, shards, init, f"train.max_steps={STRAIGHT}"), work / "straight.out"))
    run_ok(warm(2, overrides(resumed, shards, init, f"train.max_steps={HALF}"), work / "half.out"))
    output = run_ok(warm(2, overrides(resumed, shards, init, f"train.max_steps={STRAIGHT}"), work / "resume.out"))
    assert "resuming from" in output
    return straight, resumed


def test_cpt_resume_on_2_ranks_is_bitwise_the_straight_run(cpt_runs):
    straight, resumed = (read_log(run) for run in cpt_runs)
    assert [r["step"] for r in resumed] == list(range(1, STRAIGHT + 1))
    for a, b in zip(resumed, straight, strict=True):
        assert same(a, b), (a, b)


@pytest.fixture(scope="module")
def exported(work, cpt_runs) -> Path:
    checkpoint = ckpt.checkpoints_root(cpt_runs[1]) / ckpt.tag_for(STRAIGHT)
    out = work / "exported"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def test_export_reproduces_the_training_weights_and_carries_the_tokenizer(exported, cpt_runs, pruned, shards):
    checkpoint = ckpt.checkpoints_root(cpt_runs[1]) / ckpt.tag_for(STRAIGHT)
    dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(exported, dtype="auto").eval()
    masters = master_weights(checkpoint)
    assert all(torch.equal(p, masters[name].to(dtype)) for name, p in model.state_dict().items())
    initial = AutoModelForCausalLM.from_pretrained(pruned["ppl"], dtype=dtype)
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)  # training moved the weights
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert (exported / "tokenizer.json").read_bytes() == (pruned["ppl"] / "tokenizer.json").read_bytes()
    assert not (exported / "tokenizer.model").exists()
    tok = load_tokenizer(exported)
    assert (tok.vocab_size, tok.sha256) == (VOCAB, json.loads((shards / "manifest.json").read_text())[
        "tokenizer_sha256"])
    assert AutoTokenizer.from_pretrained(exported).bos_token_id == tok.bos_id


def test_exported_model_evaluates_with_its_tokenizer_json(exported, work):
    result_file = work / "eval.json"
    out = warm_start.run([ROOT / "launch/evaluate.py", "--model", exported, "--tasks", "piqa,wikitext2",
                          "--data-dir", EVAL_DATA, "--limit", "4", "--output", result_file],
                         env=subprocess_env(), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert 0 <= result["piqa"]["acc"] <= 1 and result["wikitext2"]["ppl"] > 1


def test_sentencepiece_path_is_unchanged(tmp_path, tokenizer_model):
    """save_with_tokenizer still writes a LLaMA model's tokenizer.model, and nothing of a tokenizer.json."""
    out = save_with_tokenizer(build_tiny_llama(seed=0, num_layers=1), tmp_path / "m", tokenizer_model)
    assert (out / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    assert not (out / "tokenizer.json").exists()
    shutil.rmtree(out)
