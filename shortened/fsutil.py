"""Durable file writes: temp file, fsync, rename, fsync of the directory. A reader sees the old file or the new one.

Shared by every part that writes files others read (shards, manifests, checkpoints, results), so "complete or
absent" means the same thing everywhere. Temporary files are `.<name>.tmp<pid>` beside their target: two writers
never share one, and `remove_stale_temps` clears what a killed process left.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temps(directory: Path) -> None:
    """Delete the temporary files that writers killed mid-write left in `directory`."""
    for stale in directory.glob(".*.tmp*"):
        stale.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: data prep workers use this module and must not pay torch's import

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    torch.save(obj, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` (DeepSpeed and save_pretrained write without fsync)."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def remove_tree(path: Path) -> None:
    """Delete a directory so that no reader can mistake what is left for something whole.

    The caller removes the completion marker first; the rename then takes the directory out of view at once.
    """
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------ a full disk

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Free space below which a write that failed without saying why is taken for a full disk: a write that runs out of
# room fills the file system to its last block first.
LOW_SPACE_BYTES = 1 << 20


class DiskFull(OSError):
    """A write under `filename` failed for want of space (the file system is full, or the quota spent)."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def free_bytes(path: Path) -> int:
    """Space left to this user on the file system that holds `path` (or would hold it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def is_disk_full(err: BaseException, path: Path) -> bool:
    """Whether `err`, raised while writing under `path`, means its file system is full. torch.save says only
    "unexpected pos ..." or "file write failed" then, and safetensors puts the errno in its message, so where the
    error does not tell, the space left on the file system does."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    if any(os.strerror(code) in str(err) for code in DISK_FULL_ERRNOS):
        return True
    return isinstance(err, (OSError, RuntimeError)) and free_bytes(path) < LOW_SPACE_BYTES


@contextmanager
def disk_full_as_oserror(path: Path) -> Iterator[None]:
    """Writes under `path`: a failure for want of space is raised as DiskFull(path), whatever the writer raised."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if not is_disk_full(err, path):
            raise
        raise DiskFull(path) from err


# ------------------------------------------------------------------------------ directories sealed by a marker
#
# The commit protocol of every checkpoint (the trainer's and the LoRA run's): write the files, flush them all, then
# write the completion marker last (temp + fsync + rename), listing each file with its size. A directory without a
# valid marker is incomplete and never read; a removal takes the marker away first, so a crash half-way through it
# leaves an incomplete directory, never one that looks whole.


def file_sizes(directory: Path, marker: str) -> dict[str, int]:
    """Every file under `directory` (relative path -> bytes), the marker aside."""
    return {str(file.relative_to(directory)): file.stat().st_size for file in sorted(directory.rglob("*"))
            if file.is_file() and file.name != marker}


def seal_directory(directory: Path, marker: str, info: dict[str, Any]) -> None:
    """Flush everything under `directory`, then write `marker` (`info` plus the file list) last, durably."""
    fsync_tree(directory)  # the data reaches the disk before the marker that vouches for it
    atomic_write_json({**info, "files": file_sizes(directory, marker)}, directory / marker)
    fsync_dir(directory.parent)  # the directory's own entry, before anything older is deleted in its favour


def read_marker(directory: Path, marker: str) -> dict[str, Any] | None:
    """The marker's contents, or None when it is missing or unreadable (the directory is incomplete)."""
    try:
        info = json.loads((directory / marker).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def sealed_damage(directory: Path, info: dict[str, Any]) -> str | None:
    """A file the marker lists that is missing or of another size, or None. Markers without a list pass."""
    for name, size in (info.get("files") or {}).items():
        file = directory / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, the marker recorded {size}"
    return None


def discard_directory(directory: Path, marker: str) -> None:
    """Remove a sealed (or half-written) directory: its marker first, then the rest out of view at once."""
    file = directory / marker
    if file.exists():
        file.unlink()
        fsync_dir(directory)
    remove_tree(directory)


# ------------------------------------------------------------------------------ step logs (train_log.jsonl)


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the lines of steps after `last_step` from a JSON-lines log whose records carry `step`.

    A resumed run re-does those steps, so the log keeps one line per step. A line cut by a crash is dropped; every
    kept line ends with a newline, so the next append starts a line of its own. Written atomically.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            redone = json.loads(line)["step"] > last_step
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash, or the empty tail after the last newline
        if not redone:
            kept.append(line + "\n")
    atomic_write_bytes("".join(kept).encode(), path)


# ------------------------------------------------------------------------------ one job per directory


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote there ("pid N on HOST")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def take_lock(path: Path, posix: bool = False) -> IO[str]:
    """Lock `path` exclusively without waiting and write "pid N on HOST" into it; the open handle holds the lock
    (the kernel drops it when the process dies, however it dies). `posix`: lockf, which forked children do not
    inherit, instead of flock. Raises LockHeld naming the holder."""
    handle = open(path, "a+")
    try:
        (fcntl.lockf if posix else fcntl.flock)(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, depending on the system
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LockHeld(holder) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
