"""Durable file writes: temp file, fsync, rename, fsync of the directory. A reader sees the old file or the new one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch


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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
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
