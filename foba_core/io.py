"""Atomic writes: every output is written to a temporary file beside its target, then moved onto it in one step.

The temporary file is flushed to disk (``fsync``) before the rename, so a kill or a power cut leaves either the
old file or the complete new one, never a truncated one. Files and folders get the permissions ``open()`` and
``mkdir()`` would give them under the user's umask (``tempfile`` alone creates them private, 0600 / 0700).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """Return a new empty folder in ``parent`` (to be renamed onto its target) with the umask's permissions."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Return ``path`` after ``write(tmp)`` filled a temporary file in the same folder that then replaced it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def write_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write dict rows as CSV (columns in order of first appearance), atomically."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def write_torch(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj``, atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
