#!/usr/bin/env bash
# Builds here, where PyPI is reachable, everything a lent GPU machine needs for bench/gpu/run.sh: that machine has
# no network, and its image has torch, triton and transformers but no deepspeed, lm-eval, datasets or zstandard.
# bench/gpu/install_and_run.sh installs the result there and runs every benchmark (docs/benchmarks.md, "On a lent GPU").
#
#   bash bench/gpu/wheels.sh                      # cp312 wheels (the image's Python 3.12) into gpu_wheels/
#   bash bench/gpu/wheels.sh --python-version 3.11 --out /tmp/gpu_wheels311   # another target (the CPU smoke test)
#   bash bench/gpu/wheels.sh --complete           # every pin, for a bare Python (over the size limit)
#   bash bench/gpu/wheels.sh --update-pins        # rewrite bench/gpu/requirements.txt from setup.py and .venv
#
# What it writes into OUT:
#   - shortened-0.1.0-py3-none-any.whl: the project (`pip wheel --no-deps`), built from a copy of the files a `run`
#     call carries (tracked and untracked-not-ignored), so the build leaves no build/ or egg-info in the tree;
#   - one wheel per pin of bench/gpu/requirements.txt's `core` and `eval` lines (every line with --complete):
#     binary wheels downloaded for the target (`pip download --only-binary=:all:` for cpXY, manylinux x86_64);
#     the few that PyPI has only as sdists (deepspeed, rouge-score, sqlitedict, word2number) are built with
#     `pip wheel --no-deps` and must come out pure Python (py3-none-any), which is checked;
#   - shared-data/: a copy of ../shared/data (6 MB). Every section of run.sh reads it (the SlimPajama sample and the
#     LLaMA tokenizer for kernels/throughput, the evaluation mirror for eval, the tokenizer and WikiText-2 for
#     efficiency and the saved random models), and a `run` call carries the repository alone, not ../shared;
#   - requirements.txt and TARGET (the cpXY tag): what install_and_run.sh checks before it installs.
# Everything a `run` call carries (the working tree + this folder) must stay under 64 MiB: the sizes are printed at the
# end and a default build over that fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYVER=3.12
OUT=gpu_wheels
COMPLETE=0
UPDATE_PINS=0
while [ $# -gt 0 ]; do
  case $1 in
    --python-version) PYVER=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --complete) COMPLETE=1; shift ;;
    --update-pins) UPDATE_PINS=1; shift ;;
    -h|--help) sed -n '/^set -euo/q; 2,$p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $PYVER =~ ^3\.[0-9]+$ ]] || { echo "--python-version takes MAJOR.MINOR, e.g. 3.12" >&2; exit 2; }
TAG=cp${PYVER/./}
# The virtualenv of `make setup` is the environment the test suite passes in: its pip downloads, its freeze is the pin
# list's source of truth.
VENV_PY=${VENV_PY:-.venv/bin/python}
REQ=bench/gpu/requirements.txt
LIMIT_MIB=64

# The pin list: setup.py's install_requires and its `gpu` extra, each with the transitive dependencies that .venv
# resolved, at the versions .venv has (`pip freeze`), grouped by what the GPU benchmarks import (measured with an import
# audit over `SMOKE=1 bash bench/gpu/run.sh`, every process of it):
#   core   kernels, throughput and efficiency: bench/train_step.py, bench/efficiency.py, bench/gpu/random_models.py and
#          the trainer they launch (launch/cpt.py: deepspeed, transformers, sentencepiece, zstandard, liger-kernel...)
#   eval   bench/eval_cost.py on top: lm-eval and datasets, minus the `heavy` ones
#   heavy  compiled eval dependencies the GPU image already ships (pyarrow, pandas, scipy, scikit-learn, lxml: they are
#          in its package list) and what only they need: ~110 MB of wheels, carried with --complete only
#   image  required by a carried package, shipped by the image, and either imported by no process of any section (the
#          Hub's xet transfer client, the command-line stack of transformers and huggingface_hub, nltk's joblib,
#          rouge-score's absl-py) or best taken as the image has it (setuptools: torch's JIT extension builds import
#          it); 7.6 MB left out, which keeps a run call ~9 MiB under its limit; carried with --complete. numpy too:
#          a range in setup.py on purpose (the image's torch was built against its numpy), never carried.
#          install_and_run.sh checks that each is there.
# Never listed: torch, triton and nvidia-* (the image's CUDA builds), what only torch needs (sympy, networkx, ...), the
# test and lint tools (setup.py's `dev` extra), and the runtime dependencies no GPU benchmark imports (matplotlib,
# tensorboard, peft, gguf: curves, training logs, LoRA, GGUF import).
pins() {
  "$VENV_PY" - <<'EOF'
import ast
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CORE = ["deepspeed", "transformers", "sentencepiece", "pyyaml", "tqdm", "psutil", "safetensors", "zstandard", "jinja2",
        "liger-kernel", "numpy"]
# accelerate: lm-eval's HFLM imports it (its `hf` extra); cloudpickle: pyarrow imports it when present
EVAL = ["lm-eval", "datasets", "accelerate", "cloudpickle"]
HEAVY = ["pyarrow", "pandas", "scipy", "scikit-learn", "lxml"]
IMAGE_KEEPS = ["hf-xet", "typer", "click", "rich", "setuptools", "absl-py", "joblib"]  # and what only they need
IMAGE = {"torch", "triton"}  # and nvidia-*: never carried, never traversed
TESTS_ONLY = {"pytest", "pytest-timeout", "pytest-xdist", "filelock", "ruff", "mypy", "types-pyyaml"}

tree = ast.parse(open("setup.py").read())
values = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
          if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in
          ("INSTALL_REQUIRES", "EXTRAS")}
declared = {canonicalize_name(r.name): r
            for r in map(Requirement, values["INSTALL_REQUIRES"] + values["EXTRAS"]["gpu"])}
dists = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}


def closure(roots, stop=()):
    seen, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in IMAGE or name.startswith("nvidia-") or name in stop:
            continue
        seen.add(name)
        dist = dists.get(name)
        for spec in (dist.requires or []) if dist else []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


core = closure(CORE, stop=set(IMAGE_KEEPS))
evaluation = closure(EVAL, stop=set(HEAVY + IMAGE_KEEPS)) - core
heavy = closure(EVAL, stop=set(IMAGE_KEEPS)) - core - evaluation
image = closure(CORE + EVAL) - core - evaluation - heavy
missing = sorted(n for n in core | evaluation | heavy | image if n not in dists and n not in declared)
if missing:
    sys.exit(f"not installed in the virtualenv and not pinned in setup.py: {missing} (run `make setup`)")
if (core | evaluation) & TESTS_ONLY - {"filelock"}:  # filelock is huggingface_hub's too, not only the tests'
    sys.exit(f"a test-only package among the carried ones: {sorted((core | evaluation) & TESTS_ONLY)}")

print("# Generated by `bash bench/gpu/wheels.sh --update-pins` from setup.py (install_requires and the gpu extra)")
print("# and the versions .venv resolved for them (pip freeze); the groups are explained in bench/gpu/wheels.sh.")
print("# core: kernels, throughput, efficiency; eval: + bench/eval_cost.py; heavy, image: the GPU image's,")
print("# carried with --complete (every == pin); install_and_run.sh checks that each `image` one is there.")
for group, names in (("core", core), ("eval", evaluation), ("heavy", heavy), ("image", image)):
    for name in sorted(names):
        pin = declared.get(name)
        if pin is not None and not str(pin.specifier).startswith("=="):
            print(f"{name}{pin.specifier}  # image")  # a range: the image's build
            continue
        version = dists[name].version if name in dists else str(pin.specifier)[2:]
        if pin is not None and not pin.specifier.contains(version):
            sys.exit(f"{name}: .venv has {version}, setup.py pins {pin.specifier} (run `make setup`)")
        print(f"{name}=={version}  # {group}")
EOF
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$WORK/pip.log

if [ "$UPDATE_PINS" = 1 ]; then
  pins > "$REQ"
  echo "wrote $REQ ($(grep -c '==' "$REQ") pins)"
  exit 0
fi
# A stale list would ship versions the tests no longer run on: compare it with setup.py and .venv when .venv is here.
if [ -x "$VENV_PY" ] && ! diff <(pins) "$REQ" > "$WORK/pins.diff"; then
  cat "$WORK/pins.diff"
  echo "$REQ differs from setup.py + .venv (above): bash bench/gpu/wheels.sh --update-pins" >&2
  exit 1
fi

GROUPS_RE='# (core|eval)$'
[ "$COMPLETE" = 1 ] && GROUPS_RE='==.*# (core|eval|heavy|image)$'
mapfile -t WANTED < <(grep -E "$GROUPS_RE" "$REQ" | sed 's/ *#.*//')

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Binary wheels for the target: cpXY (and abi3, pure Python) on manylinux x86_64. The GPU image's Python 3.12.3 is
# Ubuntu 24.04's (glibc 2.39) and this box has glibc 2.36 (the 3.11 smoke test installs here): any manylinux up to 2_35
# runs on both; the oldest comes first, so pip takes the most portable file when a release has several.
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
for n in $(seq 24 35); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform any)
BINARY=("${WANTED[@]}")
SDIST=()
# pip stops at the first pin with no binary for the target; such a pin moves to the sdist list and pip runs again.
while true; do
  printf '%s\n' "${BINARY[@]}" > "$WORK/binary.txt"
  if "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --abi "$TAG" "${PLATFORMS[@]}" -d "$OUT" -r "$WORK/binary.txt" > "$LOG" 2>&1; then
    break
  fi
  miss=$(sed -n 's/.*No matching distribution found for \([^ ]*\)$/\1/p' "$LOG" | head -1)
  # anything else (the network, a pin pip cannot parse), or a pin pip names twice: stop with pip's own words
  if [ -z "$miss" ] || printf '%s\n' "${SDIST[@]}" | grep -q -x -F "$miss"; then
    grep -v 'is ignored: it is neither' "$LOG" >&2
    exit 1
  fi
  SDIST+=("$miss")
  mapfile -t BINARY < <(printf '%s\n' "${BINARY[@]}" | grep -v -x -F "$miss")
done
# sdist-only pins: a wheel built here runs there only if it is pure Python.
for pin in "${SDIST[@]}"; do
  "$VENV_PY" -m pip wheel -q --no-deps -w "$WORK/built" "$pin" > "$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
done
for whl in "$WORK"/built/*.whl; do
  [ -e "$whl" ] || continue
  case $whl in
    *-none-any.whl) mv "$whl" "$OUT/" ;;
    *) echo "$(basename "$whl"): built from an sdist for this box's Python, it would not run on $TAG" >&2; exit 1 ;;
  esac
done

# The files a `run` call carries besides the folders it is told to carry: tracked and untracked-not-ignored, as on disk.
travelling() {
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done
}
# The project from exactly those files (the working tree, edits included).
mkdir -p "$WORK/src"
travelling | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
"$VENV_PY" -m pip wheel -q --no-deps -w "$WORK/project" "$WORK/src" > "$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
project=$(basename "$WORK"/project/*.whl)
mv "$WORK/project/$project" "$OUT/"
IFS=- read -r project_name project_version _ <<< "$project"

# Only this build's wheels stay: a wheel of an older pin left in OUT would be a second version of one package.
"$VENV_PY" - "$OUT" "${WANTED[@]}" "$project_name==$project_version" <<'EOF'
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

out, pins = Path(sys.argv[1]), sys.argv[2:]
wanted = {(canonicalize_name(p.split("==")[0]), p.split("==")[1]) for p in pins if "==" in p}
have = {}
for whl in sorted(out.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    key = (canonicalize_name(name), str(version))
    if key not in wanted:
        print(f"removed {whl.name}: not in this build's pins")
        whl.unlink()
    else:
        have[key] = whl.name
missing = sorted(f"{n}=={v}" for n, v in wanted - set(have))
if missing:
    sys.exit(f"no wheel for {missing}")
EOF

[ -d ../shared/data ] || { echo "no ../shared/data beside the repository: every GPU section reads it" >&2; exit 1; }
rm -rf "$OUT/shared-data"
cp -r ../shared/data "$OUT/shared-data"
cp "$REQ" "$OUT/requirements.txt"
echo "$TAG" > "$OUT/TARGET"

echo "wrote $OUT for $TAG:"
find "$OUT" -maxdepth 1 -name '*.whl' -printf '  %f\n' | sort
echo "  shared-data/ ($(du -sh "$OUT/shared-data" | cut -f1)), requirements.txt, TARGET"
[ "${#SDIST[@]}" -gt 0 ] && echo "built from sdists: ${SDIST[*]}"
wheels=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
folder=$(du -sb "$OUT" | cut -f1)
tree=$(travelling | du -cb --files0-from=- | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
count=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
echo "sizes: $count wheels $(mib "$wheels"), the folder $(mib "$folder"); with the working tree ($(mib "$tree"))" \
  "a run call carries $(mib $((folder + tree))) of its $LIMIT_MIB MiB"
if [ $((folder + tree)) -gt $((LIMIT_MIB * 1048576)) ]; then
  if [ "$COMPLETE" = 1 ]; then
    echo "over the limit: a --complete wheelhouse is for a machine with no image packages, not for a run call" >&2
  else
    echo "over the $LIMIT_MIB MiB a run call carries" >&2
    exit 1
  fi
fi
