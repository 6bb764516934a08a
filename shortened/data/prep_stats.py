"""Running totals of a data-prep run: per-source counts and every rejected input, per reason and per file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shortened.data.sources import BadLine

MAX_EXAMPLES = 20  # `file:line: reason` examples kept in the manifest; the counts are always complete


@dataclass
class PrepStats:
    docs_total: int = 0
    tokens_total: int = 0  # every token produced, <s> and </s> included
    bytes_total: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {docs, tokens, bytes}
    filtered: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)
    bad_by_file: dict[str, dict[str, int]] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)

    def add_documents(self, doc_lens: np.ndarray, doc_bytes: np.ndarray, doc_source: np.ndarray,
                      source_names: list[str]) -> None:
        self.docs_total += len(doc_lens)
        self.tokens_total += int(doc_lens.sum())
        self.bytes_total += int(doc_bytes.sum())
        for index, name in enumerate(source_names):
            mine = doc_source == index
            if not mine.any():
                continue  # a source seen only in documents cut off by --max-tokens
            entry = self.sources.setdefault(name, {"docs": 0, "tokens": 0, "bytes": 0})
            entry["docs"] += int(mine.sum())
            entry["tokens"] += int(doc_lens[mine].sum())
            entry["bytes"] += int(doc_bytes[mine].sum())
        self.sources = dict(sorted(self.sources.items()))

    def add_bad(self, file_name: str, lines: list[BadLine]) -> None:
        for line in lines:
            self.bad[line.reason] = self.bad.get(line.reason, 0) + 1
            per_file = self.bad_by_file.setdefault(file_name, {})
            per_file[line.reason] = per_file.get(line.reason, 0) + 1
            if len(self.bad_examples) < MAX_EXAMPLES:
                self.bad_examples.append(describe_bad(file_name, line))

    def add_filtered(self, filtered: dict[str, int]) -> None:
        for name, count in filtered.items():
            self.filtered[name] = self.filtered.get(name, 0) + count
        self.filtered = dict(sorted(self.filtered.items()))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrepStats":
        return cls(**data)

    def summary(self) -> str:
        lines = [f"documents {self.docs_total:,}   tokens {self.tokens_total:,}   "
                 f"text {self.bytes_total / 1e6:,.1f} MB"]
        for name, entry in self.sources.items():
            lines.append(f"  {name:<24} docs {entry['docs']:>10,}  tokens {entry['tokens']:>14,}  "
                         f"MB {entry['bytes'] / 1e6:>10,.1f}")
        if self.filtered:
            lines.append("filtered out by --sources: " + ", ".join(f"{k} {v:,}" for k, v in self.filtered.items()))
        if self.bad:
            lines.append("rejected input: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.bad.items())))
            for file_name, reasons in sorted(self.bad_by_file.items()):
                lines.append(f"  {file_name}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())))
        else:
            lines.append("rejected input: none")
        return "\n".join(lines)


def describe_bad(file_name: str, line: BadLine) -> str:
    where = f"{file_name}:{line.line}" if line.line else file_name
    return f"{where}: {line.reason}"
