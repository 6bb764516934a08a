"""The trainer on a file system that fails it, done for real with tmpfs mounts (the tests run as root; they skip
where mount is refused): a run_dir it cannot write is bad input at start-up (one `error:` line, exit 2); a disk
that fills during a checkpoint save stops the run with a line saying so and where from each rank that ran out of
space (exit 1, as a lost rank: the run was fine), the older checkpoint intact and the resume exact once there is
room.
"""
from __future__ import annotations

import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from test_train_faults import assert_one_line_error, train

from shortened.train import checkpoint as ckpt

from train_support import overrides, read_log, run_ok, same, warm

pytestmark = pytest.mark.timeout(600)


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is refused here: {result.stderr.strip()}")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: 64m) at `path`, unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def used_bytes(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.total - usage.free


@pytest.mark.parametrize("where", ["new dir on a read-only fs", "read-only fs", "under /proc"])
def test_a_run_dir_this_job_cannot_write_is_one_error_line_exit_2(tmp_path, train_shards_64, tiny_init_model, where):
    if where == "under /proc":
        run_dir = Path("/proc") / f"shortened_run_{uuid.uuid4().hex[:8]}"
        result = train(run_dir, train_shards_64, tiny_init_model)
    else:
        with tmpfs(tmp_path / "fs", "1m") as fs:
            mount("-o", "remount,ro", str(fs))
            run_dir = fs / "run" if where.startswith("new dir") else fs
            result = train(run_dir, train_shards_64, tiny_init_model)
    assert_one_line_error(result, f"run_dir={run_dir}: cannot write there")


def test_a_disk_full_during_a_save_is_named_exit_1_and_the_older_checkpoint_resumes_exactly(
        tmp_path, train_shards_64, tiny_init_model):
    with tmpfs(tmp_path / "fs", "1g") as fs:
        run_dir = fs / "run"
        run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=4"), tmp_path / "a.out"))
        first = ckpt.checkpoints_root(run_dir) / ckpt.tag_for(4)
        # Room for half a checkpoint more: the next save fills the disk part-way through.
        mount("-o", f"remount,size={used_bytes(fs) * 3 // 2}", str(fs))
        job = warm(2, overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=8"), tmp_path / "b.out")
        rc = job.wait()
        output = job.output()
        assert rc == 1, output[-4000:]
        # one line from each rank that ran out of space (every rank writes its part of the save), nothing else
        errors = [line for line in output.splitlines() if line.startswith("error")]
        assert errors and "Traceback" not in output, output[-4000:]
        said = f"disk full: no space left to write {run_dir / 'checkpoints' / ckpt.tag_for(8)}; "
        assert all(said in line for line in errors), errors
        assert ckpt.marker_problem(first) is None and ckpt.damage(ckpt.Checkpoint(first, 4)) is None  # sizes too
        trained = {r["step"]: r for r in read_log(run_dir)}  # steps 5-7 were logged before step 8's save failed
        assert {5, 6, 7} <= set(trained)
        mount("-o", "remount,size=1g", str(fs))
        resumed = run_ok(warm(2, overrides(run_dir, train_shards_64, tiny_init_model, "train.max_steps=8"),
                              tmp_path / "c.out"))
        assert "resuming from" in resumed and ckpt.tag_for(4) in resumed
        log = read_log(run_dir)
        assert [r["step"] for r in log] == list(range(1, 9))
        for record in log[4:7]:
            assert same(record, trained[record["step"]]), (record, trained[record["step"]])
