"""Stale build locks of just-in-time compiled ops, removed instead of waited on forever.

DeepSpeed compiles its ops on first use (the CPU communication op inside `init_distributed`, the optimizer ops inside
`deepspeed.initialize`) through torch's `cpp_extension.load`, which takes a lock file, `BUILD_DIR/lock`, even when
the op is already built. A process killed while holding it (preempted, `kill -9`, a lost node) leaves the file
behind, and every later job that loads the op on that machine waits for it in a silent loop with no timeout: a
resumed week-long job hangs at start-up until someone finds the file.

While a rank starts, `BuildLockWatcher` (on each node's local rank 0) looks at the build locks every few seconds and
removes one that is stale, saying which and why:
- no process on this machine holds it open (torch keeps the lock's descriptor open while it builds or loads, and
  the kernel closes it when the process dies) and it is older than `GRACE_S`, which leaves a builder that is just
  releasing it alone; or, where other processes cannot be seen (another user's, another node's on a shared
  filesystem),
- nothing in its build folder has changed for `QUIET_S` (a compiler writes there as it goes).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

LOCK_NAME = "lock"  # torch.utils.cpp_extension: FileBaton(os.path.join(build_directory, 'lock'))
GRACE_S = 30.0
QUIET_S = 600.0
POLL_S = 5.0
PROC = Path("/proc")


def extension_root(environ: Mapping[str, str] = os.environ) -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else its per-user cache folder per Python and
    accelerator (`cpp_extension._get_build_directory`'s rule, without creating anything)."""
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def held_open(lock: Path, proc: Path | None = None) -> bool | None:
    """Whether a process of this machine has `lock` open; None when that cannot be told (no /proc, or a process of
    the lock's owner whose descriptors may not be read). Only the owner's processes are looked at: the lock lives
    in that user's extension folder, and other users' descriptors are unreadable to anyone but root."""
    proc = PROC if proc is None else proc
    if not proc.is_dir():
        return None
    target, owner, unreadable = str(lock.resolve()), lock.stat().st_uid, False
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            if pid.stat().st_uid != owner:
                continue
            fds = list((pid / "fd").iterdir())
        except PermissionError:
            unreadable = True
            continue
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue  # the process ended while we looked
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    return None if unreadable else False


def stale_reason(lock: Path, now: float | None = None, proc: Path | None = None) -> str | None:
    """Why `lock` is stale (see the module doc), or None while it may belong to a live build."""
    now = time.time() if now is None else now
    try:
        age = now - lock.stat().st_mtime
        quiet = now - max(path.stat().st_mtime for path in [lock.parent, *lock.parent.iterdir()])
        held = held_open(lock, proc)
    except FileNotFoundError:
        return None  # released meanwhile
    if held is False and age >= GRACE_S:
        return f"no process on this machine holds it and it is {age:.0f} s old"
    if held is None and quiet >= QUIET_S:
        return f"nothing in {lock.parent} has changed for {quiet:.0f} s"
    return None


def remove_stale_locks(root: Path, now: float | None = None, proc: Path | None = None) -> list[Path]:
    """Remove every stale build lock under `root` (one folder per op); returns those removed."""
    removed = []
    for lock in sorted(root.glob(f"*/{LOCK_NAME}")) if root.is_dir() else ():
        try:
            inode = lock.stat().st_ino
        except FileNotFoundError:
            continue
        reason = stale_reason(lock, now, proc)
        if reason is None:
            continue
        try:
            if lock.stat().st_ino != inode:  # released and taken again meanwhile: a live build's lock now
                continue
            lock.unlink()
        except FileNotFoundError:
            continue
        log.warning("removed the stale build lock %s (%s): a process killed while building or loading this op left "
                    "it, and every job loading the op would have waited for it forever", lock, reason)
        removed.append(lock)
    return removed


class BuildLockWatcher:
    """A daemon thread that removes stale build locks under the extension root every `poll_s` while a rank starts
    (on local rank 0 only: one remover per machine), and says once when a start waits on a live one."""

    def __init__(self, root: Path | None = None, poll_s: float = POLL_S) -> None:
        self.root, self.poll_s = root or extension_root(), poll_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="build-lock-watcher", daemon=True)

    @classmethod
    def start_on_local_rank_0(cls, environ: Mapping[str, str] = os.environ) -> BuildLockWatcher | None:
        if environ.get("LOCAL_RANK", "0") != "0":
            return None
        watcher = cls(extension_root(environ))
        watcher._thread.start()
        return watcher

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        seen: set[Path] = set()  # locks there at the last look: a load holds one for milliseconds, a build minutes
        said: set[Path] = set()
        while True:
            try:
                remove_stale_locks(self.root)
                now = set(self.root.glob(f"*/{LOCK_NAME}")) if self.root.is_dir() else set()
                for lock in sorted(now & seen - said):
                    log.info("waiting for the build lock %s (another process is building or loading the op); it is "
                             "removed once stale (no process holds it, or %s unchanged for %.0f s)", lock,
                             lock.parent, QUIET_S)
                    said.add(lock)
                seen = now
            except OSError as err:  # the watcher must never end a rank
                log.warning("build-lock watcher: %s", err)
            if self._stopped.wait(self.poll_s):
                return
