"""A 2-rank DeepSpeed job that meets a stale build lock on its communication op (left by a process killed with
SIGKILL while it held it) trains instead of hanging at start-up."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_build_locks import age, killed_holding

from shortened.train.build_locks import GRACE_S, LOCK_NAME

from train_support import deepspeed, overrides, read_log, run_ok

pytestmark = pytest.mark.timeout(300)


def test_a_job_meeting_a_stale_lock_on_its_communication_op_trains(tmp_path, train_shards_64, tiny_init_model):
    """Before the watcher, both ranks waited in torch's FileBaton.wait() forever (no timeout, no message)."""
    built, extensions = Path(os.environ["TORCH_EXTENSIONS_DIR"]), tmp_path / "torch_extensions"
    if (built / "deepspeed_shm_comm").is_dir():  # mtimes kept by the copy: ninja finds it built
        shutil.copytree(built / "deepspeed_shm_comm", extensions / "deepspeed_shm_comm",
                        ignore=shutil.ignore_patterns(LOCK_NAME))
    # else (the first 2-rank job of a fresh clone) the job builds it, once the lock is gone
    lock = killed_holding(extensions / "deepspeed_shm_comm" / LOCK_NAME)
    age(lock, GRACE_S + 5)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    output = run_ok(deepspeed(2, overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=2"),
                              tmp_path / "out.txt", TORCH_EXTENSIONS_DIR=str(extensions)))
    assert f"removed the stale build lock {lock}" in output and not lock.exists()
    assert [r["step"] for r in read_log(run_dir)] == [1, 2]
    assert time.monotonic() - started < 200
