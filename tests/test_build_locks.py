"""A build lock left by a process killed while it held it (torch's own FileBaton, killed with SIGKILL) is removed, not
waited on forever; a lock a live process holds is left alone. (A 2-rank job meeting one: test_build_locks_job.py.)"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shortened.train.build_locks import GRACE_S, LOCK_NAME, QUIET_S, held_open, remove_stale_locks

HOLD = ("import sys, time\nfrom torch.utils.file_baton import FileBaton\n"
        "assert FileBaton(sys.argv[1]).try_acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")


def hold_lock(lock: Path) -> subprocess.Popen:
    """A process that takes `lock` the way torch's cpp_extension.load does, and keeps it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def killed_holding(lock: Path) -> Path:
    """The fault: the holder is killed with SIGKILL (no `finally` runs); the file stays, no process holds it."""
    holder = hold_lock(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock.is_file()
    return lock


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_lock_held_by_a_live_process_is_kept_and_one_left_by_a_killed_one_is_removed(tmp_path, caplog):
    live, dead = tmp_path / "live_op" / LOCK_NAME, tmp_path / "dead_op" / LOCK_NAME
    holder = hold_lock(live)
    try:
        killed_holding(dead)
        assert held_open(live) is True and held_open(dead) is False
        for lock in (live, dead):
            age(lock, GRACE_S + 5)
            age(lock.parent, QUIET_S + 5)  # old enough by either rule: only the holder tells them apart
        with caplog.at_level(logging.WARNING, logger="shortened.train.build_locks"):
            assert remove_stale_locks(tmp_path) == [dead]
        assert live.is_file() and not dead.exists()
        assert f"removed the stale build lock {dead} (no process on this machine holds it" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_a_fresh_lock_no_one_holds_waits_out_the_grace_a_releasing_builder_needs(tmp_path):
    lock = killed_holding(tmp_path / "op" / LOCK_NAME)
    assert remove_stale_locks(tmp_path) == [] and lock.is_file()  # younger than GRACE_S: torch may be releasing it
    assert remove_stale_locks(tmp_path, now=time.time() + GRACE_S + 1) == [lock] and not lock.exists()


def test_where_holders_cannot_be_seen_a_lock_goes_only_after_its_build_folder_is_quiet(tmp_path):
    """Another node's build on a shared filesystem is invisible in /proc: only a build folder that has not
    changed for QUIET_S says the build is dead (a compiler writes there as it goes)."""
    lock = killed_holding(tmp_path / "op" / LOCK_NAME)
    no_proc = tmp_path / "no-proc"
    assert held_open(lock, no_proc) is None
    object_file = lock.parent / "op.o"
    object_file.write_bytes(b"\0")
    age(lock, QUIET_S + 5)
    age(lock.parent, QUIET_S + 5)
    assert remove_stale_locks(tmp_path, proc=no_proc) == [] and lock.is_file()  # the .o was just written
    age(object_file, QUIET_S + 5)
    assert remove_stale_locks(tmp_path, proc=no_proc) == [lock] and not lock.exists()
