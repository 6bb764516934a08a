"""No stale instructions: every command in README.md, docs/ and docker/README.md names a script that exists, only
flags that script accepts, and (for training) a recipe and overrides that load. The demo and the other tests run
the main commands for real; this keeps the rest of the documentation honest."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env
from shortened.config import ConfigError, RunConfig, load_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md"]
LAUNCHERS = {"deepspeed", "torchrun", "srun", "sbatch", "docker"}


def commands(path: Path) -> list[str]:
    """The command lines of the file's ```bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


ALL = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in commands(path)]


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def words(cmd: str) -> list[str]:
    tokens = shlex.split(cmd)
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens.pop(0)
    return tokens


def python_script(tokens: list[str]) -> tuple[str, list[str]] | None:
    for i, token in enumerate(tokens):
        if token.endswith((".py", ".sh", ".sbatch")) and "/" in token:
            return token, tokens[i + 1:]
    return None


def check_flags(script: str, args: list[str]) -> None:
    if script.endswith(".sh") or script.endswith(".sbatch"):
        return
    text = help_text(script)
    for arg in args:
        flag = arg.split("=")[0]
        if flag.startswith("--") and flag not in text:
            raise AssertionError(f"{script} does not accept {flag}")


def check_training_overrides(args: list[str]) -> None:
    config = args[args.index("--config") + 1] if "--config" in args else args[0]
    if "..." in config:
        return  # an elided example ("--config ...")
    overrides = [a for a in args if "=" in a and not a.startswith("-") and "..." not in a]
    try:
        load_config(RunConfig, ROOT / config, overrides)
    except ConfigError as err:
        raise AssertionError(f"{config} with {overrides}: {err}") from None


@pytest.mark.parametrize("doc,cmd", ALL, ids=[f"{d}:{i}" for i, (d, _) in enumerate(ALL)])
def test_documented_command_is_current(doc, cmd):
    tokens = words(cmd)
    program = Path(tokens[0]).name if tokens else ""
    if program == "make":
        targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(t in targets for t in tokens[1:] if "=" not in t), cmd
        return
    if program == "docker":
        assert (ROOT / "docker" / "Dockerfile").is_file()
        return
    found = python_script(tokens)
    if found is None:
        assert program not in LAUNCHERS and "python" not in program, f"{doc}: cannot find the script in {cmd!r}"
        return  # shell plumbing (mv, cd, ...)
    script, args = found
    assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
    if script in ("launch/cpt.py", "launch/slurm/cpt.sbatch"):
        check_training_overrides(args)
    check_flags(script, args)


def test_every_document_has_commands_checked():
    assert {doc for doc, _ in ALL} >= {"README.md", "docs/training.md", "docs/shard-format.md", "docs/pruning.md",
                                       "docs/evaluation.md", "docs/multinode.md", "docs/benchmarks.md"}
