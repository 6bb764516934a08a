"""Instruction data for LoRA retraining: Alpaca records, tokenised as alpaca-lora / LLM-Pruner do, conversations
(`shortened.prune.conversation`), or plain text documents (`{"text": ...}`: LoRA on pretraining text, the
parameter-efficient arm beside continued pretraining on the same corpus; BOS + text + EOS, every token in the loss).

Each record has `instruction`, optional `input`, and `output`. The prompt is the Alpaca template; the example is
BOS + prompt + output, cut at `cutoff_len` tokens, with EOS appended when it fits. Unless `train_on_inputs`, the
prompt's tokens are masked (-100) so the loss covers the response only. Ids come from our exact SentencePiece
tokenizer; the prompt length is that of the prompt tokenised alone, as in alpaca-lora.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from shortened.prune.conversation import IGNORE_INDEX, check_conversation, encode_conversation
from shortened.prune.errors import PruneInputError
from shortened.tokenizer import Tokenizer

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class InstructDataError(PruneInputError):
    """The instruction file is unreadable or a record lacks a field; the message names file and record."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        """Tokens that carry loss: labels shifted by one, so the first position never counts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def read_alpaca(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSON list (`.json`, as Alpaca ships) or one object a line (`.jsonl`): Alpaca records
    (`instruction`, `input`, `output`) or conversations (`conversations: [{from, value}]`, ShareGPT / Vicuna), the
    first record deciding which; each is checked, and a bad one is named by file, record and field."""
    path = Path(path)
    if not path.is_file():
        raise InstructDataError(f"{path}: no such instruction data file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise InstructDataError(f"{path}: not valid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(records, list) or not records:
        raise InstructDataError(f"{path}: expected a non-empty list of instruction records")
    kind = record_kind(records[0])
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InstructDataError(f"{path}: record {index} is not an object")
        if kind == "conversations":
            check_conversation(path, index, record)
        elif kind == "text":
            _check_text(path, index, record)
        else:
            _check_alpaca(path, index, record)
    return records


def record_kind(record: Any) -> str:
    """conversations, text (a document and nothing of Alpaca's) or alpaca: the first record decides for the file."""
    if isinstance(record, dict) and "conversations" in record:
        return "conversations"
    if isinstance(record, dict) and "text" in record and "instruction" not in record:
        return "text"
    return "alpaca"


def _check_text(path: Path, index: int, record: dict[str, Any]) -> None:
    if not isinstance(record.get("text"), str) or not record["text"]:
        raise InstructDataError(f"{path}: record {index} has no non-empty string 'text' (plain documents: every "
                                "record {\"text\": ...})")


def _check_alpaca(path: Path, index: int, record: dict[str, Any]) -> None:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise InstructDataError(f"{path}: record {index} has no string {key!r} (Alpaca format: instruction, "
                                    "input, output; or conversations: [{from, value}] in every record)")
    if not isinstance(record.get("input", ""), str):
        raise InstructDataError(f"{path}: record {index}: 'input' must be a string")


def prompt_for(record: dict[str, Any]) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def encode_example(record: dict[str, Any], tokenizer: Tokenizer, cutoff_len: int, train_on_inputs: bool) -> Example:
    kind = record_kind(record)
    if kind == "conversations":
        return Example(*encode_conversation(record, tokenizer, cutoff_len, train_on_inputs))
    if kind == "text":  # a document as pretraining frames it: every token is a target
        ids = ([tokenizer.bos_id] + tokenizer.encode(record["text"]))[:cutoff_len]
        if len(ids) < cutoff_len:
            ids.append(tokenizer.eos_id)
        return Example(ids, list(ids))
    prompt = prompt_for(record)
    ids = ([tokenizer.bos_id] + tokenizer.encode(prompt + record["output"]))[:cutoff_len]
    if len(ids) < cutoff_len:
        ids.append(tokenizer.eos_id)
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = min(1 + len(tokenizer.encode(prompt)), len(ids))
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
    return Example(ids, labels)


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss.

    LLaMA has no pad token; alpaca-lora pads with id 0 (<unk>), which the mask makes irrelevant.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
