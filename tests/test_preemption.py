"""A scheduler's stop signal returns only after every rank's checkpoint is complete, with exit 0.

SLURM, `docker stop` and Kubernetes signal the job's command or its process group and tear the job down once the
command returns. Each test here starts a documented launch path in a session of its own, signals it the way a
scheduler does, and checks that the command returned after `complete.json` was written and after every process
of the job had exited. Rank 0's save is held 6 s by a failpoint so a too-early return cannot go unnoticed
(bare `deepspeed` returns in 0.1 s, ~8 s before the marker).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from shortened.train import supervise

from conftest import free_port
from train_support import BIN, CPT, RECIPE, ROOT, Job, overrides, read_log

pytestmark = pytest.mark.timeout(300)
SUPERVISE = ROOT / "launch" / "supervise.py"
SBATCH = ROOT / "launch" / "slurm" / "cpt.sbatch"
SLOW_SAVE = "checkpoint.after_engine_save:rank=0:sleep={seconds}"
TAG = "SHORTENED_PREEMPTION_TEST"  # in every process of a test's job, so leftovers can be found and ended


# ---------------------------------------------------------------------------------------------- helpers


def job_overrides(run_dir: Path, shards: Path, model: Path, *extra: str) -> list[str]:
    """The shrunk tiny recipe in fp32 (fast on any CPU), 64 steps so the signal lands mid-run, and no periodic
    checkpoint: the only save the failpoint slows down is the one the stop asks for."""
    return overrides(run_dir, shards, model, "train.precision=fp32", f"train.max_tokens={64 * 4 * 64}",
                     "checkpoint.every_steps=1000", *extra)


class Tagged(Job):
    """A job whose every process carries a tag in its environment, so the test finds them all (also those
    the launcher started in sessions of their own) and ends whatever is left."""

    def __init__(self, cmd: list, out: Path, save_s: float = 6, **env: str) -> None:
        self.tag = uuid.uuid4().hex
        super().__init__(cmd, out, SHORTENED_FAILPOINT=SLOW_SAVE.format(seconds=save_s), **{TAG: self.tag}, **env)

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(TAG) == self.tag and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def cleanup(self) -> None:
        for proc in self.processes():
            proc.kill()
        super().cleanup()


def supervised(launcher: list, args: list[str], out: Path, save_s: float = 6) -> Tagged:
    return Tagged([sys.executable, SUPERVISE, "--", *launcher, CPT, "--config", RECIPE, *args], out, save_s)


def deepspeed_cmd() -> list:
    return [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]


def torchrun_cmd() -> list:
    return [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())]


def stop_like_a_scheduler(job: Tagged, run_dir: Path, signum: int = signal.SIGTERM, everyone: bool = False) -> dict:
    """At step 2, signal the command's process group (with `everyone`: every process of the job, as SLURM's
    cgroup-wide signal does); record what was there the moment the command returned."""
    log = run_dir / "train_log.jsonl"
    job.wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, "step 2")
    signalled = time.time()
    if everyone:
        for proc in job.processes():
            proc.send_signal(signum)
    else:
        os.killpg(job.proc.pid, signum)
    try:
        rc = job.proc.wait(timeout=200)
        returned = time.time()
        markers = sorted(run_dir.glob("checkpoints/step_*/complete.json"))
        left = job.processes()
    finally:
        job.cleanup()
    return {"rc": rc, "signalled": signalled, "returned": returned, "markers": markers, "left": left,
            "output": job.output(), "seconds": returned - signalled}


def assert_returned_after_the_checkpoint(result: dict) -> int:
    """The stop step, after checking: exit 0, a marker written after the signal and before the return, and
    no process of the job left."""
    output = result["output"][-5000:]
    assert result["rc"] == 0, output
    assert result["markers"], f"the command returned before any complete.json existed:\n{output}"
    marker = result["markers"][-1]
    written = json.loads(marker.read_text())["time"]
    assert result["signalled"] <= written <= marker.stat().st_mtime <= result["returned"], output
    assert not result["left"], f"still running when the command returned: {result['left']}\n{output}"
    assert "failpoint checkpoint.after_engine_save" in result["output"]  # the save really was held up
    return int(marker.parent.name.split("_")[1])


# ---------------------------------------------------------------------------------------------- launch paths


def test_torchrun_under_the_supervisor_returns_after_the_checkpoint(tmp_path, train_shards_64, tiny_init_model):
    run_dir = tmp_path / "run"
    args = job_overrides(run_dir, train_shards_64, tiny_init_model)
    result = stop_like_a_scheduler(supervised(torchrun_cmd(), args, tmp_path / "stop.out"), run_dir, signal.SIGUSR1)
    assert_returned_after_the_checkpoint(result)
    assert "stopped by SIGUSR1" in result["output"]


def test_a_signal_to_every_process_outlasts_deepspeeds_30_s_kill(tmp_path, train_shards_64, tiny_init_model):
    """SLURM signals every process of a step (proctrack/cgroup): DeepSpeed's node launcher, hit directly,
    would SIGKILL ranks still saving after 30 s. Frozen by the supervisor, it cannot."""
    run_dir = tmp_path / "run"
    args = job_overrides(run_dir, train_shards_64, tiny_init_model, "data.num_workers=1")
    job = supervised(deepspeed_cmd(), args, tmp_path / "stop.out", save_s=35)
    result = stop_like_a_scheduler(job, run_dir, everyone=True)
    assert_returned_after_the_checkpoint(result)
    assert result["seconds"] >= 35


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_the_sbatch_script_returns_after_the_checkpoint(launcher, tmp_path, train_shards_64, tiny_init_model):
    """The batch script on this machine, as SLURM would start it on one node: `scontrol` answers localhost,
    and for the torchrun mode a stand-in `srun` runs its one task in place (the real one forwards SIGUSR1 to
    its tasks, which is what the script's trap sends it)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "run"
    job = Tagged(["bash", SBATCH, RECIPE, *job_overrides(run_dir, train_shards_64, tiny_init_model)],
                 tmp_path / "job.out", LAUNCHER=launcher, GPUS_PER_NODE="2", PYTHON=sys.executable,
                 MASTER_PORT=str(free_port()), SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
                 SLURM_NNODES="1", PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}")
    result = stop_like_a_scheduler(job, run_dir)  # scancel --full / preemption: the batch shell and all below it
    stopped = assert_returned_after_the_checkpoint(result)
    if launcher == "torchrun":
        return
    # The deepspeed mode is `python launch/supervise.py -- deepspeed ...`, the Docker image's entry point too: the
    # supervisor waited for the held save, and the same command again resumes from that checkpoint.
    assert result["seconds"] >= 6
    # The scheduler's SIGTERM reaches the supervisor twice: directly (it is in the script's process group) and as the
    # script trap's SIGUSR1. Python runs pending handlers in signal-number order, so a loaded machine that delivers
    # both before the supervisor runs reports SIGUSR1 (10) before SIGTERM (15); either is the same stop.
    assert re.search(rf"supervise: stopped by SIG(TERM|USR1): {re.escape(str(run_dir / 'checkpoints'))}",
                     result["output"]), result["output"][-3000:]
    rerun = supervised(deepspeed_cmd(), [*job_overrides(run_dir, train_shards_64, tiny_init_model),
                                         f"train.max_steps={stopped + 1}"], tmp_path / "rerun.out")
    assert rerun.wait() == 0, rerun.output()[-4000:]
    assert f"step_{stopped:08d}" in rerun.output() and "resuming from" in rerun.output()
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, stopped + 2))


# ---------------------------------------------------------------------------------------------- the pieces


def test_the_run_dir_comes_from_the_trainers_own_arguments():
    command = ["torchrun", "--rdzv_conf", "timeout=900", "launch/cpt.py", "--config", str(RECIPE),
               "run_dir=runs/x", "train.max_steps=3"]
    assert supervise.trainer_args(command) == (str(RECIPE), ["run_dir=runs/x", "train.max_steps=3"])
    assert supervise.run_dir_of(command) == (Path.cwd() / "runs" / "x").resolve()
    with pytest.raises(supervise.SuperviseError, match="no training script"):
        supervise.trainer_args(["deepspeed", "--num_gpus", "2"])


@pytest.mark.parametrize("command, said", [
    (["deepspeed", CPT, "--config", RECIPE, "train.grad_clipping=1"], "unknown key 'train.grad_clipping'"),
    (["deepspeed", CPT, "--config", "no/such/recipe.yaml"], "no/such/recipe.yaml: cannot read config file"),
    (["no-such-launcher", CPT, "--config", RECIPE], "cannot start no-such-launcher"),
    (["deepspeed", "--num_gpus", "2"], "no training script"),
])
def test_bad_input_to_the_supervisor_is_one_error_line_and_exit_2(tmp_path, command, said):
    """Exit 1 is a NaN stop or a lost rank, which a requeue script retries; bad input must not look like one."""
    result = subprocess.run([sys.executable, SUPERVISE, "--", *map(str, command), f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and said in result.stderr, \
        result.stderr


def test_the_supervisor_reads_the_trainers_lock_and_marker_names():
    from shortened.train import checkpoint

    assert (supervise.LOCK_FILE, supervise.MARKER) == (checkpoint.LOCK_FILE, checkpoint.MARKER)


def test_a_held_run_dir_lock_is_seen_from_another_process_and_its_release_too(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, sys, time
handle = open({str(tmp_path / supervise.LOCK_FILE)!r}, "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write("pid 1 on elsewhere\\n"); handle.flush()
print("locked", flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert supervise.lock_holder(tmp_path) == "pid 1 on elsewhere"
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        assert supervise.lock_holder(tmp_path) is None
    finally:
        holder.kill()
    with open(tmp_path / supervise.LOCK_FILE) as handle:  # probing left the lock free
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_only_a_checkpoint_completed_after_the_signal_counts(tmp_path):
    for step, written in ((4, 100.0), (8, 200.0)):
        path = tmp_path / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / supervise.MARKER).write_text(json.dumps({"step": step, "time": written}))
    (tmp_path / "checkpoints" / "step_00000012").mkdir()  # a save that never finished
    assert supervise.checkpoint_after(tmp_path, 150.0) == tmp_path / "checkpoints" / "step_00000008"
    assert supervise.checkpoint_after(tmp_path, 250.0) is None


def test_a_handler_is_seen_in_the_process_status():
    """Children that do and do not install a SIGTERM handler (this process's own handlers depend on how the test
    run was started: a background job inherits SIGINT ignored)."""
    code = ("import signal, sys, time\n"
            "if sys.argv[1] == 'handler': signal.signal(signal.SIGTERM, lambda *args: None)\n"
            "print('ready', flush=True); time.sleep(30)")
    for kind, expected in (("handler", True), ("default", False)):
        child = subprocess.Popen([sys.executable, "-c", code, kind], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            assert supervise.catches(child.pid, signal.SIGTERM) is expected, kind
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
