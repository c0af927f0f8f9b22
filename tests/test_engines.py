"""Engine helpers: resume (extending a finished run), pruning old checkpoints, gradient clipping under AMP,
the learning-rate schedule."""

import os
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events

from foba_core.engines import latest_checkpoint, resume, warmup_schedule


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


def _run_with_saver(folder, steps, stop, n_saved=2):
    """Resume from ``folder`` and run ``steps`` iterations, a checkpoint every 2, interrupted after ``stop``."""
    from foba_core.engines import ResumableCheckpointSaver

    engine, net = _engine(steps, []), torch.nn.Linear(1, 1)
    resume(str(folder), {"trainer": engine, "net": net})
    ResumableCheckpointSaver(save_dir=str(folder), save_dict={"net": net}, save_interval=2, epoch_level=False,
                             n_saved=n_saved).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=stop), lambda e: e.terminate())  # an interruption
    engine.run(range(100), max_epochs=1, epoch_length=steps)


def test_checkpoint_saver_keeps_the_newest_n_saved_across_resumes(tmp_path):
    _run_with_saver(tmp_path, 10, stop=5)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt"]
    _run_with_saver(tmp_path, 10, stop=7)  # saves 6: the first run's 2 goes
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_iteration=4.pt", "checkpoint_iteration=6.pt"]
    _run_with_saver(tmp_path, 10, stop=10)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_iteration=10.pt", "checkpoint_iteration=8.pt"]


def test_checkpoint_saver_prefers_its_own_checkpoints_to_stale_ones(tmp_path):
    from foba_core.engines import ResumableCheckpointSaver

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "checkpoint_iteration=100.pt").write_bytes(b"an abandoned run")
    (stale / "checkpoint_final_iteration.pt").write_bytes(b"kept: not an interval checkpoint")
    engine, net = _engine(4, []), torch.nn.Linear(1, 1)
    ResumableCheckpointSaver(save_dir=str(stale), save_dict={"net": net}, save_interval=2, epoch_level=False,
                             n_saved=1).attach(engine)
    engine.run(range(100), max_epochs=1, epoch_length=4)  # no resume: a fresh run in an old folder
    assert sorted(os.listdir(stale)) == ["checkpoint_final_iteration.pt", "checkpoint_iteration=4.pt"]


def test_gradient_clipping_unscales_amp_gradients_first():
    from foba_core.engines import ClipGradNorm

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((param * torch.tensor([3.0, 4.0])).sum()).backward()  # true gradient (3, 4), norm 5
    engine = SimpleNamespace(accumulation_steps=1, scaler=scaler, optimizer=optimizer,
                             state=SimpleNamespace(iteration=1, epoch_length=1))
    ClipGradNorm([param], max_norm=1.0)(engine)
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]))  # the true gradient, clipped to norm 1
    scaler.step(optimizer)  # does not unscale a second time
    torch.testing.assert_close(param.detach(), torch.tensor([-0.6, -0.8]))


def test_optimizer_steps_follow_the_accumulation_windows():
    from foba_core.engines import optimizer_steps_now

    def steps(acc, epoch_length, n):
        return [optimizer_steps_now(SimpleNamespace(accumulation_steps=acc, state=SimpleNamespace(
            iteration=it, epoch_length=epoch_length))) for it in range(1, n + 1)]

    assert steps(1, 3, 3) == [True, True, True]
    assert steps(2, 3, 6) == [False, True, True, False, True, True]  # the last micro-batch of an epoch steps
    assert steps(2, None, 4) == [False, True, False, True]  # no epoch length: every 2nd


def _lrs(schedule, optimizer, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_warmup_then_a_learning_rate_drop_that_a_resumed_run_keeps():
    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return optimizer, warmup_schedule(optimizer, 10, drop_step=60, drop_factor=0.25)

    optimizer, schedule = fresh()
    lrs = _lrs(schedule, optimizer, 100)
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)  # linear warm-up to the peak
    assert lrs[10:60] == pytest.approx([2.0] * 50) and lrs[60:] == pytest.approx([0.5] * 40)

    optimizer, schedule = fresh()
    _lrs(schedule, optimizer, 40)
    state = schedule.state_dict()
    optimizer, schedule = fresh()  # a resumed run
    schedule.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = lrs[40]  # as the optimiser's own state_dict restores it
    assert _lrs(schedule, optimizer, 60) == pytest.approx(lrs[40:])

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    assert _lrs(warmup_schedule(optimizer, 10), optimizer, 50)[10:] == [2.0] * 40  # without drop_step: constant
    with pytest.raises(ValueError, match="drop_step"):
        warmup_schedule(optimizer, 10, drop_step=5)
    with pytest.raises(ValueError, match="drop_factor"):
        warmup_schedule(optimizer, 10, drop_step=20, drop_factor=0.0)


def test_a_finished_run_resumes_from_its_final_checkpoint_not_its_last_interval_one(tmp_path):
    seen = []
    first = _engine(5, seen)
    first.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: _save(e, tmp_path))  # interval checkpoint
    first.add_event_handler(  # what CheckpointSaver(save_final=True) writes when the run completes
        Events.COMPLETED, lambda e: torch.save({"trainer": e.state_dict()}, tmp_path / "checkpoint_final_iteration.pt"))
    first.run(range(100), max_epochs=1, epoch_length=5)
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_final_iteration.pt")

    longer = _engine(8, seen)  # the finished run extended to 8 iterations
    resume(str(tmp_path), {"trainer": longer})
    longer.run(range(100), max_epochs=1, epoch_length=8)
    assert seen == [1, 2, 3, 4, 5, 6, 7, 8]  # continued at 6, not at 5 from the interval checkpoint at 4

    _save(longer, tmp_path)  # an interval checkpoint later than the final one wins
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_iteration=8.pt")
