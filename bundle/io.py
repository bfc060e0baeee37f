"""Atomic file writing: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a process killed mid-write (SIGKILL runs no cleanup) leaves its temporary file behind; writing the same
    # file again removes such leftovers, so repeated kills cannot fill the disk with them
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; finished outputs get ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    import json

    text = json.dumps(obj, indent=indent)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def append_jsonl(path: str | os.PathLike, record) -> None:
    """Add one JSON line to ``path`` by rewriting the file atomically: a kill mid-write never leaves a half line."""
    import json

    path = Path(path)
    old = path.read_text() if path.exists() else ""
    text = old + ("" if not old or old.endswith("\n") else "\n") + json.dumps(record) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
