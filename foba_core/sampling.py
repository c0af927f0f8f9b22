"""The batch order of foba's trainings: a fixed number of batches from a stream of shuffled passes, resumable exactly.

Every training runs ``steps`` iterations as one ignite epoch (``engines.ResumableTrainer``). A ``DataLoader`` with
``shuffle=True`` would draw its order from a generator that restarts on a resume, so a resumed run would see its
first batches again; :class:`ShuffledBatches` derives batch k from (seed, k) alone and starts wherever it is told.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from foba_core.seeds import derive_seed


class ShuffledBatches(torch.utils.data.Sampler):
    """Batch sampler of a fixed-length run: ``steps`` batches of indices into ``n`` items, resumable at any batch.

    The run reads a stream of passes over the items, pass p a permutation seeded by ``(seed, p)``; passes join
    without a gap, so no item is dropped and ``n`` need not be a multiple of the batch. Global batch k holds
    stream positions k·B·W … (k + 1)·B·W − 1 (B = ``batch_size`` per process, W = ``world_size`` processes);
    process ``rank`` takes its block of B, so W processes together read what one process reads at batch B·W.
    With ``draws`` a key is ``(index, pass)`` (``segment.SegmentationData`` seeds an item's augmentation by it).
    ``seek(k)`` makes the next pass of the sampler start at batch k; ``ResumableTrainer.resume`` calls it with the
    iteration it resumed at.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int = 0, draws: bool = False, rank: int = 0,
                 world_size: int = 1):
        if n < 1 or batch_size < 1 or steps < 1:
            raise ValueError(f"n, batch_size and steps must be >= 1, got {n}, {batch_size}, {steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size = {world_size}), got {rank}")
        self.n, self.batch_size, self.steps, self.seed = int(n), int(batch_size), int(steps), int(seed)
        self.draws, self.rank, self.world_size = bool(draws), int(rank), int(world_size)
        self.start = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def seek(self, batch: int) -> int:
        """Return the batch the next pass starts at, ``batch`` clamped to [0, steps]."""
        self.start = min(max(0, int(batch)), self.steps)
        return self.start

    def __len__(self) -> int:
        return self.steps - self.start

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch order", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return self._perm[1]

    def __iter__(self) -> Iterator[list]:
        for k in range(self.start, self.steps):
            first = (k * self.world_size + self.rank) * self.batch_size
            keys = []
            for p in range(first, first + self.batch_size):
                epoch = p // self.n
                index = int(self._permutation(epoch)[p % self.n])
                keys.append((index, epoch) if self.draws else index)
            yield keys
