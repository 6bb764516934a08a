"""Conversation-form instruction data (ShareGPT / Vicuna: `conversations: [{from, value}, ...]`) in Vicuna v1.1's
template, with the loss on the assistant's turns only.

The rendered text is FastChat's `vicuna_v1.1`: the system prompt, then `USER: <message> ASSISTANT: <reply></s>` for
each exchange, separated by single spaces. FastChat tokenises that string whole and then finds each reply's tokens
again by re-tokenising prefixes, which is off by a token wherever SentencePiece merges across a boundary. Here each
piece is encoded on its own (the tokenizer's leading-space handling gives a reply the same ids it has inside the
whole string) and `</s>` is the EOS id, not the five characters, so every mask boundary is exact by construction.
Tokenizers that ship a chat template (Hugging Face `tokenizer.json` models) are not read yet: the SentencePiece
models this project loads have none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shortened.prune.errors import PruneInputError
from shortened.tokenizer import Tokenizer

IGNORE_INDEX = -100
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard")


class ConversationError(PruneInputError):
    """A conversation record is malformed; the message names the file, the record and the field."""


def check_conversation(path: Path, index: int, record: dict[str, Any]) -> None:
    """A record is an optional leading `system` turn, then user and assistant turns alternating, user first."""
    turns = record.get("conversations")
    where = f"{path}: record {index}"
    if not isinstance(turns, list) or not turns:
        raise ConversationError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    expected: tuple[str, ...] = USER_ROLES
    for number, turn in enumerate(turns):
        field = f"{where}: conversations[{number}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"),
                                                                                                   str):
            raise ConversationError(f"{field}: a turn needs string fields 'from' and 'value'")
        role = turn["from"].lower()
        if role == "system" and number == 0:
            continue
        if role not in expected:
            raise ConversationError(f"{field}.from: {turn['from']!r}, expected one of {', '.join(expected)} "
                                    "(turns alternate user, assistant, starting with the user)")
        expected = ASSISTANT_ROLES if expected is USER_ROLES else USER_ROLES
    if not any(t["from"].lower() in ASSISTANT_ROLES for t in turns):
        raise ConversationError(f"{where}: 'conversations' has no assistant turn, so nothing to learn from")


def encode_conversation(record: dict[str, Any], tokenizer: Tokenizer, cutoff_len: int,
                        train_on_inputs: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels): BOS, the system prompt, then per exchange `USER: message ASSISTANT:` (masked unless
    `train_on_inputs`) and `reply` + EOS (learned), cut at `cutoff_len` tokens. A trailing user turn without a
    reply is dropped: nothing in it is learned."""
    turns = record["conversations"]
    system = VICUNA_SYSTEM
    if turns[0]["from"].lower() == "system":
        system, turns = turns[0]["value"], turns[1:]
    ids, learned = [tokenizer.bos_id], [train_on_inputs]
    prompt = system
    for turn in turns:
        if turn["from"].lower() in USER_ROLES:  # after a reply's </s> the next USER follows without a space
            prompt += (" " if prompt else "") + f"USER: {turn['value']} ASSISTANT:"
            continue
        prompt_ids = tokenizer.encode(prompt)
        reply_ids = tokenizer.encode(turn["value"]) + [tokenizer.eos_id]
        ids += prompt_ids + reply_ids
        learned += [train_on_inputs] * len(prompt_ids) + [True] * len(reply_ids)
        prompt = ""
    ids, learned = ids[:cutoff_len], learned[:cutoff_len]
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, learned)]
