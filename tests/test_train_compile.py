"""Kernel choices (shortened/train/kernels.py): `train.compile` on 2 CPU ranks with DeepSpeed ZeRO-2 against the eager
run, through a save and a resume and with a teacher; `model.liger` refused where it cannot run.

Compiling costs each rank tens of seconds the first time on this box (inductor's C++ kernels, cached on disk in
/tmp/torchinductor_$USER after that), so the runs are the tiny trainer-test model for as few steps as the
acceptance allows: 8 compiled steps, saved at 4 and 8, resumed for 4 more.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shortened.config import ConfigError, ModelConfig
from shortened.modeling import build_tiny_llama, save_with_tokenizer
from shortened.train import checkpoint as ckpt
from shortened.train.kernels import LIGER_REQUIREMENT, check_kernels, compile_blocks_of, set_fp32_matmul_precision

from train_support import HALF, ROOT, Job, overrides, python, read_log, warm

pytestmark = pytest.mark.timeout(900)
STEPS = HALF + 4  # 8 compiled steps, then 4 more after the resume
COMPILE_TIMEOUT_S = 600
REL = 1e-4  # inductor fuses the elementwise work of a block: float rounding, not another computation
DISTILL = ("distill.kd_weight=1.0", "distill.ce_weight=0.5", "distill.temperature=2.0", "distill.chunk_size=48")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_compile")


def run(work: Path, name: str, shards: Path, model: Path, *extra: str) -> Path:
    run_dir = work / name
    finished(warm(2, overrides(run_dir, shards, model, *extra), work / f"{name}.out"))
    return run_dir


def finished(job: Job) -> str:
    """run_ok with room for a cold compilation on a loaded box (minutes per rank, once)."""
    code = job.wait(timeout=COMPILE_TIMEOUT_S)
    assert code == 0, f"job failed (rc {code}):\n{job.output()[-6000:]}"
    return job.output()


def losses_match(run: list[dict], reference: list[dict], keys=("loss",)) -> None:
    assert [r["step"] for r in run] == [r["step"] for r in reference]
    for a, b in zip(run, reference):
        assert a["sample_ids"] == b["sample_ids"] and a["tokens"] == b["tokens"]
        assert all(a[k] == pytest.approx(b[k], rel=REL) for k in keys), (a, b)


def module_names(run_dir: Path, step: int) -> tuple[set[str], set[str]]:
    """The parameter names of a checkpoint's DeepSpeed module state and of its Hugging Face copy (model/)."""
    path = ckpt.checkpoints_root(run_dir) / ckpt.tag_for(step)
    states = torch.load(path / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    with safe_open(str(path / "model" / "model.safetensors"), "pt") as weights:
        return set(states["module"]), set(weights.keys())


def test_compiled_blocks_train_as_eager_on_two_ranks_through_a_save_and_a_resume(work, train_shards_64,
                                                                                  tiny_init_model):
    eager = run(work, "eager", train_shards_64, tiny_init_model, f"train.max_steps={STEPS}")
    compiled = run(work, "compiled", train_shards_64, tiny_init_model, "train.compile=true",
                   f"train.max_steps={HALF}")
    assert "2 decoder blocks compiled with torch.compile" in (work / "compiled.out").read_text()
    assert {c.step for c in ckpt.scan(ckpt.checkpoints_root(compiled))[0]} == {4, HALF}
    # The compiled module keeps the eager names: no `_orig_mod.` in what resumes, exports and evaluates read.
    assert module_names(compiled, HALF) == module_names(eager, HALF)
    output = finished(warm(2, overrides(compiled, train_shards_64, tiny_init_model, "train.compile=true",
                                        f"train.max_steps={STEPS}"), work / "compiled_resumed.out"))
    assert f"step {HALF}" in output
    losses_match(read_log(compiled), read_log(eager))


def test_compiled_distillation_matches_eager(work, train_shards_64, tiny_init_model, tokenizer_model):
    teacher = save_with_tokenizer(build_tiny_llama(seed=7, num_layers=3), work / "teacher", tokenizer_model)
    kd = (f"distill.teacher={teacher}", *DISTILL, "train.max_steps=4")
    eager = run(work, "kd_eager", train_shards_64, tiny_init_model, *kd)
    compiled = run(work, "kd_compiled", train_shards_64, tiny_init_model, *kd, "train.compile=true")
    losses_match(read_log(compiled), read_log(eager), keys=("loss", "kd_loss", "ce_loss"))


def test_liger_is_refused_on_a_cpu_rank_with_one_error_line(work, train_shards_64, tiny_init_model):
    job = python(overrides(work / "liger", train_shards_64, tiny_init_model, "model.liger=true"), work / "liger.out")
    assert job.wait() == 2
    errors = [line for line in job.output().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.liger=true" in errors[0] and "CUDA" in errors[0], job.output()[-3000:]


def test_kernel_settings_that_cannot_run_are_refused_before_loading(monkeypatch):
    assert f'"{LIGER_REQUIREMENT}"' in (ROOT / "setup.py").read_text()  # the message names the pinned extra
    with pytest.raises(ConfigError, match="model.liger=true: .*CUDA GPUs only"):
        check_kernels(ModelConfig(liger=True), False, torch.device("cpu"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"Liger-Kernel is not installed; .*\.\[gpu\]"):
        check_kernels(ModelConfig(liger=True), False, torch.device("cuda", 0))
    # inductor's own patch, not monkeypatch: monkeypatch's undo deletes a config entry reached through
    # `config.cpp` (a proxy), and every later compile in the worker then fails on the missing `cpp.cxx`
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), \
            pytest.raises(ConfigError, match="train.compile=true: torch.compile needs a C\\+\\+ compiler"):
        check_kernels(ModelConfig(), True, torch.device("cpu"))


@pytest.mark.parametrize("tf32", [True, False])
def test_train_tf32_sets_cuda_fp32_matmuls_and_leaves_a_cpu_rank_alone(tf32):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        set_fp32_matmul_precision(torch.device("cpu"), tf32)
        assert (matmul.fp32_precision, conv.fp32_precision) == before
        set_fp32_matmul_precision(torch.device("cuda", 0), tf32)  # the flags are process state, set without a GPU
        assert matmul.fp32_precision == conv.fp32_precision == ("tf32" if tf32 else "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_compiling_the_blocks_keeps_every_parameter_name():
    model = build_tiny_llama(seed=0, num_layers=2)
    names = list(model.state_dict())
    compile_blocks_of(model)
    assert list(model.state_dict()) == names and all(block._compiled_call_impl is not None
                                                     for block in model.model.layers)
