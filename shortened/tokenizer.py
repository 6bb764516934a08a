"""The tokenizer every part of the system encodes with: exact SentencePiece ids for LLaMA / Vicuna.

Vicuna was trained on SentencePiece's ids. The Hugging Face fast tokenizer built from the same
`tokenizer.model` differs on real text (a double space becomes `▁▁` instead of `▁`,`▁I`: 475 of the 1,775
documents of the shared SlimPajama sample) and is also slower here (1.8 vs 2.8 MB/s on one core), so a
`tokenizer.model` is always encoded by SentencePiece itself. A directory with only `tokenizer.json`
(LLaMA-3 style models) is encoded by the `tokenizers` library, which is that model's reference; its
`tokenizer_config.json` gives BOS/EOS and, for chat models, the chat template conversations are rendered with
(`chat_template.jinja`, where transformers' save_pretrained writes it, else the config's `chat_template`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from shortened.fsutil import file_sha256

# The files beside a tokenizer that its model's users read: special tokens (ours and AutoTokenizer), and the chat
# template, which transformers' save_pretrained writes to chat_template.jinja (named extra templates to
# additional_chat_templates/) and no longer into tokenizer_config.json. Every copy of a tokenizer carries them all.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# A model whose pretraining framed documents with other tokens than its tokenizer_config.json's BOS/EOS (an instruct
# model's EOS ends a chat turn: SmolLM2-Instruct's is <|im_end|>, while its pretraining put <|endoftext|> between
# documents) names them here, in tokenizer_config.json's form; plain text (data prep, calibration, perplexity) is
# framed with them (docs/shard-format.md, "Document framing"). The chat template keeps the config's tokens.
DOCUMENT_TOKENS_FILE = "document_tokens.json"
TOKENIZER_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", CHAT_TEMPLATE_FILE,
                      DOCUMENT_TOKENS_FILE)


def copy_tokenizer_sidecars(source_dir: Path, out_dir: Path) -> None:
    """The sidecar files (and the named chat templates' folder) of `source_dir` that exist, into `out_dir`."""
    for name in TOKENIZER_SIDECARS:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
    if (source_dir / CHAT_TEMPLATE_DIR).is_dir():
        shutil.copytree(source_dir / CHAT_TEMPLATE_DIR, out_dir / CHAT_TEMPLATE_DIR, dirs_exist_ok=True)


def copy_tokenizer(tokenizer_file: str | Path, out_dir: Path) -> None:
    """The tokenizer into `out_dir` under its canonical name, `tokenizer.model` (SentencePiece) or `tokenizer.json`,
    with the sidecar files of its directory (special tokens, chat template). Models, checkpoints and exports all
    hold it this way."""
    tokenizer_file = Path(tokenizer_file)
    shutil.copyfile(tokenizer_file, out_dir / ("tokenizer.json" if tokenizer_file.suffix == ".json"
                                               else "tokenizer.model"))
    copy_tokenizer_sidecars(tokenizer_file.parent, out_dir)


class TokenizerNotFound(FileNotFoundError):
    """No usable tokenizer at the given path; the message says what was looked for."""


class TokenizerUnreadable(ValueError):
    """A tokenizer file that is there but does not load (cut short, overwritten, another format); names the file."""


class Tokenizer:
    """Encode text to ids without special tokens; `bos_id`/`eos_id` are added by the caller."""

    def __init__(self, path: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.sha256 = file_sha256(path)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        super().__init__(model_file, self._sp.vocab_size(), self._sp.bos_id(), self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: data prep parallelises over processes, and threads would fight them for cores.
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


@dataclass(frozen=True)
class ChatTemplate:
    """A Hugging Face chat template (jinja) and the special-token strings it may read (`bos_token`, ...)."""

    source: Path  # the chat_template.jinja or tokenizer_config.json that holds it, for error messages
    template: str
    special_tokens: dict[str, str]


class HFJsonTokenizer(Tokenizer):
    def __init__(self, json_file: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_file(str(json_file))
        config_file = json_file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        bos, eos = _special_ids(*_document_tokens(config_file, config), self._tok)
        super().__init__(json_file, self._tok.get_vocab_size(with_added_tokens=True), bos, eos)
        self.chat_template = _chat_template(config_file, config)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` and each token's (start, end) character span in it."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.model` file, or a directory holding `tokenizer.model` (preferred) or `tokenizer.json`."""
    path = Path(path)
    if path.is_file():
        return _open(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return _open(path / name)
        raise TokenizerNotFound(f"{path}: directory has neither tokenizer.model nor tokenizer.json")
    raise TokenizerNotFound(f"{path}: no such tokenizer file or directory")


def _open(file: Path) -> Tokenizer:
    """A `tokenizer.json` with the `tokenizers` library, anything else with SentencePiece; a file neither can read is
    TokenizerUnreadable (they raise RuntimeError, OSError or a bare Exception)."""
    kind = "tokenizers JSON" if file.suffix == ".json" else "SentencePiece"
    try:
        return HFJsonTokenizer(file) if file.suffix == ".json" else SentencePieceTokenizer(file)
    except TokenizerNotFound:
        raise
    except Exception as err:
        raise TokenizerUnreadable(f"{file} does not load as a {kind} tokenizer ({' '.join(str(err).split())}); it "
                                  "is damaged or cut short: copy it again from the model it belongs to") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _document_tokens(config_file: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Where a document's BOS/EOS are named: `document_tokens.json` beside the config when the model has one."""
    override = config_file.parent / DOCUMENT_TOKENS_FILE
    return (override, json.loads(override.read_text())) if override.is_file() else (config_file, config)


def _special_ids(source: Path, config: dict[str, Any], tok) -> tuple[int, int]:
    def token_id(name: str) -> int:
        token = _token_text(config.get(name))
        token_id = tok.token_to_id(token) if token else None
        if token_id is None:
            raise TokenizerNotFound(f"{source} names no usable {name}")
        return token_id

    return token_id("bos_token"), token_id("eos_token")


def _chat_template(config_file: Path, config: dict[str, Any]) -> ChatTemplate | None:
    """The template conversations are rendered with: `chat_template.jinja` beside the config, which takes priority as
    in transformers' loading, else the config's `chat_template` (a string, or Hugging Face's list of named
    templates, of which the one named `default`)."""
    jinja_file = config_file.parent / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return ChatTemplate(jinja_file, jinja_file.read_text(encoding="utf-8"), _special_token_texts(config))
    template = config.get("chat_template")
    if template is None:
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        raise TokenizerNotFound(f"{config_file}: chat_template must be a string or a list of {{name, template}} "
                                "with one named 'default'")
    return ChatTemplate(config_file, template, _special_token_texts(config))


def _special_token_texts(config: dict[str, Any]) -> dict[str, str]:
    """The variables transformers' apply_chat_template passes a template: every special token the config names."""
    return {name: text for name, value in config.items()
            if name.endswith("_token") and (text := _token_text(value)) is not None}
