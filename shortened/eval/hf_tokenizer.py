"""SentencePiece's exact LLaMA ids behind the Hugging Face tokenizer interface that lm-eval's `HFLM` calls.

transformers 5 builds a `tokenizers`-backed tokenizer from a bare `tokenizer.model` that drops SentencePiece's
dummy prefix ("Hello" becomes 10994 instead of 15043 `▁Hello`) and adds no `<s>`: a LLaMA/Vicuna model scored
with it is scored on ids it never saw. This adapter encodes with SentencePiece itself and puts exactly one `<s>`
in front when special tokens are requested, as the original LLaMA tokenizer does.

Text never turns into control ids: a literal "<s>" in a document is encoded as the characters it is, exactly as
SentencePiece encodes it (the HF slow tokenizer would map it to BOS).
"""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from shortened.tokenizer import HFJsonTokenizer


def hf_tokenizer(tokenizer_file: str | Path) -> PreTrainedTokenizerBase:
    """The eval tokenizer of a model: SentencePiece's ids for a `tokenizer.model`; for a `tokenizer.json` (Llama-3)
    the `tokenizers` library's own, bos/eos as `shortened.tokenizer` finds them and BOS from its post-processor."""
    tokenizer_file = Path(tokenizer_file)
    if tokenizer_file.suffix != ".json":
        return SentencePieceHFTokenizer(tokenizer_file)
    reference = HFJsonTokenizer(tokenizer_file)
    bos, eos = (reference.decode([i]) for i in (reference.bos_id, reference.eos_id))
    # Llama-3 has no pad token; padded positions are masked, so EOS is a safe filler.
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=bos, eos_token=eos, pad_token=eos)


class SentencePieceHFTokenizer(PreTrainedTokenizer):
    """A `PreTrainedTokenizer` whose ids are `SentencePieceProcessor.encode`'s, with `<s>` added explicitly."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | Path, add_bos_token: bool = True, **kwargs) -> None:
        self.vocab_file = str(vocab_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        self.add_bos_token = add_bos_token
        for name, piece_id in (("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id()),
                               ("unk_token", self.sp.unk_id())):
            kwargs.setdefault(name, self.sp.id_to_piece(piece_id))
        # LLaMA has no pad token; padding positions are masked, so <unk> is a safe filler (lm-eval does the same).
        kwargs.setdefault("pad_token", kwargs["unk_token"])
        # split_special_tokens: hand the whole text to SentencePiece, never cut it at "<s>"-like substrings.
        super().__init__(split_special_tokens=True, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # SentencePiece decodes control pieces to "", but lm-eval decodes the BOS id to detect prompts that
        # already start with it: an empty string there would make every prompt look BOS-prefixed and drop <s>.
        special = {self.bos_token, self.eos_token, self.unk_token}
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in special:
                out.append(self.sp.decode_pieces(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp.decode_pieces(run))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        ids = bos + token_ids_0
        return ids if token_ids_1 is None else ids + bos + token_ids_1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}tokenizer.model"
        target.write_bytes(Path(self.vocab_file).read_bytes())
        return (str(target),)
