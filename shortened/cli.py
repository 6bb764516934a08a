"""What every command line shares: flags generated from a config dataclass, and bad input as one line, exit 2.

A typo, a value out of range, a file that is not there are the user's to fix, so they get the message (what,
where, the fix) on one `error: ...` line and exit status 2, without a traceback; anything else is a bug and keeps
its traceback. Flags, types, defaults, choices and help come from the fields of the tool's dataclass in
`shortened.config`, so a command line cannot disagree with the config it builds.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Literal, NoReturn, Sequence, TypeVar, Union

from shortened.config import config_keys, field_default, from_dict, yaml_value

T = TypeVar("T")

EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage + error pair replaced by the one `error:` line every bad input gets."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException) -> str:
    """The message on one line: an error raised in a DataLoader worker arrives wrapped with the worker's
    traceback (only its last line is the message), and YAML errors, for one, span several lines."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(err).__name__ + ":") else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run(main: Callable[[], int], bad_input: tuple[type[BaseException], ...], label: str = "error") -> int:
    """`main()`'s exit status, or 2 with one `<label>: <message>` line on stderr for bad input."""
    try:
        return main()
    except bad_input as err:
        print(f"{label}: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


# ---------------------------------------------------------------------------------------------- flags


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, only: Sequence[str] | None = None,
                            overrides: bool = False) -> None:
    """One `--field-name` flag per field of `cls` (or of the fields named in `only`); see
    `shortened.config.setting` for the metadata it reads.

    A bool that defaults to False is `--x`, one that defaults to True is `--no-x`; a Literal gives choices; a
    list takes several words (or one comma-separated word with `sep`). A field without a default, or marked
    `required`, must be given. Rules between fields (exactly one of --remove / --ratio / --keep-blocks) are the
    dataclass's `__post_init__`'s, checked there once. With `overrides`, the flags override a config file: a flag
    left out parses as None (see `given_arguments`), so the file's value, else the field's default, holds.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in only if only is not None else fields:
        flag, options = _flag(fields[name], hints[name])
        if overrides:
            options = {**options, "default": None, "required": False}
        parser.add_argument(flag, dest=name, **options)


def _flag(f: dataclasses.Field, hint: Any) -> tuple[str, dict[str, Any]]:
    default = field_default(f)
    required = default is dataclasses.MISSING or f.metadata.get("required", False)
    name = f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if hint is bool:
        if default:
            return f"--no-{name}", {"action": "store_false", "help": f"turn off: {help_text}"}
        return f"--{name}", {"action": "store_true", "help": help_text}
    options: dict[str, Any] = {"required": bool(required)}
    if not required:
        options["default"] = default
        if default not in (None, ""):
            help_text = f"{help_text} (default: {_show(default, f.metadata.get('sep', ' '))})"
    options["help"] = help_text
    kind, optional = _strip_optional(hint)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        options.update(choices=list(args), type=type(args[0]))
    elif origin is list:
        if "sep" in f.metadata:
            options["type"] = lambda text, sep=f.metadata["sep"]: [part for part in text.split(sep) if part]
        else:
            options.update(nargs="*" if optional else "+", type=args[0])
    elif kind in (int, float, str):
        options["type"] = kind
    else:
        raise TypeError(f"{f.name}: no command-line form for {kind!r}")
    return f"--{name}", options


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (hint, False)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def _show(value: Any, sep: str) -> str:
    """A default as it is typed on the command line (list items joined as the flag takes them)."""
    return sep.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype of the evaluation tools (launch/evaluate.py, launch/eval_watch.py)."""
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, ...")


def config_help(cls: type, width: int = 100) -> str:
    """Every dotted key of `cls` with its type, default and explanation: the `key=value` part of `--help`."""
    lines = []
    for doc in config_keys(cls):
        lines.append(f"  {doc.key} ({doc.type}, default: {yaml_value(doc.default)})")
        lines.extend(textwrap.wrap(doc.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                   break_on_hyphens=False))  # a flag such as --pack-by-source stays whole
    return "\n".join(lines)


def config_from_args(namespace: argparse.Namespace, cls: type[T]) -> T:
    """`cls` built and validated from the flags `add_dataclass_arguments` made (errors name the command line)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return from_dict(cls, {name: getattr(namespace, name) for name in names}, source="command line")


def given_arguments(namespace: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The flags of `names` that were given, as `key=value` overrides for `load_config` (flags added with
    `add_dataclass_arguments(..., overrides=True)`)."""
    return [f"{name}={yaml_value(getattr(namespace, name))}" for name in names
            if getattr(namespace, name) is not None]

