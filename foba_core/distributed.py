"""Scaling out with PyTorch's own launcher (``torchrun``), the MONAI bundle way.

The ``multi_gpu_*.yaml`` bundle configs are overrides merged over a single-process config; they call
these helpers: join the process group in ``initialize`` (:func:`init_process_group`, nccl on GPU, gloo
on CPU) and leave it in ``finalize`` (:func:`destroy_process_group`); derive one seed per process
(:func:`rank_seed`); split inference data into contiguous shards (:class:`ShardBatches`) whose results
rank 0 gathers back into dataset order (:func:`gather_to_rank0`); split a training stream
(:class:`StreamShard`) between the processes (shuffled trainings: ``sampling.ShuffledBatches``); skip the
gradient all-reduce inside accumulation windows (:class:`SyncGradientsOnStep`); print the effective batch
(:func:`effective_batch`). Without ``torchrun`` every helper behaves as rank 0 of 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from foba_core.engines import optimizer_steps_now
from foba_core.seeds import derive_seed


def is_distributed() -> bool:
    """Return whether this process belongs to an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return this process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Return the number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    """Return whether this process is rank 0, the one that writes checkpoints, models, images and MLflow records."""
    return get_rank() == 0


def local_device() -> torch.device:
    """Return this process's device: ``cuda:LOCAL_RANK`` (torchrun sets it; 0 otherwise) with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_process_group(device: torch.device | str | None = None, seed: int | None = None) -> torch.device:
    """Join the process group that torchrun describes (nccl on GPU, gloo on CPU) and return this process's device.

    Started without torchrun (no ``WORLD_SIZE`` in the environment) the process stays alone: rank 0 of 1.
    With ``seed``, the process is then seeded with its :func:`rank_seed` (MONAI ``set_determinism``).
    """
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if seed is not None:
        from monai.utils import set_determinism

        set_determinism(seed=rank_seed(seed))
    return device


def barrier() -> None:
    """Wait until every process of the group gets here (nothing to wait for without a process group)."""
    if is_distributed():
        dist.barrier()


def destroy_process_group() -> None:
    """Leave the process group (after a barrier, so that no process exits while rank 0 is still writing)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int | None = None) -> int:
    """Return the seed of one process: ``seed`` itself on rank 0, ``derive_seed(seed, "rank", rank)`` elsewhere.

    Rank 0 keeps the user's seed, so a one-process torchrun run draws what a plain run draws.
    """
    rank = get_rank() if rank is None else int(rank)
    if rank == 0:
        return int(seed)
    return derive_seed(seed, "rank", rank)


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Return this rank's contiguous share of ``range(n)``: shards in rank order cover every index exactly once.

    Shard sizes differ by at most one; with fewer items than processes some shards are empty.
    """
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    if n < 0 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: need n >= 0 and 0 <= rank < world_size, got n={n}, rank={rank}, "
                         f"world_size={world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


class ShardBatches(torch.utils.data.Sampler):
    """``batch_sampler`` of an inference ``DataLoader``: this rank's contiguous shard of ``range(n)`` in batches.

    An empty shard (fewer items than processes) yields one empty batch, so that every rank runs its
    evaluator and meets the others in :func:`gather_to_rank0`.
    """

    def __init__(self, n: int, batch_size: int, rank: int | None = None, world_size: int | None = None):
        if int(batch_size) < 1:
            raise ValueError(f"ShardBatches: batch_size must be >= 1, got {batch_size}")
        self.indices, self.batch_size = shard_range(int(n), rank, world_size), int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.indices:
            yield []
            return
        for start in range(0, len(self.indices), self.batch_size):
            yield list(self.indices[start:start + self.batch_size])

    def __len__(self) -> int:
        return max(1, -(-len(self.indices) // self.batch_size))


def gather_to_rank0(items: list) -> list | None:
    """Return on rank 0 the concatenation of every rank's ``items`` in rank order (None on other ranks).

    With :class:`ShardBatches` (contiguous shards) this is the single-process order. Alone, it returns
    ``items``. Every rank must call it (it is a collective).
    """
    if not is_distributed():
        return list(items)
    parts: list | None = [None] * get_world_size() if is_rank0() else None
    dist.gather_object(list(items), parts, dst=0)
    return None if parts is None else [item for part in parts for item in part]


def rank0_first(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Return ``fn(*args, **kwargs)``, run on rank 0 before the other ranks (which then reuse what it wrote).

    For data preparation that writes files (a phantom world, an index): rank 0 writes them while the
    others wait at a barrier, then they find the files in place.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    if is_rank0():
        out = fn(*args, **kwargs)
        dist.barrier()
        return out
    dist.barrier()
    return fn(*args, **kwargs)


def effective_batch(batch_size: int, accumulation_steps: int = 1) -> int:
    """Return (and print on rank 0) the effective batch: batch per process x processes x gradient-accumulation steps."""
    world = get_world_size()
    total = int(batch_size) * world * int(accumulation_steps)
    if is_rank0():
        print(f"effective batch {total} = batch {batch_size} per process x {world} process(es) x "
              f"{accumulation_steps} accumulation step(s)", flush=True)
    return total


class StreamShard(torch.utils.data.Sampler):
    """Sampler: this rank's part of each global batch of a sequential training stream (``finetune.StreamSampler``).

    Global batch k covers stream positions ``start + k * B * W`` ... ``+ B * W`` (B = ``batch_size`` per
    process, W processes); rank r takes its r-th block of B. The processes together read exactly the stream
    a single process reads with batch B x W, only full global batches, and ``set_start`` (a global stream
    position: iteration x B x W after a resume) continues where an interrupted run stopped.
    """

    def __init__(self, data_source, batch_size: int, start: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        if int(batch_size) < 1:
            raise ValueError(f"StreamShard: batch_size must be >= 1, got {batch_size}")
        self.data_source, self.batch_size = data_source, int(batch_size)
        self.rank = get_rank() if rank is None else int(rank)
        self.world = get_world_size() if world_size is None else int(world_size)
        self.start = 0
        self.set_start(start)

    def set_start(self, start: int) -> int:
        """Return the new global start position (clamped to the stream length)."""
        self.start = min(max(0, int(start)), len(self.data_source))
        return self.start

    def __len__(self) -> int:
        return (len(self.data_source) - self.start) // (self.batch_size * self.world) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        step = self.batch_size * self.world
        for first in range(self.start, self.start + len(self) * self.world, step):
            yield from range(first + self.rank * self.batch_size, first + (self.rank + 1) * self.batch_size)


class SyncGradientsOnStep:
    """Handler: with gradient accumulation, DDP all-reduces gradients only in the backward pass of an optimiser step.

    The other micro-batches of an accumulation window keep their gradients local (what
    ``DistributedDataParallel.no_sync`` does), so K accumulation steps cost one all-reduce instead of K; the
    optimiser steps see the same averaged gradients. Without DDP or accumulation it does nothing.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        network, acc = getattr(engine, "network", None), getattr(engine, "accumulation_steps", 1)
        if not isinstance(network, torch.nn.parallel.DistributedDataParallel) or acc == 1:
            return
        network.require_backward_grad_sync = optimizer_steps_now(engine)  # read by DDP's forward
