"""One seed derivation for every random stream of the method: ``derive_seed(run seed, what, which ...)``.

A stream that must not depend on how the work is cut up (an image's q_sample noise, sample i's starting
noise z_T, inpainting k of image i, batch n of a training run, pass p of a shuffled epoch, process r of a
distributed run) takes its seed from the keys that name it, never from a running counter or an arithmetic
trick such as ``seed * 1_000_003 + i`` (whose streams collide for large keys). The keys of the toy world,
the Human3.6M subset and the phantom chest X-rays are left as they are: they define those data sets.
"""

from __future__ import annotations

import numbers
import zlib

import numpy as np

_INT, _STR = 0, 1  # the kind of a key, part of its encoding: 7 and "7" are different keys


def _words(key) -> list[int]:
    """The three uint32 words (kind, low, high) that encode one key."""
    if isinstance(key, str):
        return [_STR, zlib.crc32(key.encode("utf-8")), 0]  # stable across processes, unlike hash()
    if isinstance(key, numbers.Integral) and 0 <= int(key) < 2**64:
        return [_INT, int(key) & 0xFFFFFFFF, int(key) >> 32]
    raise ValueError(f"derive_seed: a key must be a string or an int in [0, 2**64), got {key!r}")


def derive_seed(*keys: int | str) -> int:
    """Return the seed in [0, 2**32) of the stream named by ``keys`` (ints, or strings hashed by zlib.crc32).

    The same keys always give the same seed, in any process; distinct key tuples, also of different lengths,
    give independent streams (numpy's ``SeedSequence`` mixes the encoded keys). The seed suits
    ``torch.Generator().manual_seed``, ``numpy.random.default_rng`` and MONAI's ``set_random_state``.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key, e.g. derive_seed(seed, image_id)")
    words = [len(keys)] + [w for key in keys for w in _words(key)]
    state = np.random.SeedSequence(np.array(words, dtype=np.uint32)).generate_state(1, dtype=np.uint32)
    return int(state[0])
