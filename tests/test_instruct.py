"""Conversation-form instruction data (ShareGPT / Vicuna) for LoRA, the loss on the assistant's turns only, checked
token by token on real rows: Vicuna v1.1's template with the real LLaMA tokenizer, and a model's own chat template
(Llama-3's) with a Llama-3-layout byte-level BPE tokenizer, against transformers' rendering; bad records and
templates that cannot be split into turns named by file, record and field."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from test_llama3 import BOS, CHAT_TOKENS, EOS, TRAIN_DOCS, train_llama3_like_tokenizer
from tokenizers import Tokenizer as ReferenceTokenizer
from transformers import AutoTokenizer

from shortened.prune.conversation import VICUNA_SYSTEM, ConversationError
from shortened.prune.errors import PruneInputError
from shortened.prune.instruct import IGNORE_INDEX, encode_example, read_alpaca
from shortened.tokenizer import TokenizerNotFound, load_tokenizer

from conftest import EVAL_DATA, read_original_documents

# Meta-Llama-3-8B-Instruct's chat_template, as its tokenizer_config.json holds it.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same with the assistant's part of each turn in `{% generation %}`, for transformers' own assistant mask.
LLAMA3_MARKED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + "
    "'<|eot_id|>' }}{% endif %}{% endfor %}"
)
START_HEADER, END_HEADER, EOT = CHAT_TOKENS.values()


@pytest.fixture(scope="module")
def sp(tokenizer_model):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model))


@pytest.fixture(scope="module")
def conversation() -> dict:
    """Two exchanges about a real BoolQ passage, in ShareGPT's layout."""
    rows = [json.loads(line) for line in (EVAL_DATA / "boolq" / "validation.jsonl").read_text().splitlines()[:2]]
    turns = []
    for row in rows:
        turns.append({"from": "human", "value": f"{row['passage']}\n\nQuestion: {row['question']}?"})
        turns.append({"from": "gpt", "value": "Yes." if row["label"] else "No."})
    return {"id": "boolq-0", "conversations": turns}


def test_only_the_assistants_replies_and_their_eos_carry_loss(conversation, tokenizer_model, sp):
    example = encode_example(conversation, load_tokenizer(tokenizer_model), 4096, train_on_inputs=False)
    (q1, a1), (q2, a2) = [(conversation["conversations"][i]["value"], conversation["conversations"][i + 1]["value"])
                          for i in (0, 2)]
    # FastChat's vicuna_v1.1 text, each piece encoded with SentencePiece itself: system, USER/ASSISTANT, replies
    # ended by </s> (the EOS id), the next USER right after it.
    first_prompt = sp.encode(f"{VICUNA_SYSTEM} USER: {q1} ASSISTANT:")
    second_prompt = sp.encode(f"USER: {q2} ASSISTANT:")
    pieces = [([1], False), (first_prompt, False), (sp.encode(a1) + [2], True), (second_prompt, False),
              (sp.encode(a2) + [2], True)]
    expected_ids = [i for ids, _ in pieces for i in ids]
    expected_labels = [i if learned else IGNORE_INDEX for ids, learned in pieces for i in ids]
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    assert example.label_tokens == len(sp.encode(a1)) + len(sp.encode(a2)) + 2
    # the first exchange's ids are exactly the whole rendered string's: the reply's own encoding loses nothing
    assert expected_ids[1:expected_ids.index(2)] == sp.encode(f"{VICUNA_SYSTEM} USER: {q1} ASSISTANT: {a1}")


def test_a_system_turn_train_on_inputs_and_the_cutoff(conversation, tokenizer_model, sp):
    tokenizer = load_tokenizer(tokenizer_model)
    with_system = {"conversations": [{"from": "system", "value": "You answer yes or no."},
                                     *conversation["conversations"][:2]]}
    example = encode_example(with_system, tokenizer, 4096, train_on_inputs=False)
    question = conversation["conversations"][0]["value"]
    prompt = sp.encode(f"You answer yes or no. USER: {question} ASSISTANT:")
    assert example.input_ids[:1 + len(prompt)] == [1, *prompt]
    everything = encode_example(with_system, tokenizer, 4096, train_on_inputs=True)
    assert everything.labels == everything.input_ids
    cut = encode_example(with_system, tokenizer, 50, train_on_inputs=False)
    assert cut.input_ids == example.input_ids[:50] and len(cut.labels) == 50
    assert all(label == IGNORE_INDEX for label in cut.labels)  # the cut fell inside the first prompt


@pytest.mark.parametrize("records, fragment", [
    ([{"conversations": []}], "record 0: 'conversations' must be a non-empty list"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}],
     "record 0: conversations[1]: a turn needs string fields 'from' and 'value'"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}],
     "record 0: conversations[1].from: 'human', expected one of gpt, assistant"),
    ([{"conversations": [{"from": "human", "value": "a"}]}], "record 0: 'conversations' has no assistant turn"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
      {"instruction": "x", "output": "y"}], "record 1: 'conversations' must be a non-empty list"),
])
def test_a_malformed_conversation_names_the_file_the_record_and_the_field(tmp_path, records, fragment):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ConversationError) as err:
        read_alpaca(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value), str(err.value)
    assert isinstance(err.value, PruneInputError)  # launch/lora.py: one error line, exit 2


def test_a_conversation_file_reads_and_encodes_through_the_lora_path(tmp_path, conversation, tokenizer_model):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([conversation, conversation]))
    records = read_alpaca(path)
    examples = [encode_example(r, load_tokenizer(tokenizer_model), 512, False) for r in records]
    assert examples[0] == examples[1] and examples[0].label_tokens > 0


def test_plain_documents_are_framed_as_pretraining_frames_them_and_every_token_is_a_target(tmp_path, sp,
                                                                                          tokenizer_model,
                                                                                          slimpajama_sample):
    """{"text": ...} records: LoRA on pretraining text, the parameter-efficient arm beside continued pretraining."""
    texts = [r["text"] for r in read_original_documents(slimpajama_sample / "validation")[:3]]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = load_tokenizer(tokenizer_model)
    examples = [encode_example(r, tokenizer, 4096, False) for r in read_alpaca(path)]
    for text, example in zip(texts, examples):
        whole = [sp.bos_id(), *sp.encode(text), sp.eos_id()][:4096]
        assert example.input_ids == whole and example.labels == whole
    cut = encode_example({"text": texts[0]}, tokenizer, 16, False)
    assert cut.input_ids == [sp.bos_id(), *sp.encode(texts[0])][:16] and cut.label_tokens == 15
    path.write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(PruneInputError, match=r"docs.jsonl: record 1 has no non-empty string 'text'"):
        read_alpaca(path)


# ---------------------------------------------------------------------------------------------- a model's chat template


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, slimpajama_sample) -> Path:
    """A Llama-3-layout byte-level BPE tokenizer (tests/test_llama3.py's), without a chat template."""
    texts = [r["text"] for r in read_original_documents(slimpajama_sample / "train")[:TRAIN_DOCS]]
    return train_llama3_like_tokenizer(texts, tmp_path_factory.mktemp("bpe") / "tokenizer")


def with_chat_template(bpe_dir: Path, out: Path, template) -> Path:
    """The tokenizer with `template` in its tokenizer_config.json, where Hugging Face chat models keep it."""
    shutil.copytree(bpe_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out


def chat(conversation: dict) -> dict:
    """The BoolQ conversation with a system turn first and a user turn left without a reply at the end."""
    return {"id": conversation["id"], "conversations": [
        {"from": "system", "value": "You answer yes or no."}, *conversation["conversations"],
        {"from": "human", "value": "Thanks!"}]}


def test_a_chat_template_is_rendered_and_only_the_replies_and_their_end_of_turn_carry_loss(tmp_path, bpe_dir,
                                                                                         conversation):
    tokenizer_dir = with_chat_template(bpe_dir, tmp_path / "chat", LLAMA3_CHAT_TEMPLATE)
    record = chat(conversation)
    example = encode_example(record, load_tokenizer(tokenizer_dir), 4096, train_on_inputs=False)

    # Llama-3's format written out here and encoded whole by the `tokenizers` library itself
    reference = ReferenceTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    system, q1, a1, q2, a2, _ = (turn["value"].strip() for turn in record["conversations"])

    def turn(role: str, text: str) -> str:
        return f"{START_HEADER}{role}{END_HEADER}\n\n{text}{EOT}"

    text = BOS + turn("system", system) + turn("user", q1) + turn("assistant", a1) + turn("user", q2) + \
        turn("assistant", a2)
    assert example.input_ids == reference.encode(text, add_special_tokens=False).ids
    learned = reference.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert learned == f"{a1}{EOT}{a2}{EOT}"  # the replies and the template's end of turn, no header

    # transformers, given the same template with its assistant parts marked, masks the same tokens
    messages = [{"role": role, "content": turn["value"]}
                for role, turn in zip(("system", "user", "assistant", "user", "assistant"), record["conversations"])]
    hf = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        messages, chat_template=LLAMA3_MARKED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == example.input_ids
    assert example.labels == [t if mask else IGNORE_INDEX for t, mask in zip(hf["input_ids"], hf["assistant_masks"])]
    assert sum(hf["assistant_masks"]) == example.label_tokens

    tokenizer = load_tokenizer(tokenizer_dir)
    everything = encode_example(record, tokenizer, 4096, train_on_inputs=True)
    assert everything.labels == everything.input_ids == example.input_ids
    cut = encode_example(record, tokenizer, 20, train_on_inputs=False)
    assert cut.input_ids == example.input_ids[:20] and cut.labels == example.labels[:20]


def test_a_chat_template_saved_as_transformers_saves_it_is_read_and_kept_by_every_copy(tmp_path, bpe_dir,
                                                                                        conversation):
    """transformers' save_pretrained writes the template to chat_template.jinja, not tokenizer_config.json: such a
    model renders as the one with the template in its config, and pruning, checkpoints and exports keep the file."""
    from shortened.modeling import build_tiny_llama
    from shortened.prune.hf_model import save_model_dir
    from shortened.tokenizer import copy_tokenizer

    in_config = with_chat_template(bpe_dir, tmp_path / "chat", LLAMA3_CHAT_TEMPLATE)
    saved = tmp_path / "saved"
    AutoTokenizer.from_pretrained(in_config).save_pretrained(saved)
    assert (saved / "chat_template.jinja").read_text() == LLAMA3_CHAT_TEMPLATE
    assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())
    reference = encode_example(chat(conversation), load_tokenizer(in_config), 4096, train_on_inputs=False)
    tokenizer = load_tokenizer(saved)
    assert tokenizer.chat_template.source == saved / "chat_template.jinja"
    assert encode_example(chat(conversation), tokenizer, 4096, train_on_inputs=False) == reference

    (saved / "additional_chat_templates").mkdir()
    (saved / "additional_chat_templates" / "tool_use.jinja").write_text(GENERIC)
    pruned = save_model_dir(build_tiny_llama(seed=0, num_layers=1, vocab_size=tokenizer.vocab_size),
                            tmp_path / "pruned", saved)  # launch/prune.py's output
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    copy_tokenizer(pruned / "tokenizer.json", checkpoint)  # what the trainer's checkpoints and exports hold
    for copy in (pruned, checkpoint):
        assert encode_example(chat(conversation), load_tokenizer(copy), 4096, train_on_inputs=False) == reference
        assert (copy / "additional_chat_templates" / "tool_use.jinja").read_text() == GENERIC
        assert set(AutoTokenizer.from_pretrained(copy).chat_template) == {"default", "tool_use"}

    # both there: the file wins, as in transformers' loading
    (saved / "tokenizer_config.json").write_text(json.dumps({**json.loads((saved / "tokenizer_config.json")
                                                                         .read_text()), "chat_template": GENERIC}))
    assert load_tokenizer(saved).chat_template.template == LLAMA3_CHAT_TEMPLATE


def test_a_tokenizer_json_without_a_chat_template_keeps_vicunas(bpe_dir, conversation):
    tokenizer = load_tokenizer(bpe_dir)
    assert tokenizer.chat_template is None
    example = encode_example(conversation, tokenizer, 4096, train_on_inputs=False)
    assert example.input_ids[0] == tokenizer.bos_id
    assert tokenizer.decode(example.input_ids[1:]).startswith(f"{VICUNA_SYSTEM} USER: ")
    replies = [turn["value"] for turn in conversation["conversations"][1::2]]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "".join(r + EOS for r in replies)


GENERIC = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.mark.parametrize("template, fragment", [
    # earlier turns change once later ones follow: a count of the messages up front
    ("{{ messages | length }} messages\n" + GENERIC,
     "the text rendered up to conversations[2] is not a prefix of the whole conversation's"),
    # the generation prompt's trailing space and the reply's first word are one token (' No')
    (GENERIC.replace("assistant:{% endif %}", "assistant: {% endif %}"),
     "of the rendered text) falls inside the token ' "),
    # no generation prompt: the assistant's header would be rendered inside the reply, and learned
    (LLAMA3_CHAT_TEMPLATE.split("{% if add_generation_prompt %}")[0],
     "the template ignores add_generation_prompt, so the text before conversations[2]'s reply "
     "('<|start_header_id|>assistant<|end_header_id|>\\n\\n') would carry loss"),
    # Gemma-style templates refuse a system turn
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
     + GENERIC, "System role not supported"),
])
def test_a_chat_template_that_cannot_be_split_into_turns_names_the_template_and_the_record(
        tmp_path, bpe_dir, conversation, template, fragment):
    tokenizer_dir = with_chat_template(bpe_dir, tmp_path / "chat", template)
    with pytest.raises(ConversationError) as err:
        encode_example(chat(conversation), load_tokenizer(tokenizer_dir), 4096, train_on_inputs=False)
    message = str(err.value)
    assert message.startswith(f"{tokenizer_dir / 'tokenizer_config.json'}: its chat_template on the record with id "
                              "'boolq-0': ") and fragment in message, message
    assert isinstance(err.value, PruneInputError)  # launch/lora.py: one error line, exit 2


def test_a_plain_text_chat_template_learns_the_replies_alone(tmp_path, bpe_dir, conversation):
    """No special tokens and a generation prompt that ends before the reply's leading space: the reply is the text
    after `assistant:`, its newline included."""
    tokenizer = load_tokenizer(with_chat_template(bpe_dir, tmp_path / "chat", GENERIC))
    example = encode_example(chat(conversation), tokenizer, 4096, train_on_inputs=False)
    assert tokenizer.decode(example.input_ids).startswith("system: You answer yes or no.\nuser: ")
    replies = [turn["value"] for turn in conversation["conversations"][1::2]]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "".join(f" {r}\n" for r in replies)


def test_a_template_without_an_assistant_header_needs_no_generation_prompt(tmp_path, bpe_dir, conversation):
    """Mistral-style: `[INST] question [/INST] reply</s>`, nothing rendered before a reply, so a template that has
    no add_generation_prompt branch still puts the loss on the replies alone."""
    mistral = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tokenizer = load_tokenizer(with_chat_template(bpe_dir, tmp_path / "chat", mistral))
    example = encode_example(conversation, tokenizer, 4096, train_on_inputs=False)
    replies = [turn["value"] for turn in conversation["conversations"][1::2]]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "".join(f" {r}{EOS}" for r in replies)


def test_a_malformed_chat_template_names_the_config_file(tmp_path, bpe_dir):
    tokenizer_dir = with_chat_template(bpe_dir, tmp_path / "chat", [{"name": "tool_use", "template": "x"}])
    with pytest.raises(TokenizerNotFound, match=f"{tokenizer_dir / 'tokenizer_config.json'}: chat_template must"):
        load_tokenizer(tokenizer_dir)


def test_the_lora_trainer_names_the_data_file_and_the_record_a_template_cannot_split(tmp_path, bpe_dir,
                                                                                      conversation):
    from shortened.config import LoraTrainConfig
    from shortened.prune.lora import encoded

    tokenizer_dir = with_chat_template(bpe_dir, tmp_path / "chat", "{{ messages | length }} messages\n" + GENERIC)
    data = tmp_path / "chats.jsonl"
    config = LoraTrainConfig(model=str(tokenizer_dir), data=str(data), out=str(tmp_path / "out"))
    tokenizer = load_tokenizer(tokenizer_dir)
    with pytest.raises(ConversationError, match=rf"^{re.escape(str(data))}: record 3: "
                                                rf"{re.escape(str(tokenizer_dir / 'tokenizer_config.json'))}: "):
        encoded(config, tokenizer, 3, chat(conversation))
