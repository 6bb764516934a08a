"""Conversation-form instruction data (ShareGPT / Vicuna: `conversations: [{from, value}, ...]`) rendered with the
model's own chat template when its tokenizer has one, else with Vicuna v1.1's, the loss on the assistant's turns only.

Vicuna v1.1 is FastChat's `vicuna_v1.1`: the system prompt, then `USER: <message> ASSISTANT: <reply></s>` for each
exchange, separated by single spaces. FastChat tokenises that string whole and then finds each reply's tokens again
by re-tokenising prefixes, which is off by a token wherever SentencePiece merges across a boundary. Here each piece is
encoded on its own (the tokenizer's leading-space handling gives a reply the same ids it has inside the whole string)
and `</s>` is the EOS id, not the five characters, so every mask boundary is exact by construction.

A chat template (the `chat_template` of a Hugging Face `tokenizer_config.json`) is rendered as transformers'
`apply_chat_template` renders it. A reply's text is what its message adds to the conversation before it rendered with
the generation prompt (`<|start_header_id|>assistant<|end_header_id|>\n\n` for Llama-3), so the template's own
end-of-turn token is learned and its headers are not. The whole rendered text is encoded at once, as transformers
does (so the ids are the model's own: a byte-level BPE's pre-tokenizer splits `\n\n` differently at the end of a
piece than before a word, so pieces encoded alone would not be), and a token is learned when its characters lie in a
reply. A template whose earlier turns render differently once later ones follow, or a reply boundary that falls
inside a token, cannot be masked per turn and is an error naming the template and the record.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shortened.prune.errors import PruneInputError
from shortened.tokenizer import ChatTemplate, HFJsonTokenizer, Tokenizer

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
    """(input_ids, labels), the prompts masked unless `train_on_inputs`, cut at `cutoff_len` tokens: the
    tokenizer's chat template where it has one, else Vicuna v1.1's. A trailing user turn without a reply is dropped:
    nothing in it is learned."""
    if isinstance(tokenizer, HFJsonTokenizer) and tokenizer.chat_template is not None:
        pieces = _chat_template_pieces(record, tokenizer, tokenizer.chat_template)
    else:
        pieces = _vicuna_pieces(record, tokenizer)
    ids = [token for piece, _ in pieces for token in piece][:cutoff_len]
    learned = [train_on_inputs or reply for piece, reply in pieces for _ in piece][:cutoff_len]
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, learned)]


def _vicuna_pieces(record: dict[str, Any], tokenizer: Tokenizer) -> list[tuple[list[int], bool]]:
    """(ids, is a reply) in order: BOS, the system prompt, then per exchange `USER: message ASSISTANT:` and
    `reply` + EOS."""
    turns = record["conversations"]
    system = VICUNA_SYSTEM
    if turns[0]["from"].lower() == "system":
        system, turns = turns[0]["value"], turns[1:]
    pieces = [([tokenizer.bos_id], False)]
    prompt = system
    for turn in turns:
        if turn["from"].lower() in USER_ROLES:  # after a reply's </s> the next USER follows without a space
            prompt += (" " if prompt else "") + f"USER: {turn['value']} ASSISTANT:"
            continue
        pieces += [(tokenizer.encode(prompt), False), (tokenizer.encode(turn["value"]) + [tokenizer.eos_id], True)]
        prompt = ""
    return pieces


def _chat_template_pieces(record: dict[str, Any], tokenizer: HFJsonTokenizer,
                          chat: ChatTemplate) -> list[tuple[list[int], bool]]:
    """(ids, is a reply) in order: the template's rendering of the whole conversation, encoded whole and cut at
    each reply's start and end (module docstring)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    turns = record["conversations"]
    while turns[-1]["from"].lower() in USER_ROLES:
        turns = turns[:-1]
    messages = [{"role": _role(turn["from"]), "content": turn["value"]} for turn in turns]
    which = f"{chat.source}: its chat_template on {_record_name(record)}"

    variables: dict[str, Any] = dict(chat.special_tokens)

    def render(upto: int, generation_prompt: bool) -> str:
        try:  # (rendered conversations, generation spans); transformers annotates it as a str
            result: Any = render_jinja_template([messages[:upto]], chat_template=chat.template,
                                                add_generation_prompt=generation_prompt, **variables)
        except TemplateError as err:
            raise ConversationError(f"{which}: {err}") from None
        return result[0][0]

    whole = render(len(messages), False)
    replies: list[tuple[int, int]] = []
    for number, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(number, True), render(number + 1, False)
        if not (through.startswith(before) and whole.startswith(through)
                and len(before) >= (replies[-1][1] if replies else 0)):
            raise ConversationError(
                f"{which}: the text rendered up to conversations[{number}] is not a prefix of the whole "
                "conversation's (the template renders earlier turns differently once later ones follow), so the "
                "loss cannot be put on the assistant's turns alone")
        header = _text_before_content(message["content"], through[len(before):])
        # rendered without the prompt only then, to see whether the template ignores it
        if header is not None and before == render(number, False):
            raise ConversationError(
                f"{which}: the template ignores add_generation_prompt, so the text before conversations[{number}]'s "
                f"reply ({header!r}) would carry loss; use a template that renders the assistant's header when "
                "add_generation_prompt is set, as transformers' generation does")
        replies.append((len(before), len(through)))

    ids, offsets = tokenizer.encode_with_offsets(whole)
    cuts = [cut for reply in replies for cut in reply]
    pieces: list[tuple[list[int], bool]] = []
    for token, (start, end) in zip(ids, offsets):
        inside = [cut for cut in cuts if start < cut < end]
        if inside:
            raise ConversationError(
                f"{which}: a reply's boundary (character {inside[0]} of the rendered text) falls inside the token "
                f"{whole[start:end]!r}, so the loss cannot be masked at it")
        pieces.append(([token], any(first <= start and end <= last for first, last in replies)))
    return pieces


def _text_before_content(content: str, reply: str) -> str | None:
    """What the reply's text holds before the message itself (None when it begins with it, whitespace aside). A
    template that ignores add_generation_prompt renders the assistant's header there (`<|start_header_id|>assistant
    ...`, `assistant: `), where it would carry loss as if the model had to learn to write it; templates with no
    header (Mistral's `[INST] ... [/INST] reply`) have nothing there."""
    opening = content.strip()[:40]
    if reply.lstrip().startswith(opening):
        return None
    return reply.partition(opening)[0] if opening in reply else reply[:40]


def _role(speaker: str) -> str:
    speaker = speaker.lower()
    if speaker in USER_ROLES:
        return "user"
    return "assistant" if speaker in ASSISTANT_ROLES else "system"


def _record_name(record: dict[str, Any]) -> str:
    """The record as a reader finds it in the file: ShareGPT records carry an `id`."""
    if "id" in record:
        return f"the record with id {record['id']!r}"
    return f"the record whose first turn begins {record['conversations'][0]['value'][:40]!r}"
