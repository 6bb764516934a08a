"""Durable file writes: temp file, fsync, rename, fsync of the directory. A reader sees the old file or the new one.

Shared by every part that writes files others read (shards, manifests, checkpoints, results), so "complete or
absent" means the same thing everywhere. Temporary files are `.<name>.tmp<pid>` beside their target: two writers
never share one, and `remove_stale_temps` clears what a killed process left.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


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
