"""derive_seed: the one seed derivation (deterministic, in range, distinct per key, stable for strings)."""

import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from foba_core.seeds import derive_seed


def test_seeds_are_deterministic_in_range_and_usable_by_torch_and_numpy():
    keys = [(0,), (7, "z_T", 3), (2**64 - 1, "q_sample", "Black_Footed_Albatross_0001_11"), (np.int64(5), True)]
    for k in keys:
        seed = derive_seed(*k)
        assert isinstance(seed, int) and 0 <= seed < 2**32 and seed == derive_seed(*k)
        torch.Generator().manual_seed(seed)
        np.random.default_rng(seed)
    assert derive_seed(np.int64(5)) == derive_seed(5)


def test_distinct_keys_give_distinct_seeds():
    grid = {derive_seed(s, "batch", i) for s in range(40) for i in range(40)}
    assert len(grid) == 1600
    # no key is lost: trailing zeros, the order, the split between keys and the kind of a key all count
    variants = [(3,), (3, 0), (3, 0, 0), (0, 3), (3, "0"), (3, "batch"), (3, "batch", 0), (2**32 + 3,), (3, 1),
                (3, zlib.crc32(b"batch")), (3, "Batch")]
    assert len({derive_seed(*v) for v in variants}) == len(variants)


def test_strings_hash_the_same_in_every_process():
    code = "from foba_core.seeds import derive_seed; print(derive_seed(0, 'q_sample', 'toy-test-0-000001'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PYTHONPATH": ":".join(sys.path)}).stdout.strip()
            for h in (1, 2)}
    assert outs == {str(derive_seed(0, "q_sample", "toy-test-0-000001"))}


def test_bad_keys_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        derive_seed()
    for bad in (-1, 2**64, 1.5, None):
        with pytest.raises(ValueError, match="key"):
            derive_seed(0, bad)
