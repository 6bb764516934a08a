"""SmolLM2-135M-Instruct as `make models` (which `make setup` runs) fetched and imported it: one tied matrix, the
instruct model's chat tokens kept, plain text framed with <|endoftext|>, and a language model on WikiText-2."""
from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.eval.perplexity import perplexity, task_windows
from shortened.eval.tasks import load_task_table
from shortened.tokenizer import load_tokenizer

from conftest import EVAL_DATA, ROOT

pytestmark = pytest.mark.timeout(300)
SMOLLM2 = ROOT / "models" / "smollm2-135m"


def test_smollm2_imported_by_setup_is_tied_and_a_language_model():
    assert (SMOLLM2 / "import_report.json").is_file(), f"{SMOLLM2} is missing: run `make models` (make setup does)"
    config = json.loads((SMOLLM2 / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with safe_open(SMOLLM2 / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # one matrix on disk
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert AutoTokenizer.from_pretrained(SMOLLM2).eos_token == "<|im_end|>"
    tokenizer = load_tokenizer(SMOLLM2)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 0, 49_152)  # <|endoftext|> frames text

    windows = task_windows(load_task_table()["wikitext2"], EVAL_DATA, tokenizer, seq_len=256)[:4]
    result = perplexity(model, windows, batch_size=4)
    assert math.isfinite(result.ppl) and result.ppl < 100, result
