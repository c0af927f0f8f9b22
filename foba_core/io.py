"""Atomic writes: every output is written to a temporary file beside its target, then moved onto it in one step.

The temporary file is flushed to disk (``fsync``) before the rename, so a kill or a power cut leaves either the
old file or the complete new one, never a truncated one. Files and folders get the permissions ``open()`` and
``mkdir()`` would give them under the user's umask (``tempfile`` alone creates them private, 0600 / 0700).
"""

from __future__ import annotations

import csv
import json
import os
import secrets
from pathlib import Path
from typing import Callable


def _new_temp(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """Return a new path ``parent/<prefix><random><suffix>`` that ``create`` made (failing if it existed)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def temp_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """Return a new empty folder in ``parent`` (to be renamed onto its target), with the umask's permissions."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return _new_temp(Path(parent), prefix, "", lambda path: os.mkdir(path, 0o777))  # mkdir applies the umask


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for open()


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
    tmp = _new_temp(path.parent, f".{path.name}.", ".tmp", _create_file)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
