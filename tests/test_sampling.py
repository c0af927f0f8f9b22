"""ShuffledBatches: every item once per pass, a resumable position, processes that read the single-process stream."""

import pytest

from foba_core.sampling import ShuffledBatches


def test_batches_visit_every_item_once_per_pass_and_resume_at_any_batch():
    sampler = ShuffledBatches(n=5, batch_size=3, steps=5, seed=0, draws=True)
    keys = [k for batch in sampler for k in batch]  # 15 keys = 3 passes over 5 items
    assert len(keys) == 15 and len(sampler) == 5
    for p in range(3):
        assert sorted(i for i, _ in keys[5 * p:5 * p + 5]) == list(range(5))
        assert {d for _, d in keys[5 * p:5 * p + 5]} == {p}
    assert keys[:5] != keys[5:10]  # a new order each pass
    assert [k for batch in sampler for k in batch] == keys  # the order is a function of the seed alone
    resumed = ShuffledBatches(n=5, batch_size=3, steps=5, seed=0, draws=True)
    assert resumed.seek(2) == 2 and len(resumed) == 3
    assert [k for batch in resumed for k in batch] == keys[6:]
    assert resumed.seek(99) == 5 and list(resumed) == []
    plain = ShuffledBatches(n=5, batch_size=3, steps=5, seed=0)
    assert [i for batch in plain for i in batch] == [i for i, _ in keys]
    assert ShuffledBatches(n=5, batch_size=3, steps=5, seed=1).__iter__().__next__() != [i for i, _ in keys[:3]]


def test_processes_together_read_the_single_process_batches():
    single = list(ShuffledBatches(n=7, batch_size=4, steps=6, seed=3))
    ranks = [list(ShuffledBatches(n=7, batch_size=2, steps=6, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    late = ShuffledBatches(n=7, batch_size=2, steps=6, seed=3, rank=1, world_size=2)
    late.seek(4)
    assert list(late) == ranks[1][4:]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        ShuffledBatches(n=0, batch_size=3, steps=5)
    with pytest.raises(ValueError, match="rank must lie"):
        ShuffledBatches(n=5, batch_size=3, steps=5, rank=2, world_size=2)
