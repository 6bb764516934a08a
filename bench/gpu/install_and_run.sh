#!/usr/bin/env bash
# On a lent GPU machine (no network), from the repository root: installs the wheelhouse that bench/gpu/wheels.sh built
# where PyPI is reachable, then runs every GPU benchmark (bench/gpu/run.sh). One command for a `run` call that carries
# the wheelhouse (docs/benchmarks.md, "On a lent GPU"):
#
#   bash bench/gpu/install_and_run.sh gpu_wheels $OUT                # carry ["gpu_wheels"]
#   ONLY=kernels bash bench/gpu/install_and_run.sh gpu_wheels $OUT   # some sections (run.sh's ONLY)
#   PYTHON=/tmp/gpuimage/bin/python SMOKE=1 bash bench/gpu/install_and_run.sh /tmp/gpu_wheels311 /tmp/gpu_smoke
#
# Installs with `pip install --no-deps --no-index` every wheel except those already installed at the same version, so
# the image's torch, triton and CUDA packages stay (the wheelhouse has none) and a rerun installs nothing. Packages the
# image has at another version (transformers, tokenizers, huggingface_hub...) are replaced by our pins, which the tests
# run on; each replacement is printed. `pip check` is printed, not fatal: the image holds packages we never import.
# A section whose imports fail after the install (eval, when the image lacks pyarrow or pandas: the wheelhouse leaves
# those big compiled wheels to the image) is skipped with the reason, in the output and in the report.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d "${1:-gpu_wheels}" ] || { echo "no wheelhouse ${1:-gpu_wheels}: bash bench/gpu/wheels.sh builds it" >&2; exit 1; }
WHEELS=$(cd "${1:-gpu_wheels}" && pwd)
OUT=${2:-bench_out/gpu}
# The image's python3 is the one that holds its CUDA torch; run.sh's own default (`python`) may not exist there.
PY=${PYTHON:-python3}
PY=$(command -v "$PY") || { echo "no ${PYTHON:-python3} here: name the interpreter with PYTHON=..." >&2; exit 1; }
export PYTHON=$PY
# Activate the interpreter's bin folder as a virtualenv would: the `deepspeed` launcher the benchmarks start and the
# `ninja` that DeepSpeed's and Triton's JIT builds call are installed there.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
# Nothing from the network, no machine pip config (its index URLs), no cache: the install reads the wheelhouse alone.
export PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore
# The travelled tree is the code to measure: it wins over the project wheel, a snapshot from when wheels.sh ran.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

SECTIONS=${ONLY:-kernels throughput eval efficiency}
for section in $SECTIONS; do
  case $section in kernels|throughput|eval|efficiency) ;; *) echo "unknown section $section" >&2; exit 2 ;; esac
done

target=$(cat "$WHEELS/TARGET")
have=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
if [ "$target" != "$have" ]; then
  echo "$WHEELS holds $target wheels, $PY is $have: bash bench/gpu/wheels.sh --python-version ${have:2:1}.${have:3}" >&2
  exit 1
fi

# Which wheels to install: those not installed at the same version. Plain Python (no packaging import: the image's
# may be about to be replaced).
started=$(date +%s)
todo=$(mktemp)
trap 'rm -f "$todo"' EXIT
"$PY" - "$WHEELS" > "$todo" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

wheels = Path(sys.argv[1])


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def same(a, b):  # PEP 440 equality without packaging: 0.8 == 0.8.0; a local label (+cu130) is another build
    a, b = a.lower().lstrip("v"), b.lower().lstrip("v")
    strip = lambda v: re.sub(r"(\.0+)+(?=$|[a-z+])", "", v)  # noqa: E731
    return strip(a) == strip(b)


installed = {}
for dist in md.distributions():
    installed.setdefault(canon(dist.metadata["Name"] or ""), dist.version)
keep, replaced, new = [], [], []
for whl in sorted(wheels.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    name = canon(name)
    if name in ("torch", "triton") or name.startswith("nvidia-"):
        print(f"not installed: {whl.name} (the image's CUDA build stays)", file=sys.stderr)
        continue
    if name in installed and same(installed[name], version):
        keep.append(name)
        continue
    (replaced if name in installed else new).append((name, installed.get(name), version))
    print(whl)
for name, old, version in replaced:
    if name == "transformers":
        print(f"transformers: the image has {old}, installing our pin {version}: the code is tested on {version}",
              file=sys.stderr)
if keep:
    print(f"already installed at the same version ({len(keep)}): {' '.join(keep)}", file=sys.stderr)
if replaced:
    print(f"replacing the image's ({len(replaced)}): " + ", ".join(f"{n} {o} -> {v}" for n, o, v in replaced),
          file=sys.stderr)
if new:
    print(f"new ({len(new)}): " + " ".join(f"{n}=={v}" for n, _, v in new), file=sys.stderr)
EOF
wheels=()
if [ -s "$todo" ]; then
  mapfile -t wheels < "$todo"
  "$PY" -m pip install -q --no-deps --no-index --no-compile "${wheels[@]}"
fi
echo "installed ${#wheels[@]} wheel(s) from $WHEELS in $(($(date +%s) - started)) s"

# What the wheelhouse leaves to the image (requirements.txt's `image` lines): checked, not installed. A range (numpy)
# must hold; a pin only names the version the tests run on, the image's own serves (wheels.sh says why each).
"$PY" - "$WHEELS/requirements.txt" <<'EOF' || true
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

absent = []
for line in open(sys.argv[1]):
    if line.rstrip().endswith("# image"):
        req = Requirement(line.split("#")[0])
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            absent.append(req.name)
            continue
        if not str(req.specifier).startswith("==") and not req.specifier.contains(version, prereleases=True):
            print(f"warning: the image's {req.name} {version} is outside {req.specifier}")
if absent:
    print(f"left to the image but not installed (no section imports them, except numpy): {' '.join(absent)}")
EOF
# Version conflicts are worth seeing, not stopping for: most concern image packages no benchmark imports.
if ! check=$("$PY" -m pip check 2>&1); then
  echo "pip check (not fatal), $(echo "$check" | wc -l) line(s):"
  echo "$check" | head -40 | sed 's/^/  /'
fi

# The data every section reads sits beside the repository (../shared/data); a run call carries the repository alone,
# so the wheelhouse brings a copy (wheels.sh) and it is linked where the benchmarks look.
if [ ! -e ../shared/data ]; then
  [ -d "$WHEELS/shared-data" ] || { echo "no ../shared/data and no $WHEELS/shared-data" >&2; exit 1; }
  mkdir -p ../shared
  ln -s "$WHEELS/shared-data" ../shared/data
  echo "linked ../shared/data -> $WHEELS/shared-data"
fi

# Each section's imports, tried before it runs; a section that cannot import is skipped with the reason.
declare -A PROBE=(
  [kernels]="import deepspeed, transformers, sentencepiece, zstandard, yaml, psutil, shortened.train.loop"
  [throughput]="import deepspeed, transformers, sentencepiece, zstandard, yaml, psutil, shortened.train.loop"
  [eval]="import lm_eval, datasets, pyarrow, accelerate, shortened.eval.suite, lm_eval.models.huggingface"
  [efficiency]="import transformers, sentencepiece, psutil, tqdm, shortened.prune.hf_model"
)
run=() skipped=()
for section in $SECTIONS; do
  if [ "${PROBE[$section]}" = "${PROBE[kernels]}" ] && [ ${#run[@]} -gt 0 ] && [ "${run[-1]}" = kernels ]; then
    run+=("$section")  # the same imports as kernels, which just passed
  elif why=$("$PY" -c "${PROBE[$section]}" 2>&1); then
    run+=("$section")
  else
    why=$(echo "$why" | grep -E 'Error|error' | tail -1)
    echo "skipping $section: ${why:-its imports failed}"
    skipped+=("$section: ${why:-its imports failed}")
  fi
done
[ ${#run[@]} -gt 0 ] || { echo "no section can run" >&2; exit 1; }
ONLY="${run[*]}" bash bench/gpu/run.sh "$OUT"
if [ ${#skipped[@]} -gt 0 ]; then
  { echo "### Skipped"; echo; printf -- '- %s\n' "${skipped[@]}"; echo; } >> "$OUT/gpu-benchmarks.md"
fi
