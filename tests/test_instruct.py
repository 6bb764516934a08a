"""Conversation-form instruction data (ShareGPT / Vicuna) for LoRA: Vicuna v1.1's template, the loss on the
assistant's turns only, checked token by token with the real LLaMA tokenizer on real rows; bad records named by
file, record and field."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from shortened.prune.conversation import VICUNA_SYSTEM, ConversationError
from shortened.prune.errors import PruneInputError
from shortened.prune.instruct import IGNORE_INDEX, encode_example, read_alpaca
from shortened.tokenizer import load_tokenizer

from conftest import EVAL_DATA


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
