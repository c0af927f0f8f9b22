"""Checkpoints of the resumable trainings: written atomically, the newest readable one found and loaded back.

:class:`ResumableCheckpointSaver` writes ``checkpoint_iteration=N.pt`` every interval and
``checkpoint_final_iteration.pt`` at the end and on an interruption (MONAI ``CheckpointSaver``'s names). Each file
is written to a temporary file, flushed to disk and renamed onto its name (``foba_core.io.atomic_write``); older
interval checkpoints are removed only once the new one is complete, so a kill at any moment leaves at least one
whole checkpoint. :func:`latest_checkpoint` picks the readable checkpoint whose stored trainer iteration is
highest (an unreadable one is reported by name and passed over), :func:`resume` loads it into the engine and its
objects. Checkpoints are read with ``torch.load(weights_only=True)``: a file planted in the folder cannot run code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

from foba_core.io import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"_(iteration|epoch)=(\d+)\.pt$")  # MONAI CheckpointSaver's interval checkpoints
FINAL_NAME = "checkpoint_final_iteration.pt"
PARTIAL_NAME = re.compile(r"^\.checkpoint_.*\.pt\..*\.tmp$")  # atomic_write's temporary file of a checkpoint


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


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """Return a checkpoint's contents (with ``mmap``, tensors stay on disk until used); name the file if it is unreadable.

    Only tensors and plain containers are read (``weights_only``): a pickle that would run code is refused.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated, foreign or unsafe file: say which
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict):
        raise RuntimeError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a dict of states")
    return state


def _trainer_iteration(path: str) -> int:
    """Return the trainer iteration stored in a checkpoint (-1 without one), reading only that entry."""
    trainer = load_checkpoint(path, mmap=True).get("trainer")
    return int(trainer["iteration"]) if isinstance(trainer, dict) and "iteration" in trainer else -1


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """Return the readable checkpoint of ``checkpoint_dir`` that is furthest into training, or None when there is none.

    A finished or interrupted run has both its last interval checkpoint and ``checkpoint_final_iteration.pt``,
    which is later unless the run stopped right at an interval; the iterations stored in the files decide (the
    final one on a tie). An unreadable file (a checkpoint written by a tool that did not write atomically, a
    damaged disk) is reported by name and the next one is taken; if every checkpoint is unreadable, the error
    names them all.
    """
    names = list(numbered_checkpoints(checkpoint_dir))
    if os.path.exists(os.path.join(checkpoint_dir, FINAL_NAME)):
        names.append(FINAL_NAME)
    ranked, unreadable = [], []
    for name in names:
        path = os.path.join(checkpoint_dir, name)
        try:
            ranked.append((_trainer_iteration(path), name == FINAL_NAME, path))
        except RuntimeError as err:
            unreadable.append(str(err))
    for reason in unreadable:
        print(f"skipping an unreadable checkpoint: {reason}", flush=True)
    if ranked:
        return max(ranked)[2]
    if unreadable:
        raise RuntimeError(f"no readable checkpoint in {checkpoint_dir}: " + "; ".join(unreadable)
                           + ". Delete these files to start the training over.")
    return None


def resume(checkpoint_dir: str, objects: dict, optional: Sequence[str] = ()) -> str | None:
    """Load the latest checkpoint of ``checkpoint_dir`` into ``objects`` (engine, networks, optimisers); return its path.

    The ``optional`` names may be missing from the checkpoint (older checkpoints, or state that was empty then).
    Temporary files of checkpoint writes that a kill interrupted are removed.
    """
    from ignite.handlers import Checkpoint

    for name in os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else ():
        if PARTIAL_NAME.match(name):
            print(f"removing {os.path.join(checkpoint_dir, name)}: a checkpoint write that did not finish", flush=True)
            os.remove(os.path.join(checkpoint_dir, name))
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    state = load_checkpoint(path)
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


class ResumableCheckpointSaver:
    """Handler: checkpoint ``save_dict`` and the engine it is attached to, atomically, for :func:`resume`.

    Every ``save_interval`` iterations (epochs with ``epoch_level``) it writes ``checkpoint_iteration=N.pt``
    and then removes all but the newest ``n_saved`` interval checkpoints in ``save_dir``, those of an earlier
    (interrupted) run included; with ``save_final`` it writes ``final_filename`` when the run completes and when
    it raises (then re-raises). Each file holds ``{name: obj.state_dict()}`` (MONAI ``CheckpointSaver``'s layout
    and names), with the engine under ``engine_key``: a config cannot list the trainer in the ``save_dict`` of
    one of the trainer's own handlers (a circular reference).
    """

    def __init__(self, save_dir: str, save_dict: dict, save_interval: int = 0, n_saved: int | None = 1,
                 epoch_level: bool = False, save_final: bool = False, final_filename: str = FINAL_NAME,
                 engine_key: str = "trainer"):
        self.save_dir, self.save_dict = save_dir, dict(save_dict)
        self.save_interval, self.n_saved, self.epoch_level = int(save_interval), n_saved, bool(epoch_level)
        self.save_final, self.final_filename, self.engine_key = bool(save_final), final_filename, engine_key
        self.written: set[str] = set()

    def attach(self, engine: Engine) -> None:
        self.save_dict[self.engine_key] = engine
        if self.save_interval > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.interval_completed)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self.completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def save(self, filename: str) -> str:
        """Write the checkpoint ``save_dir/filename`` atomically; return its path."""
        checkpoint = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        path = os.path.join(self.save_dir, filename)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
        return path

    def interval_completed(self, engine: Engine) -> None:
        level = "epoch" if self.epoch_level else "iteration"
        name = f"checkpoint_{level}={engine.state.epoch if self.epoch_level else engine.state.iteration}.pt"
        self.save(name)
        self.written.add(name)
        prune_checkpoints(self.save_dir, self.n_saved, level, self.written)  # only now that the new one is whole

    def completed(self, engine: Engine) -> None:
        log.info("training completed, saved %s", self.save(self.final_filename))

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        log.info("exception raised, saved %s", self.save(self.final_filename))
        raise error
