"""Launching the trainer for the distributed tests: as users do (a launcher, cold), or with its ranks forked warm
(tests/warm_start.py); jobs in their own sessions, always cleaned up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from shortened.train.engine import cpu_has_bf16_kernels

from conftest import free_port, subprocess_env
from warm_start import WarmGroup, WarmProcess

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "cpt" / "tiny-cpu.yaml"
CPT = ROOT / "launch" / "cpt.py"
HOOK_SCRIPT = ROOT / "tests" / "train_hook_script.py"
BIN = Path(sys.executable).parent
STEPS, HALF, GLOBAL_BATCH, SEQ = 16, 8, 4, 64
JOB_TIMEOUT = 240
# The recipes train in bf16, but a CPU without AVX-512 emulates it ~5.8x slower (BENCHMARKS.md). There the
# precision-agnostic trainer tests (faults, signals, world-size change, hooks) train in fp32, and
# test_train_bf16.py keeps one bf16 resume-parity test and one bf16 export test.
PRECISION = "bf16" if cpu_has_bf16_kernels() else "fp32"


# ---------------------------------------------------------------------------------------------- running jobs


def overrides(run_dir: Path, shards: Path, model: Path, *extra: str) -> list[str]:
    """The tiny-cpu recipe shrunk further: 2-layer model, 4 x 64-token sequences per step, 16 steps."""
    return [f"model.init_from={model}", f"data.path={shards}", f"data.seq_len={SEQ}", "data.num_workers=0",
            f"train.precision={PRECISION}",
            f"train.global_batch_size={GLOBAL_BATCH}", "train.micro_batch_size=1",
            f"train.max_tokens={STEPS * GLOBAL_BATCH * SEQ}", "train.dist_timeout_s=60", "optim.lr=3e-3",
            "optim.warmup_steps=2", "checkpoint.every_steps=4", "log.tensorboard=false", "log.sample_ids=true",
            f"run_dir={run_dir}", *extra]


class Job:
    """A launched training job in its own session, so cleanup can always reach every process it started.

    `cmd` is a launcher's command line, started cold as users start it; with `warm_ranks` it is the script and its
    arguments, run by one process forked warm (tests/warm_start.py) per entry, with the entry's variables."""

    def __init__(self, cmd: list, out: Path, script: Path = CPT, warm_ranks: list[dict[str, str]] | None = None,
                 **env: str) -> None:
        self.out = out
        self.script = str(script)
        self.handle = open(out, "w")
        self.started = time.monotonic()
        self.port: int | None = None  # the launcher's master port, where the test chose it
        environ = subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
        if warm_ranks:
            self.proc: subprocess.Popen | WarmGroup = WarmGroup([WarmProcess(cmd, {**environ, **variables}, ROOT, out)
                                                                 for variables in warm_ranks])
        else:
            self.proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=self.handle,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=environ)

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def output(self) -> str:
        return self.out.read_text()

    def ranks(self) -> dict[int, psutil.Process]:
        """The training processes by rank: launched with RANK set by a parent that has none (DataLoader workers
        inherit RANK from their rank; the launchers themselves have none)."""
        if isinstance(self.proc, WarmGroup):
            return {rank: psutil.Process(process.pid) for rank, process in enumerate(self.proc.ranks)
                    if process.poll() is None}
        found = {}
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if self.script in proc.cmdline() and "RANK" in proc.environ() \
                        and "RANK" not in proc.parent().environ():
                    found[int(proc.environ()["RANK"])] = proc
            except psutil.NoSuchProcess:
                continue
        return found

    def wait_for(self, predicate, what: str, timeout: float = JOB_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc {self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            if isinstance(self.proc, WarmGroup):
                self.proc.kill()
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started, and only it
                self.proc.wait()
        self.handle.close()


def deepspeed(nproc: int, args: list[str], out: Path, script: Path = CPT, **env: str) -> Job:
    port = free_port()
    job = Job([BIN / "deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), script,
               "--config", RECIPE, *args], out, script, **env)
    job.port = port
    return job


def warm(nproc: int, args: list[str], out: Path, script: Path = CPT, **env: str) -> Job:
    """The job as `deepspeed` or `torchrun` would run it, its ranks forked warm: for tests of the training, not of
    the launchers (those start them cold)."""
    port = free_port()
    job = Job([script, "--config", RECIPE, *args], out, script, [rank_variables(rank, nproc, port)
                                                                 for rank in range(nproc)], **env)
    job.port = port
    return job


def rank_variables(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def shm_left(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce segments of the job on `port` still in /dev/shm (RAM)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def python(args: list[str], out: Path) -> Job:
    """One process, no launcher: a world of one (forked warm, none of a launcher's variables)."""
    return Job([CPT, "--config", RECIPE, *args], out, warm_ranks=[{}])


def run_ok(job: Job) -> str:
    rc = job.wait()
    text = job.output()
    assert rc == 0, f"job failed (rc {rc}):\n{text[-6000:]}"
    return text


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def same(a: dict, b: dict, keys=("step", "tokens", "loss", "lr", "grad_norm", "sample_ids")) -> bool:
    return all(a[k] == b[k] for k in keys)


def close(a: dict, b: dict, rel: float) -> bool:
    return a["sample_ids"] == b["sample_ids"] and abs(a["loss"] - b["loss"]) <= rel * abs(b["loss"])


def check_export_reproduces_the_master_weights(checkpoint: Path, work: Path, init_model: Path, shards_dir: Path,
                                               tokenizer_model: Path) -> None:
    """`launch/export_hf.py` in the training precision gives the logits of the fp32 master weights (an independent
    source: the ranks' ZeRO shards) rounded to that precision, as the optimizer does after every step; `--dtype fp32`
    gives the masters themselves."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortened.data.shards import PackedShards
    from shortened.train.cli import export_main
    from shortened.train.export import master_weights

    state = json.loads((checkpoint / "training_state.json").read_text())
    dtype = torch.bfloat16 if state["precision"] == "bf16" else torch.float32
    out = work / f"exported_{checkpoint.name}"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert next(exported.parameters()).dtype == dtype
    assert (out / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    masters = master_weights(checkpoint)
    trained = AutoModelForCausalLM.from_pretrained(init_model, dtype=dtype).eval()
    untrained_head = trained.lm_head.weight.clone()
    trained.load_state_dict({name: tensor.to(dtype) for name, tensor in masters.items()})
    assert not torch.equal(trained.lm_head.weight, untrained_head)  # training moved the weights
    shards = PackedShards(shards_dir)
    ids = torch.stack([torch.from_numpy(shards[i]) for i in (0, 17, 4242)])
    with torch.no_grad():
        logits = trained(input_ids=ids).logits
        assert torch.equal(exported(input_ids=ids).logits, logits)
        copy = AutoModelForCausalLM.from_pretrained(checkpoint / "model", dtype="auto").eval()
        assert torch.equal(copy(input_ids=ids).logits, logits)  # the trainer's own model/ copy agrees
    fp32_out = work / f"exported_fp32_{checkpoint.name}"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(fp32_out), "--dtype", "fp32"]) == 0
    fp32 = AutoModelForCausalLM.from_pretrained(fp32_out, dtype="auto")
    assert all(torch.equal(p, masters[name]) for name, p in fp32.state_dict().items())
