"""No stale instructions: every command in README.md, docs/ and docker/README.md names a script that exists, only
flags that script accepts, and (for training) a recipe and overrides that load. The demo and the other tests run
the main commands for real; this keeps the rest of the documentation honest."""
from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from shortened.config import ConfigError, RunConfig, load_config

import warm_start
from conftest import ROOT, subprocess_env

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
def accepted_flags(script: str) -> frozenset[str]:
    """The option strings of `script --help` (argparse lists each in its usage and options), matched exactly:
    `--calib` is not accepted because `--calib-len` is."""
    result = warm_start.run([ROOT / script, "--help"], cwd=ROOT, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))


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
    flags = accepted_flags(script)
    for arg in args:
        flag = arg.split("=")[0]
        if flag.startswith("--") and flag not in flags:
            raise AssertionError(f"{script} does not accept {flag} (it accepts {', '.join(sorted(flags))})")


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
        check_docker(doc, tokens)
        return
    check_command(doc, cmd, tokens)


def check_command(doc: str, cmd: str, tokens: list[str]) -> None:
    program = Path(tokens[0]).name if tokens else ""
    found = python_script(tokens)
    if found is None:
        assert program not in LAUNCHERS and "python" not in program, f"{doc}: cannot find the script in {cmd!r}"
        return  # shell plumbing (mv, cd, ...)
    script, args = found
    assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
    if script == "launch/supervise.py":  # its own flags, then the launcher command it supervises
        assert "--" in args, f"{doc}: supervise.py takes the launcher command after --"
        check_flags(script, args[:args.index("--")])
        check_command(doc, cmd, args[args.index("--") + 1:])
        return
    if script in ("launch/cpt.py", "launch/slurm/cpt.sbatch"):
        check_training_overrides(args)
    check_flags(script, args)


DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE = "shortened"
# `docker run` options that take a value (the image is the first word after the options)
DOCKER_VALUE_OPTIONS = {"-v", "--volume", "-e", "--env", "--gpus", "--ulimit", "--shm-size", "--entrypoint", "--name",
                        "-w", "--workdir", "--network", "--ipc", "-p", "--mount", "--user", "-u"}


def check_docker(doc: str, tokens: list[str]) -> None:
    """`docker build` names the Dockerfile and its build args; `docker run` runs the image built there, and the
    command inside it (after the image's entry point, or `--entrypoint`) is checked like any other."""
    text = DOCKERFILE.read_text()
    if tokens[1] == "build":
        assert (ROOT / tokens[tokens.index("-f") + 1]).resolve() == DOCKERFILE, f"{doc}: {tokens}"
        assert tokens[tokens.index("-t") + 1].split(":")[0] == IMAGE, f"{doc}: the image is tagged {IMAGE}"
        for i, token in enumerate(tokens):
            if token == "--build-arg":
                name = tokens[i + 1].split("=")[0]
                assert re.search(rf"^ARG {name}\b", text, flags=re.M), f"{doc}: the Dockerfile has no ARG {name}"
        return
    assert tokens[1] == "run", f"{doc}: docker {tokens[1]} is not checked"
    i, entrypoint = 2, json_entrypoint(text)
    while tokens[i].startswith("-"):
        option = tokens[i].split("=")[0]
        if option == "--entrypoint":
            entrypoint = [tokens[i + 1]]
        i += 2 if option in DOCKER_VALUE_OPTIONS and "=" not in tokens[i] else 1
    assert tokens[i].split(":")[0] == IMAGE, f"{doc}: docker run of {tokens[i]}, not the {IMAGE} image"
    inner = [*entrypoint, *tokens[i + 1:]]
    check_command(doc, " ".join(inner), inner)


def json_entrypoint(dockerfile: str) -> list[str]:
    import json

    found = re.search(r"^ENTRYPOINT (\[.*\])", dockerfile, flags=re.M)
    assert found, "the Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(found.group(1))


def test_docker_commands_are_checked_for_real():
    with pytest.raises(AssertionError, match="does not accept --no-such-flag"):
        check_docker("x", words("docker run --rm shortened:latest --num_gpus 8 launch/cpt.py --config "
                                "configs/cpt/tiny-cpu.yaml --no-such-flag"))
    with pytest.raises(AssertionError, match="no ARG NOPE"):
        check_docker("x", words("docker build --build-arg NOPE=1 -f docker/Dockerfile -t shortened ."))
    with pytest.raises(AssertionError, match="does not exist"):
        check_docker("x", words("docker run --entrypoint python shortened launch/nothing.py"))


def test_flags_are_matched_exactly_not_as_prefixes():
    with pytest.raises(AssertionError, match="does not accept --calib-sam "):  # a prefix of --calib-samples
        check_flags("launch/prune.py", ["--calib-sam", "4"])


def test_every_document_has_commands_checked():
    assert {doc for doc, _ in ALL} >= {"README.md", "docs/training.md", "docs/shard-format.md", "docs/pruning.md",
                                       "docs/evaluation.md", "docs/multinode.md", "docs/benchmarks.md"}
