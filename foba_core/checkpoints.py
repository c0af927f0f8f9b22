"""Checkpoints of the resumable trainings: which one is the newest readable, loading it back, pruning old ones.

MONAI's ``CheckpointSaver`` writes ``checkpoint_iteration=N.pt`` every interval and
``checkpoint_final_iteration.pt`` at the end and on an interruption; :func:`latest_checkpoint` picks the one
whose stored trainer iteration is highest, :func:`resume` loads it into the engine and its objects, and
:class:`ResumableCheckpointSaver` keeps the newest ``n_saved`` interval files of this and earlier runs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointSaver

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"_(iteration|epoch)=(\d+)\.pt$")  # MONAI CheckpointSaver's interval checkpoints


def numbered_checkpoints(checkpoint_dir: str, level: str | None = None) -> dict[str, int]:
    """Return {file name: step} of the interval checkpoints in ``checkpoint_dir`` ("..._iteration=N.pt").

    ``level`` ("iteration" or "epoch") keeps only the checkpoints numbered by that unit.
    """
    if not os.path.isdir(checkpoint_dir):
        return {}
    found = {}
    for name in os.listdir(checkpoint_dir):
        m = CHECKPOINT_NAME.search(name)
        if m and level in (None, m.group(1)):
            found[name] = int(m.group(2))
    return found


def _load_checkpoint(path: str, mmap: bool = False):
    """Return a checkpoint's contents (with ``mmap``, tensors stay on disk until used); name the file if it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # a truncated or foreign file: say which
        raise RuntimeError(f"cannot read checkpoint {path}: {err}. Delete it to restart from the previous one.") from err


def _trainer_iteration(path: str) -> int | None:
    """Return the trainer iteration stored in a checkpoint, reading only that entry."""
    state = _load_checkpoint(path, mmap=True)
    trainer = state.get("trainer") if isinstance(state, dict) else None
    return int(trainer["iteration"]) if isinstance(trainer, dict) and "iteration" in trainer else None


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """Return the checkpoint of ``checkpoint_dir`` that is furthest into training (MONAI CheckpointSaver names), or None.

    A finished or interrupted run has both its last interval checkpoint and ``checkpoint_final_iteration.pt``
    (MONAI's ``save_final`` writes it on completion and on an exception), which is later unless the run stopped
    right at an interval; the iterations stored in the two decide (the final one on a tie).
    """
    found = numbered_checkpoints(checkpoint_dir)
    final = os.path.join(checkpoint_dir, "checkpoint_final_iteration.pt")
    numbered = os.path.join(checkpoint_dir, max(found, key=found.get)) if found else None
    if not os.path.exists(final):
        return numbered
    if numbered is None:
        return final
    final_iteration, numbered_iteration = _trainer_iteration(final), _trainer_iteration(numbered)
    if final_iteration is None or numbered_iteration is None:
        return numbered
    return final if final_iteration >= numbered_iteration else numbered


def resume(checkpoint_dir: str, objects: dict, optional: Sequence[str] = ()) -> str | None:
    """Load the latest checkpoint of ``checkpoint_dir`` into ``objects`` (engine, networks, optimisers); return its path.

    The ``optional`` names may be missing from the checkpoint (older checkpoints, or state that was empty then).
    """
    from ignite.handlers import Checkpoint

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    state = _load_checkpoint(path)
    objects = {k: v for k, v in objects.items() if k in state or k not in optional}
    engines = [obj for obj in objects.values() if isinstance(obj, Engine)]
    wanted = [(e.state.max_epochs, e.state.epoch_length) for e in engines]
    Checkpoint.load_objects(to_load=objects, checkpoint=state)
    for engine, (max_epochs, epoch_length) in zip(engines, wanted):
        _extend(engine, max_epochs, epoch_length)
    log.info("resumed from %s", path)
    print(f"resumed from {path} at iteration {engines[0].state.iteration if engines else '?'}", flush=True)
    return path


def _extend(engine: Engine, max_epochs: int | None, epoch_length: int | None) -> None:
    """Let a finished run continue when more iterations are asked for now (a larger max_steps) than it had then.

    ignite would otherwise start a finished run over from iteration 0.
    """
    s = engine.state
    if not (max_epochs and epoch_length and s.epoch_length):
        return
    if s.iteration >= s.epoch_length * s.max_epochs and epoch_length * max_epochs > s.iteration:
        s.max_epochs, s.epoch_length = max_epochs, epoch_length
        s.epoch = s.iteration // epoch_length


def prune_checkpoints(checkpoint_dir: str, n_saved: int | None, level: str = "iteration", current=()) -> list[str]:
    """Delete all but the newest ``n_saved`` interval checkpoints of ``level`` in ``checkpoint_dir``; return them.

    Newest: the files named in ``current`` (the ones this process wrote), then the highest step. The
    final checkpoint and checkpoints of other names are kept; ``n_saved=None`` keeps everything.
    """
    if n_saved is None:
        return []
    found = numbered_checkpoints(checkpoint_dir, level)
    ranked = sorted(found, key=lambda name: (name in current, found[name]), reverse=True)
    for name in ranked[n_saved:]:
        os.remove(os.path.join(checkpoint_dir, name))
    return ranked[n_saved:]


class ResumableCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose checkpoints also hold the engine it is attached to, for :func:`resume`.

    A config cannot list the trainer in the ``save_dict`` of one of the trainer's own handlers (a
    circular reference); the engine is added under ``engine_key`` when the handler is attached. After
    each interval save only the newest ``n_saved`` interval checkpoints stay in ``save_dir``, those of
    an earlier (interrupted) run included: ignite's ``Checkpoint`` only counts the files it wrote itself.
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str = "trainer", **kwargs):
        super().__init__(save_dir=save_dir, save_dict=dict(save_dict), **kwargs)
        self.engine_key = engine_key
        self.written: set[str] = set()

    def attach(self, engine: Engine) -> None:
        self.save_dict[self.engine_key] = engine  # ignite's Checkpoint keeps a reference to this dict
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        checkpoint = self._interval_checkpoint
        self.written.add(os.path.basename(checkpoint.last_checkpoint))
        prune_checkpoints(self.save_dir, checkpoint.n_saved, "epoch" if self.epoch_level else "iteration",
                          self.written)
