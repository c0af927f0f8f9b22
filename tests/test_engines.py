"""Engine helpers: resume (extending a finished run), pruning old checkpoints, gradient clipping under AMP,
the learning-rate schedule."""

import os
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events

from foba_core.checkpoints import latest_checkpoint, resume
from foba_core.engines import warmup_schedule


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
    from foba_core.checkpoints import ResumableCheckpointSaver

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
    from foba_core.checkpoints import ResumableCheckpointSaver

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


# ------------------------------------------------------------------ ResumableTrainer


class _Pairs(torch.utils.data.Dataset):
    """Fixed (image, label) regression pairs."""

    def __init__(self, n=10):
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=gen), torch.randn(n, 1, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return {"image": self.x[key], "label": self.y[key]}


def _resumable(folder, steps=6, accumulation_steps=2, handlers=(), **kwargs):
    """A tiny linear regression in a ResumableTrainer reading shuffled batches."""
    from foba_core.engines import ResumableTrainer
    from foba_core.sampling import ShuffledBatches

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    schedule = warmup_schedule(optimizer, 2, accumulation_steps=accumulation_steps)
    sampler = ShuffledBatches(10, batch_size=4, steps=steps * accumulation_steps, seed=1)
    loader = torch.utils.data.DataLoader(_Pairs(), batch_sampler=sampler)
    settings = dict(output_dir=str(folder), checkpoint_interval=2, progress=False, max_grad_norm=0.5,
                    state={"network": net, "optimizer": optimizer, "lr_schedule": schedule})
    return ResumableTrainer(
        device="cpu", max_steps=steps, accumulation_steps=accumulation_steps, train_data_loader=loader, network=net,
        optimizer=optimizer, loss_function=torch.nn.MSELoss(), lr_schedule=schedule, train_handlers=list(handlers),
        **{**settings, **kwargs})


class _StopAt:
    def __init__(self, iteration):
        self.iteration = iteration

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iteration), lambda e: e.terminate())


def test_resumable_trainer_wires_its_handlers_in_order(tmp_path):
    from ignite.handlers import ProgressBar
    from monai.handlers import LrScheduleHandler, StatsHandler

    from foba_core.checkpoints import ResumableCheckpointSaver
    from foba_core.engines import ClipGradNorm, LossLog

    extra = _StopAt(100)
    trainer = _resumable(tmp_path, handlers=[extra], progress=True)
    assert [type(h) for h in trainer.handlers] == [LrScheduleHandler, ClipGradNorm, LossLog,
                                                   ResumableCheckpointSaver, StatsHandler, ProgressBar, _StopAt]
    assert trainer.handlers[-1] is extra and trainer.state.epoch_length == 12  # 6 steps x 2 micro-batches
    bare = _resumable(tmp_path / "bare", output_dir=None, checkpoint_dir=None, log_interval=None, max_grad_norm=None)
    assert [type(h) for h in bare.handlers] == [LrScheduleHandler]
    with pytest.raises(ValueError, match="state must hold the trainer's network"):
        _resumable(tmp_path / "bad", state={"network": torch.nn.Linear(3, 1)})


def test_resumable_trainer_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, capsys):
    import json

    full = _resumable(tmp_path / "full")
    full.run()
    assert full.state.iteration == 12

    part = _resumable(tmp_path / "part", handlers=[_StopAt(5)])  # interrupted mid accumulation window
    part.run()
    assert part.state.iteration == 5
    assert not all(torch.equal(p, q) for p, q in zip(full.network.parameters(), part.network.parameters()))
    resumed = _resumable(tmp_path / "part")  # a new process: resumes at construction
    assert resumed.state.iteration == 5 and "resumed from" in capsys.readouterr().out
    resumed.run()
    for p, q in zip(full.network.parameters(), resumed.network.parameters()):
        assert torch.equal(p, q)
    first = json.loads((tmp_path / "full" / "train_log.json").read_text())["losses"]
    second = json.loads((tmp_path / "part" / "train_log.json").read_text())
    assert second["iterations"] == 12 and second["iterations_this_run"] == 7
    assert second["losses"] == first  # the whole run's curve; the resumed iterations saw the same batches


def test_a_finished_resumable_run_is_not_restarted_and_other_lengths_are_refused(tmp_path, capsys):
    trainer = _resumable(tmp_path)
    trainer.run()
    weights = [p.detach().clone() for p in trainer.network.parameters()]
    again = _resumable(tmp_path)
    assert again.finished
    again.run()
    assert again.state.iteration == 12 and "training already finished at iteration 12" in capsys.readouterr().out
    for p, q in zip(weights, again.network.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="belong to a run of 6 steps, not 4"):
        _resumable(tmp_path, steps=4)
    longer = _resumable(tmp_path, steps=8)  # more steps: the finished run continues
    longer.run()
    assert longer.state.iteration == 16


class _Payload:
    """A pickle that, when loaded without weights_only, creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_checkpoint_folder_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "executed"
    good = _engine(4, [])
    good.state.iteration = 2
    _save(good, tmp_path)
    torch.save({"trainer": {"iteration": 9}, "payload": _Payload(marker)}, tmp_path / "checkpoint_iteration=9.pt")
    torch.save(_Payload(marker), tmp_path / "checkpoint_final_iteration.pt")
    engine = _engine(4, [])
    assert resume(str(tmp_path), {"trainer": engine}).endswith("checkpoint_iteration=2.pt")
    assert not marker.exists() and engine.state.iteration == 2
    out = capsys.readouterr().out
    assert out.count("skipping an unreadable checkpoint") == 2 and "checkpoint_iteration=9.pt" in out


def test_the_newest_readable_checkpoint_is_taken_and_an_all_unreadable_folder_is_named(tmp_path, capsys):
    older = _engine(6, [])
    older.state.iteration = 4
    _save(older, tmp_path)
    (tmp_path / "checkpoint_final_iteration.pt").write_bytes(b"")  # what a kill during a non-atomic write leaves
    (tmp_path / ".checkpoint_iteration=6.pt.x1y2.tmp").write_bytes(b"half")  # an interrupted atomic write
    engine = _engine(6, [])
    assert resume(str(tmp_path), {"trainer": engine}).endswith("checkpoint_iteration=4.pt")
    out = capsys.readouterr().out
    assert f"skipping an unreadable checkpoint: cannot read checkpoint {tmp_path / 'checkpoint_final_iteration.pt'}" in out
    assert "a checkpoint write that did not finish" in out and not (tmp_path / ".checkpoint_iteration=6.pt.x1y2.tmp").exists()

    (tmp_path / "checkpoint_iteration=4.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(RuntimeError, match="no readable checkpoint in .*checkpoint_iteration=4.pt.*Delete these files"):
        resume(str(tmp_path), {"trainer": _engine(6, [])})
