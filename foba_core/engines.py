"""Small ignite/MONAI engine helpers shared by every training bundle, and the one trainer that wires them.

:class:`ResumableTrainer` is MONAI's ``SupervisedTrainer`` with the wiring every foba training shares: it steps
the learning-rate schedule, clips the gradient before each optimiser step (:class:`ClipGradNorm`), logs the loss
(StatsHandler, :class:`LossLog`, an ignite ProgressBar), keeps the newest checkpoints and resumes from them
(``foba_core.checkpoints``) and does not start a finished run over.
The pieces stay usable alone: warm-up schedule (:func:`warmup_schedule`), loss for StatsHandler and MLflow
(:func:`loss_value`, :func:`configure_tracking`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import LrScheduleHandler, StatsHandler
from monai.utils import look_up_option

from foba_core.checkpoints import ResumableCheckpointSaver, resume
from foba_core.io import write_json

log = logging.getLogger(__name__)


def optimizer_steps_now(engine: Engine) -> bool:
    """Return whether MONAI's SupervisedTrainer calls the optimiser step at the end of the current iteration.

    With ``accumulation_steps`` K > 1 it steps on every K-th iteration of an epoch and on the epoch's last
    one (the rule of ``SupervisedTrainer._iteration``); otherwise on every iteration.
    """
    acc = getattr(engine, "accumulation_steps", 1)
    if acc == 1:
        return True
    length = engine.state.epoch_length
    local = engine.state.iteration - 1 if length is None else (engine.state.iteration - 1) % length
    return (local + 1) % acc == 0 or local + 1 == length


class ClipGradNorm:
    """Handler: clip the gradient norm of ``parameters`` to ``max_norm`` right before each optimiser step.

    It runs after the backward pass (``IterationEvents.BACKWARD_COMPLETED``) of the iterations that step the
    optimiser (:func:`optimizer_steps_now`): with gradient accumulation the accumulated gradient is clipped,
    not each partial sum. Under AMP (the trainer's ``GradScaler`` in ``engine.scaler``) the gradients are
    unscaled first, so the true gradient norm is clipped; ``scaler.step`` then does not unscale them again.
    """

    def __init__(self, parameters, max_norm: float = 1.0):
        self.parameters, self.max_norm = list(parameters), float(max_norm)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not optimizer_steps_now(engine):
            return  # partial sums of an accumulation window are left alone
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            scaler.unscale_(engine.optimizer)  # clip the true gradient, not the loss-scaled one
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, drop_step: int | None = None,
                    drop_factor: float = 1.0, accumulation_steps: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a linear learning-rate warm-up over ``warmup_steps`` optimiser steps, constant afterwards; from
    optimiser step ``drop_step`` on (if given), the learning rate is ``drop_factor`` times the peak.

    The schedule is stepped once per iteration; with gradient accumulation an optimiser step is
    ``accumulation_steps`` iterations, so warm-up and drop are counted in iterations of that many.
    """
    acc = int(accumulation_steps)
    if acc < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    warmup_steps = max(1, int(warmup_steps) * acc)
    drop_step = None if drop_step is None else int(drop_step) * acc
    if drop_step is not None and drop_step < warmup_steps:
        raise ValueError(f"drop_step ({drop_step // acc}) must not come before the end of the warm-up "
                         f"({warmup_steps // acc})")
    if not 0.0 < float(drop_factor) <= 1.0:
        raise ValueError(f"drop_factor must be in (0, 1], got {drop_factor}")

    def factor(step: int) -> float:
        if drop_step is not None and step >= drop_step:
            return float(drop_factor)
        return min(1.0, (step + 1) / warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_value(output: dict) -> float:
    """Return the scalar loss of a SupervisedTrainer output kept as one dict (``decollate=False``).

    The ``output_transform`` of StatsHandler and MLFlowHandler for foba's trainers: MONAI's default,
    ``from_engine(["loss"], first=True)``, expects a decollated list of per-item dicts and returns a
    tuple here (StatsHandler skips it, MLFlowHandler fails on it).
    """
    return output["loss"].detach().item()


def configure_tracking(handlers: Sequence, params: dict) -> None:
    """Set up the MLFlowHandler that ``--tracking mlflow`` adds to ``handlers`` (none: nothing to do).

    The handler records ``params`` (the run's settings) as MLflow parameters and reads the loss of every
    iteration with :func:`loss_value`. Call it in a bundle's ``initialize``, before the trainer runs.
    """
    from monai.handlers import MLFlowHandler

    for handler in handlers:
        if isinstance(handler, MLFlowHandler):
            handler.experiment_param = {**(handler.experiment_param or {}), **params}
            handler.output_transform = loss_value


class LossLog:
    """Handler: keep the loss of every iteration and write a JSON summary (atomically) when training completes.

    The losses are checkpoint state (``state_dict``): a resumed run's log holds the whole run's curve, the one an
    uninterrupted run writes.
    """

    def __init__(self, path: str, tail: int = 100):
        self.path, self.tail = path, int(tail)
        self.losses: list[float] = []
        self.resumed_at = 0
        self.start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state["losses"]]
        self.resumed_at = len(self.losses)

    def record(self, engine: Engine) -> None:
        self.losses.append(loss_value(engine.state.output))

    def summary(self, engine: Engine) -> dict:
        """Return first and final loss (mean of the first/last ``tail`` iterations of the run) and timing."""
        n = min(self.tail, len(self.losses))
        return {
            "iterations": int(engine.state.iteration),
            "iterations_this_run": len(self.losses) - self.resumed_at,
            "loss_first": sum(self.losses[:n]) / max(1, n),
            "loss_final": sum(self.losses[-n:]) / max(1, n),
            "seconds_this_run": time.perf_counter() - self.start,
        }

    def write(self, engine: Engine) -> None:
        write_json({**self.summary(engine), "losses": self.losses}, self.path)


class AccumulatedGradients:
    """Checkpoint state of the gradients summed so far in an unfinished accumulation window (empty between windows).

    A run interrupted inside a window (MONAI's final checkpoint on an exception) continues that window exactly.
    """

    def __init__(self, engine: Engine, parameters):
        self.engine, self.parameters = engine, list(parameters)

    def state_dict(self) -> dict:
        if self.engine.state.iteration == 0 or optimizer_steps_now(self.engine):
            return {}  # the last iteration stepped the optimiser: the next one starts a new window
        return {"grads": [None if p.grad is None else p.grad.detach().clone() for p in self.parameters]}

    def load_state_dict(self, state: dict) -> None:
        for p, grad in zip(self.parameters, state.get("grads", ())):
            p.grad = None if grad is None else grad.to(p.device)


def _checked_state(state: dict | None, network, optimizer, lr_schedule) -> dict:
    """Return the objects a trainer checkpoints (default: network, optimiser, schedule), checked to hold those three."""
    if state is None:
        state = {"network": network, "optimizer": optimizer}
        if lr_schedule is not None:
            state["lr_schedule"] = lr_schedule
    state = dict(state)
    for name, obj in (("network", network), ("optimizer", optimizer), ("lr_schedule", lr_schedule)):
        if obj is not None and not any(obj is s for s in state.values()):
            raise ValueError(f"state must hold the trainer's {name} (a resumed run would not continue exactly); "
                             f"it names {sorted(state)}")
    return state


class ResumableTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` of ``max_steps`` optimiser steps that logs, checkpoints and resumes itself.

    Besides the ``SupervisedTrainer`` arguments it attaches, in this order and before ``train_handlers``:
    the learning-rate schedule, stepped every iteration (``LrScheduleHandler``); :class:`ClipGradNorm` to
    ``max_grad_norm`` (the unscaled gradient under ``amp``, the accumulated one with ``accumulation_steps``);
    with ``output_dir`` a :class:`LossLog` (``output_dir/train_log.json``, the whole run's curve also after
    resumes); with ``checkpoint_dir`` a :class:`ResumableCheckpointSaver` (atomic files every
    ``checkpoint_interval`` optimiser steps, at the end and on an exception; the newest ``keep_checkpoints``
    interval ones stay) of the trainer, ``state`` and the loss log; a StatsHandler every ``log_interval``
    iterations; an ignite ProgressBar.
    ``train_handlers`` are extra handlers (a bundle passes ``@train#handlers``, where ``--tracking mlflow`` adds
    its MLFlowHandler, which :func:`configure_tracking` sets up with ``tracking_params``).

    ``state`` names the objects checkpointed with the trainer, the names being the checkpoint's keys: the
    network, the optimiser and the schedule (the default) plus anything else a run needs to continue exactly,
    e.g. a ``DiffusionBatch`` (its noise counter). A batch sampler with ``seek`` (``sampling.ShuffledBatches``)
    needs no state: :meth:`resume` moves it to the resumed iteration. Constructed with ``resume=True``
    (or at :meth:`resume`), the trainer and ``state`` are loaded from the newest checkpoint in
    ``checkpoint_dir``; :meth:`run` then continues there, and does nothing for a run that already finished.

    ``distributed`` (the process belongs to a torchrun process group): the network is wrapped in
    ``DistributedDataParallel``, gradients are all-reduced once per optimiser step
    (``distributed.SyncGradientsOnStep``), and only rank 0 attaches the handlers that write or print
    (statistics, checkpoints, loss log, progress bar, ``train_handlers``); every rank resumes.
    """

    def __init__(self, device, max_steps: int, train_data_loader, network: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, loss_function, lr_schedule=None, max_grad_norm: float | None = None,
                 accumulation_steps: int = 1, amp: bool = False, amp_dtype: str | torch.dtype | None = None,
                 gradient_checkpointing: bool = False, output_dir: str | None = None, checkpoint_dir: str | None = None,
                 checkpoint_interval: int = 0, keep_checkpoints: int = 1, state: dict | None = None,
                 log_interval: int | None = 100, progress: bool = True, train_handlers: Sequence | None = None,
                 tracking_params: dict | None = None, distributed: bool = False, resume: bool = True,
                 decollate: bool = False, **kwargs):
        from foba_core import distributed as dist_helpers

        self.max_steps, acc = int(max_steps), int(accumulation_steps)
        if self.max_steps < 1 or acc < 1:
            raise ValueError(f"max_steps and accumulation_steps must be >= 1, got {max_steps}, {accumulation_steps}")
        if checkpoint_dir is None and output_dir is not None:
            checkpoint_dir = os.path.join(output_dir, "checkpoints")
        self.checkpoint_dir = checkpoint_dir
        state = _checked_state(state, network, optimizer, lr_schedule)
        if gradient_checkpointing:
            if not hasattr(network, "enable_gradient_checkpointing"):
                raise ValueError(f"gradient_checkpointing: {type(network).__name__} has no "
                                 "enable_gradient_checkpointing() (diffusers models have it)")
            network.enable_gradient_checkpointing()  # recompute activations in the backward pass

        handlers: list = [] if not distributed else [dist_helpers.SyncGradientsOnStep()]
        if lr_schedule is not None:
            handlers.append(LrScheduleHandler(lr_schedule, print_lr=False, epoch_level=False))
        if max_grad_norm is not None:
            handlers.append(ClipGradNorm(network.parameters(), max_grad_norm))
        writers = self._writers(state, log_interval, checkpoint_dir, int(checkpoint_interval) * acc, keep_checkpoints,
                                output_dir, progress, train_handlers)
        if tracking_params is not None:
            configure_tracking(writers, tracking_params)
        if not distributed or dist_helpers.is_rank0():
            handlers += writers

        model = network
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                network, device_ids=[device] if torch.device(device).type == "cuda" else None)
        if isinstance(amp_dtype, str):
            amp_dtype = getattr(torch, look_up_option(amp_dtype, ("bfloat16", "float16")))
        super().__init__(device=device, max_epochs=1, epoch_length=self.max_steps * acc,
                         train_data_loader=train_data_loader, network=model, optimizer=optimizer,
                         loss_function=loss_function, train_handlers=handlers, amp=bool(amp),
                         amp_kwargs=None if amp_dtype is None else {"dtype": amp_dtype},
                         accumulation_steps=acc, decollate=decollate, **kwargs)
        self.handlers = tuple(handlers)  # what this trainer attached, in order (train_handlers last)
        self.state_objects = {**state, **self._extra_state(network, acc, distributed)}
        batch = getattr(train_data_loader, "batch_size", None) or getattr(
            getattr(train_data_loader, "batch_sampler", None), "batch_size", None)
        if batch:
            dist_helpers.effective_batch(batch, acc)
        if resume:
            self.resume()

    def _extra_state(self, network: torch.nn.Module, acc: int, distributed: bool) -> dict:
        """Return the state checkpointed beside ``state`` when there is any (partial gradients, the AMP loss scale);
        it is optional on a resume, so checkpoints written without it stay loadable."""
        extra = {}
        if acc > 1 and not distributed:  # (DDP ranks accumulate local gradients: only rank 0's would be saved)
            extra["gradients"] = AccumulatedGradients(self, network.parameters())
        if self.scaler is not None:
            extra["scaler"] = self.scaler  # the AMP loss scale
        extra.update({"loss_log": h for h in self.handlers if isinstance(h, LossLog)})  # the curve so far (rank 0)
        self._optional_state = tuple(extra)
        for saver in self.handlers:
            if isinstance(saver, ResumableCheckpointSaver):
                saver.save_dict.update(extra)
        return extra

    @staticmethod
    def _writers(state: dict, log_interval, checkpoint_dir, save_interval: int, keep_checkpoints: int, output_dir,
                 progress: bool, train_handlers) -> list:
        """Return the handlers that print or write: the loss log, checkpoints, statistics, a progress bar, extras.

        They are built on every rank (``train_handlers`` come from the config on every rank) and attached on rank 0.
        """
        writers: list = []
        if output_dir is not None:  # before the checkpoints: an iteration's loss is recorded before it is saved
            writers.append(LossLog(os.path.join(output_dir, "train_log.json")))
        if checkpoint_dir is not None:  # before StatsHandler: its exception handler saves, then re-raises
            writers.append(ResumableCheckpointSaver(
                save_dir=checkpoint_dir, save_dict=state, save_interval=int(save_interval), n_saved=keep_checkpoints,
                save_final=True))
        if log_interval:
            every = int(log_interval)
            writers.append(StatsHandler(tag_name="train_loss", output_transform=loss_value,
                                        iteration_log=lambda engine, iteration: iteration % every == 0))
        if progress:
            from ignite.handlers import ProgressBar

            writers.append(ProgressBar(persist=True))
        return writers + list(train_handlers or [])

    @property
    def finished(self) -> bool:
        """Whether the run (as resumed) has done all its iterations."""
        s = self.state
        return bool(s.epoch_length and s.max_epochs and s.iteration >= s.epoch_length * s.max_epochs)

    def resume(self) -> str | None:
        """Load the newest checkpoint of ``checkpoint_dir`` into the trainer and ``state``; return its path (or None).

        A finished run asked for more steps now continues; a checkpoint of a run of another length is refused.
        A batch sampler with ``seek`` (``sampling.ShuffledBatches``) is moved to the batch the run continues with.
        """
        if self.checkpoint_dir is None:
            return None
        os.makedirs(self.checkpoint_dir, exist_ok=True)  # a stage may have emptied its folder since the trainer was built
        path = resume(self.checkpoint_dir, {**self.state_objects, "trainer": self}, optional=self._optional_state)
        if path is not None and self.state.epoch_length != self.max_steps * self.accumulation_steps:
            steps = f"{self.state.epoch_length / self.accumulation_steps:g}"
            raise ValueError(f"the checkpoints in {self.checkpoint_dir} belong to a run of {steps} steps, not "
                             f"{self.max_steps}; pass max_steps={steps} or a new output folder")
        seek = getattr(getattr(self.data_loader, "batch_sampler", None), "seek", None)
        if seek is not None:
            seek(self.state.iteration)  # one batch per iteration; prefetching workers make the sampler run ahead
        return path

    def run(self) -> None:
        """Train up to ``max_steps``, unless the resumed run already finished there (ignite would start it over)."""
        if self.finished:
            print(f"training already finished at iteration {self.state.iteration} (checkpoints in "
                  f"{self.checkpoint_dir}); nothing to run", flush=True)
            return
        super().run()
