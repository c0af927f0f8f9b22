"""Small ignite/MONAI engine helpers shared by every training bundle: resume, clipping, warm-up, loss log."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

log = logging.getLogger(__name__)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """Return the checkpoint with the highest iteration in ``checkpoint_dir`` (MONAI CheckpointSaver names), or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    best, best_it = None, -1
    for name in os.listdir(checkpoint_dir):
        m = re.search(r"(?:iteration|epoch)=(\d+)\.pt$", name)
        if m and int(m.group(1)) > best_it:
            best, best_it = os.path.join(checkpoint_dir, name), int(m.group(1))
    final = os.path.join(checkpoint_dir, "checkpoint_final_iteration.pt")
    return best if best is not None else (final if os.path.exists(final) else None)


def resume(checkpoint_dir: str, objects: dict) -> str | None:
    """Load the latest checkpoint of ``checkpoint_dir`` into ``objects`` (engine, networks, optimisers); return its path."""
    from ignite.handlers import Checkpoint

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which
        raise RuntimeError(f"cannot read checkpoint {path}: {err}. Delete it to restart from the previous one.") from err
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


class ClipGradNorm:
    """Handler: clip the gradient norm of ``parameters`` after every backward pass, before the optimiser step."""

    def __init__(self, parameters, max_norm: float = 1.0):
        self.parameters, self.max_norm = list(parameters), float(max_norm)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a linear learning-rate warm-up over ``warmup_steps`` optimiser steps, constant afterwards."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


class LossLog:
    """Handler: keep the loss of every iteration and write a JSON summary (atomically) when training completes."""

    def __init__(self, path: str, tail: int = 100):
        self.path, self.tail = path, int(tail)
        self.losses: list[float] = []
        self.start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def record(self, engine: Engine) -> None:
        self.losses.append(engine.state.output["loss"].detach().item())

    def summary(self, engine: Engine) -> dict:
        """Return first and final loss (mean of the first/last ``tail`` iterations of this run) and timing."""
        n = min(self.tail, len(self.losses))
        return {
            "iterations": int(engine.state.iteration),
            "iterations_this_run": len(self.losses),
            "loss_first": sum(self.losses[:n]) / max(1, n),
            "loss_final": sum(self.losses[-n:]) / max(1, n),
            "seconds_this_run": time.perf_counter() - self.start,
        }

    def write(self, engine: Engine) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.summary(engine), "losses": self.losses}, f)
        os.replace(tmp, self.path)


class ResumableCheckpointSaver:
    """MONAI ``CheckpointSaver`` factory whose checkpoints also hold the engine it is attached to (for resume).

    A config cannot list the trainer in the ``save_dict`` of one of the trainer's own handlers (a
    circular reference); the engine is added when the handler is attached.
    """

    def __new__(cls, save_dict: dict, engine_key: str = "trainer", **kwargs):
        from monai.handlers import CheckpointSaver

        class _Saver(CheckpointSaver):
            def attach(self, engine: Engine) -> None:
                self.save_dict[engine_key] = engine  # ignite's Checkpoint keeps a reference to this dict
                super().attach(engine)

        return _Saver(save_dict=dict(save_dict), **kwargs)
