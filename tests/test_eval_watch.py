"""The watcher: each complete checkpoint evaluated exactly once across restarts and kill -9; incomplete ones ignored."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from shortened.config import EvalConfig
from shortened.eval.mirror import MirrorError
from shortened.eval.results import read_results
from shortened.eval.watch import (
    Checkpoint,
    WatchError,
    WatchState,
    _exclusive,
    clean_launcher_env,
    complete_checkpoints,
    load_watch_config,
    pending,
    spawn_watcher,
    watch,
)

import warm_start
from conftest import EVAL_DATA, ROOT, subprocess_env
from eval_support import write_checkpoint


def _run_dir(tmp_path: Path, limit: int = 4) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"mode": "watch", "every_steps": 10,
        "tasks": ["piqa", "wikitext2"], "data_dir": str(EVAL_DATA), "limit": limit, "batch_size": 4, "poll_s": 0.2}}))
    return run


def _evaluated_steps(run: Path) -> Counter:
    """How many times each step was evaluated: one piqa/acc row per evaluation."""
    rows = read_results(run / "results.jsonl")
    return Counter(r["step"] for r in rows if (r["task"], r["metric"]) == ("piqa", "acc"))


def test_exactly_once_across_restarts_and_incomplete_checkpoints_ignored(tmp_path):
    run = _run_dir(tmp_path)
    write_checkpoint(run, 10, 1000, seed=1)
    write_checkpoint(run, 20, 2000, seed=2)
    write_checkpoint(run, 30, 3000, seed=3, complete=False)  # being written: no marker yet
    bad = write_checkpoint(run, 40, 4000, seed=4, complete=False)
    (bad / "complete.json").write_text('{"step": 40, "tok')  # a marker torn by a crash
    config, validation = load_watch_config(run)
    assert config.tasks == ["piqa", "wikitext2"] and validation == ""

    assert watch(run, config, once=True) == 2
    assert _evaluated_steps(run) == {10: 1, 20: 1}
    rows = read_results(run / "results.jsonl")
    assert {r["checkpoint"] for r in rows} == {"step_00000010", "step_00000020"}
    assert all(r["status"] == "ok" and r["source"] == "watch" and r["run"] == "run" for r in rows)
    assert {r["tokens"] for r in rows if r["step"] == 20} == {2000}

    # The trainer finishes step 30 and writes step 50; a restarted watcher (a child, started the way the trainer
    # would: launcher variables stripped) evaluates only those.
    (run / "checkpoints/step_00000030/complete.json").write_text(json.dumps({"step": 30, "tokens": 3000}))
    write_checkpoint(run, 50, 5000, seed=5)
    env = subprocess_env(RANK="3", WORLD_SIZE="8", MASTER_ADDR="10.0.0.1", MASTER_PORT="1")
    child = spawn_watcher(run, ["--once"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = child.communicate(timeout=240)[0]
    assert child.returncode == 0, out[-3000:]
    assert _evaluated_steps(run) == {10: 1, 20: 1, 30: 1, 50: 1}

    # Nothing new: nothing evaluated. A corrupted state file is rebuilt from results.jsonl, not re-evaluated.
    (run / "eval_state.json").write_text("{not json")
    assert watch(run, config, once=True) == 0
    assert _evaluated_steps(run) == {10: 1, 20: 1, 30: 1, 50: 1}
    assert sorted(json.loads((run / "eval_state.json").read_text())["evaluated"]) == [
        "step_00000010", "step_00000020", "step_00000030", "step_00000050"]


def test_kill_9_mid_evaluation_then_restart(tmp_path):
    run = _run_dir(tmp_path)
    write_checkpoint(run, 10, 1000, seed=1)
    write_checkpoint(run, 20, 2000, seed=2)
    script = ROOT / "launch" / "eval_watch.py"
    child = subprocess.Popen([sys.executable, str(script), "--run", str(run)], env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in child.stdout:  # kill it while it evaluates the second checkpoint
            if "evaluating step_00000020" in line:
                os.kill(child.pid, signal.SIGKILL)
                break
        child.wait(timeout=240)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    assert _evaluated_steps(run) == {10: 1}  # step 20 left nothing behind
    assert list(json.loads((run / "eval_state.json").read_text())["evaluated"]) == ["step_00000010"]

    restarted = warm_start.run([script, "--run", run, "--once"], env=subprocess_env(), timeout=240)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert _evaluated_steps(run) == {10: 1, 20: 1}


def test_every_tokens_takes_the_first_checkpoint_of_each_interval(tmp_path):
    state = WatchState(tmp_path)
    ckpts = [Checkpoint(f"step_{s:08d}", tmp_path, s, s * 100) for s in (5, 10, 15, 20, 25, 40)]
    assert [c.step for c in pending(ckpts, state, every_tokens=1000)] == [5, 10, 20, 40]
    state.evaluated = {"step_00000010": {"step": 10, "tokens": 1000}}  # a restart after step 10 was done
    assert [c.step for c in pending(ckpts, state, every_tokens=1000)] == [5, 20, 40]
    assert [c.step for c in pending(ckpts, state)] == [5, 15, 20, 25, 40]


def test_one_watcher_per_run_and_clean_errors(tmp_path):
    run = _run_dir(tmp_path)
    config = EvalConfig(tasks=["piqa"], data_dir=str(EVAL_DATA))
    with _exclusive(run):
        with pytest.raises(WatchError, match="another watcher"):
            watch(run, config, once=True)
    with pytest.raises(WatchError, match="no such run directory"):
        watch(tmp_path / "nope", config, once=True)
    with pytest.raises(MirrorError, match="eval.data_dir is not set"):  # before any checkpoint is marked failed
        watch(run, EvalConfig(tasks=["piqa"]), once=True)
    assert complete_checkpoints(run) == []
    assert "MASTER_PORT" not in clean_launcher_env({"MASTER_PORT": "1", "RANK": "0", "PATH": "/bin"})
