"""Engine helpers: resume from the latest checkpoint, including extending a finished run."""

import torch
from ignite.engine import Engine, Events

from foba_core.engines import latest_checkpoint, resume


def _engine(steps, seen):
    engine = Engine(lambda e, batch: seen.append(e.state.iteration))
    engine.state.max_epochs, engine.state.epoch_length = 1, steps
    return engine


def _save(engine, folder):
    """Write what MONAI's CheckpointSaver writes for {"trainer": engine}."""
    torch.save({"trainer": engine.state_dict()}, folder / f"checkpoint_iteration={engine.state.iteration}.pt")


def test_resume_continues_an_interrupted_run_and_extends_a_finished_one(tmp_path):
    seen = []
    first = _engine(4, seen)
    first.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: (_save(e, tmp_path), e.terminate()))
    first.run(range(100), max_epochs=1, epoch_length=4)
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_iteration=3.pt")

    second = _engine(4, seen)
    assert resume(str(tmp_path), {"trainer": second}) is not None
    second.add_event_handler(Events.COMPLETED, lambda e: _save(e, tmp_path))
    second.run(range(100), max_epochs=1, epoch_length=4)
    assert seen == [1, 2, 3, 4]  # continued at 4, did not start over

    third = _engine(7, seen)  # the same run asked for 7 iterations now
    resume(str(tmp_path), {"trainer": third})
    third.run(range(100), max_epochs=1, epoch_length=7)
    assert seen == [1, 2, 3, 4, 5, 6, 7] and third.state.iteration == 7


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    assert resume(str(tmp_path), {"trainer": _engine(2, [])}) is None
