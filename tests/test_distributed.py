"""Scaling out: shards, per-rank seeds, gathering on rank 0, DDP equivalence, the multi_gpu_*.yaml bundles (torchrun).

Two-process runs use the gloo backend on CPU: ``torch.multiprocessing.spawn`` for the helpers and one DDP step,
``torchrun`` (as the README says) for the bundles.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from foba_core import distributed
from foba_core.finetune import StreamSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY, CXR = (os.path.join(ROOT, "bundles", name, "configs") for name in ("foba_toy", "foba_cxr"))


# ------------------------------------------------------------------ single-process helpers


def test_shards_cover_every_index_once_in_order_for_any_count():
    for n in range(0, 24):
        for world in range(1, 6):
            shards = [distributed.shard_range(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            batches = [distributed.ShardBatches(n, 3, r, world) for r in range(world)]
            flat = [i for b in batches for batch in b for i in batch]
            assert flat == list(range(n))
            for b in batches:
                assert len(list(b)) == len(b) >= 1  # an empty shard still yields one (empty) batch
                assert all(len(batch) <= 3 for batch in b)
    assert list(distributed.ShardBatches(1, 4, rank=0, world_size=2)) == [[]]
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_range(5, 2, 2)


def test_rank_seeds_keep_the_user_seed_on_rank0_and_differ_elsewhere():
    assert distributed.rank_seed(7, 0) == 7
    seeds = [distributed.rank_seed(7, r) for r in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [distributed.rank_seed(7, r) for r in range(8)]  # deterministic
    assert distributed.rank_seed(8, 1) != distributed.rank_seed(7, 1)


def test_alone_every_helper_acts_as_rank0_of_one():
    assert not distributed.is_distributed() and distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.gather_to_rank0([3, 1]) == [3, 1]
    assert distributed.rank0_first(lambda a, b=0: a + b, 1, b=2) == 3
    assert distributed.init_process_group("cpu") == torch.device("cpu")  # no WORLD_SIZE: stays alone
    assert not distributed.is_distributed()


def test_stream_shards_read_the_single_process_stream_of_the_global_batch():
    stream = list(range(50))
    batch, world = 3, 2
    for start in (0, 12, 49):
        shards = [distributed.StreamShard(stream, batch, start=start, rank=r, world_size=world) for r in range(world)]
        per_rank = [list(s) for s in shards]
        assert all(len(p) == len(s) for p, s in zip(per_rank, shards))
        # global batch k = rank 0's k-th block of 3, then rank 1's
        merged = [i for k in range(len(per_rank[0]) // batch) for p in per_rank for i in p[k * batch:(k + 1) * batch]]
        single = list(StreamSampler(stream, start=start))
        n_full = len(single) // (batch * world) * batch * world
        assert merged == single[:n_full]
    shard = distributed.StreamShard(stream, batch, rank=1, world_size=world)
    assert shard.set_start(24) == 24 and list(shard)[:3] == [27, 28, 29]


def test_effective_batch_is_printed(capsys):
    assert distributed.effective_batch(16, 4) == 64
    out = capsys.readouterr().out
    assert "effective batch 64 = batch 16 per process x 1 process(es) x 4 accumulation step(s)" in out


def test_stage1_metrics_equal_the_accumulators():
    from sklearn.metrics import roc_auc_score

    from foba_core.masks import upsample_mask
    from foba_core.metrics import SegmentationAccumulator, accuracy, auc_roc, foreground_iou, mean_iou
    from foba_core.preliminary import _at_mask_size, stage1_metrics

    gen = torch.Generator().manual_seed(0)
    records, aucs, pixels, normalised, seg = [], [], [], [], SegmentationAccumulator()
    for k in range(5):
        heat, gt = torch.rand(8, 8, generator=gen) * (k + 1), torch.rand(16, 16, generator=gen) > 0.6  # own scales
        pre = heat > 0.5
        heat_up, pre_up = _at_mask_size(heat, pre, gt)
        assert torch.equal(pre_up, upsample_mask(pre, (16, 16)))
        aucs.append(roc_auc_score(gt.ravel().numpy(), heat_up.ravel().numpy()))
        pixels.append((heat_up.ravel().numpy(), gt.ravel().numpy()))
        normalised.append(((heat_up - heat_up.min()) / (heat_up.max() - heat_up.min())).ravel().numpy())
        seg.update(pre_up, gt)
        row = {"id": str(k), "auc_roc": auc_roc(heat_up, gt), "acc_pre": accuracy(pre_up, gt),
               "iou_pre": foreground_iou(pre_up, gt), "miou_pre": mean_iou(pre_up, gt)}
        records.append({"row": row, "heat": heat, "m_pre": pre, "gt": gt})
    pooled = roc_auc_score(np.concatenate([t for _, t in pixels]), np.concatenate([h for h, _ in pixels]))
    pooled_normalised = roc_auc_score(np.concatenate([t for _, t in pixels]), np.concatenate(normalised))
    assert abs(pooled - pooled_normalised) > 1e-3  # the per-image scales change the pooled ranking
    m, s = stage1_metrics(records), seg.aggregate()
    assert m["n_images"] == 5 and m["auc_skipped"] == 0
    for mine, theirs in [("auc_roc", np.mean(aucs)), ("auc_roc_pooled", pooled),
                         ("auc_roc_pooled_normalised", pooled_normalised), ("acc_pre", s["acc"]),
                         ("iou_pre", s["iou"]), ("miou_pre", s["miou"]), ("iou_pre_per_image", s["iou_per_image"]),
                         ("miou_pre_per_image", s["miou_per_image"]), ("acc_pre_per_image", s["acc_per_image"])]:
        assert m[mine] == pytest.approx(theirs, abs=1e-12), mine


# ------------------------------------------------------------------ two processes (spawn, gloo)


def _spawn(fn, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=args, nprocs=2, join=True)


def _join(rank: int, folder: str) -> None:
    os.environ.pop("WORLD_SIZE", None)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)


def _gather_worker(rank: int, folder: str) -> None:
    """Rank 0 gathers uneven shards (5 images: 2 + 3) and an empty one (1 image), written through Stage1Writer."""
    from ignite.engine import Events
    from monai.engines import Evaluator
    from tiny_sd import tiny_pipeline

    from foba_core.data import open_dataset
    from foba_core.preliminary import Stage1Step, Stage1Writer

    _join(rank, folder)
    try:
        assert distributed.gather_to_rank0([f"{rank}-{i}" for i in range(rank + 1)]) == (
            ["0-0", "1-0", "1-1"] if rank == 0 else None)
        stamp = os.path.join(folder, "stamp")

        def write_once() -> int:
            if not os.path.exists(stamp):  # rank 1 must find rank 0's file
                with open(stamp, "w") as f:
                    f.write(str(rank))
            with open(stamp) as f:
                return int(f.read())

        assert distributed.rank0_first(write_once) == 0
        pipe = tiny_pipeline(seed=0, text_attention_mask=True)
        for n in (5, 1):
            dataset = open_dataset("toy", None, split="test", size=n)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=distributed.ShardBatches(n, 2),
                                                 collate_fn=lambda items: items)
            writer = Stage1Writer(os.path.join(folder, f"sharded_{n}"), n_overlays=2)
            engine = Evaluator(device=torch.device("cpu"), val_data_loader=loader, decollate=False,
                               iteration_update=Stage1Step(pipe, timesteps=[501, 1], seed=3), val_handlers=[writer])
            seen = []
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.extend(e.state.output["ids"]))
            engine.run()
            assert seen == [dataset[i]["id"] for i in distributed.shard_range(n)]
    finally:
        torch.distributed.destroy_process_group()


def _stage1_single(pipe, dataset, folder, batch_size: int) -> None:
    """Stage 1 in one process, in batches of ``batch_size``, through the same Evaluator, step and writer."""
    from monai.engines import Evaluator

    from foba_core.preliminary import Stage1Step, Stage1Writer

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=lambda items: items)
    Evaluator(device=torch.device("cpu"), val_data_loader=loader, decollate=False,
              iteration_update=Stage1Step(pipe, timesteps=[501, 1], seed=3),
              val_handlers=[Stage1Writer(str(folder), n_overlays=2)]).run()


def test_rank0_gathers_shards_in_dataset_order_even_from_an_empty_shard(tmp_path):
    from tiny_sd import tiny_pipeline

    from foba_core.data import open_dataset

    _spawn(_gather_worker, str(tmp_path))
    pipe = tiny_pipeline(seed=0, text_attention_mask=True)
    for n in (5, 1):
        dataset = open_dataset("toy", None, split="test", size=n)
        _stage1_single(pipe, dataset, tmp_path / f"single_{n}", batch_size=4)  # M̂ must not depend on batching
        a, b = (torch.load(tmp_path / f"{kind}_{n}" / "stage1.pt") for kind in ("single", "sharded"))
        assert a["ids"] == b["ids"] == [dataset[i]["id"] for i in range(n)]
        torch.testing.assert_close(b["heatmaps"], a["heatmaps"], rtol=0, atol=1e-6)
        assert torch.equal(a["m_pre"], b["m_pre"])
        for name in ("per_image.csv", "metrics.json"):
            assert (tmp_path / f"single_{n}" / name).read_text() == (tmp_path / f"sharded_{n}" / name).read_text()
        assert sorted(os.listdir(tmp_path / f"sharded_{n}" / "overlays")) == [
            f"{dataset[i]['id']}.png" for i in range(min(n, 2))]


def _fixed_batch(n: int = 4):
    """A fixed noisy batch for the tiny U-Net: z_t, target noise, loss mask, timesteps, text, key mask."""
    gen = torch.Generator().manual_seed(11)
    z_t, target = torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 4, 8, 8, generator=gen)
    mask = (torch.rand(n, 1, 8, 8, generator=gen) > 0.3).float()  # a masked loss, as in background inpainting
    t = torch.randint(0, 1000, (n,), generator=gen)
    hidden = torch.randn(n, 16, 32, generator=gen)
    key_mask = torch.ones(n, 16)
    key_mask[:, 6:] = 0
    return z_t, target, mask, t, hidden, key_mask


def _train(network, unet, micro_batches: list[slice], accumulation_steps: int = 1) -> list[bool]:
    """One optimiser step of ``network`` (plain SGD) over ``micro_batches`` of the fixed batch with MONAI's trainer.

    Returns, per iteration, whether DDP all-reduced the gradients (SyncGradientsOnStep decides).
    """
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from foba_core.diffusion import noise_loss

    batch = _fixed_batch()

    def prepare_batch(index, device=None, non_blocking=False, **kwargs):
        z_t, target, mask, t, hidden, key_mask = (x[micro_batches[index]] for x in batch)
        return z_t, (target, mask), (t, hidden), {"encoder_attention_mask": key_mask}

    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, epoch_length=len(micro_batches),
        train_data_loader=list(range(len(micro_batches))), network=network,
        optimizer=torch.optim.SGD(unet.parameters(), lr=0.5), loss_function=noise_loss, prepare_batch=prepare_batch,
        decollate=False, accumulation_steps=accumulation_steps, train_handlers=[distributed.SyncGradientsOnStep()])
    synced = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: synced.append(getattr(network, "require_backward_grad_sync", True)))
    trainer.run()
    return synced


def _ddp_worker(rank: int, folder: str) -> None:
    from tiny_sd import tiny_components

    _join(rank, folder)
    try:
        unet = tiny_components(seed=0)["unet"]
        assert _train(torch.nn.parallel.DistributedDataParallel(unet), unet, [slice(2 * rank, 2 * rank + 2)]) == [True]
        torch.save(unet.state_dict(), os.path.join(folder, f"halves_{rank}.pt"))
        unet = tiny_components(seed=0)["unet"]  # quarters, 2 accumulation steps: one all-reduce, at the second
        quarters = [slice(2 * rank, 2 * rank + 1), slice(2 * rank + 1, 2 * rank + 2)]
        synced = _train(torch.nn.parallel.DistributedDataParallel(unet), unet, quarters, accumulation_steps=2)
        assert synced == [False, True]
        torch.save(unet.state_dict(), os.path.join(folder, f"accumulated_{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_one_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path):
    """Also with 2 accumulation steps per rank and one all-reduce per optimiser step.

    Plain SGD without clipping: Adam's first step and a clipped gradient are invariant to the gradient's scale
    and would hide a sum-instead-of-mean bug.
    """
    from tiny_sd import tiny_components

    _spawn(_ddp_worker, str(tmp_path))
    unet = tiny_components(seed=0)["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    _train(unet, unet, [slice(0, 4)])
    single = unet.state_dict()
    moved = max((single[k] - before[k]).abs().max().item() for k in single)
    assert moved > 1e-3  # the step moved weights far more than the tolerance below
    for name in ("halves", "accumulated"):
        for rank in range(2):
            ddp = torch.load(tmp_path / f"{name}_{rank}.pt")
            for key, value in single.items():
                torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-5, msg=f"{name}, rank {rank}: {key}")


# ------------------------------------------------------------------ the bundles under torchrun


def _torchrun(configs: list[str], *args: str, timeout: int = 300) -> str:
    """Return the stdout of ``torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run`` (README).

    It runs in the repository root, as the README's commands do: the training configs include
    ``configs/fragments/*.yaml`` by paths relative to it.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "--config_file", str(configs), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@contextlib.contextmanager
def one_thread():
    """Run the single-process reference with the thread count the torchrun ranks use (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_single_and_sharded(config: str, override: str, settings: dict, tmp_path) -> None:
    """Run an inference ``config`` in this process into tmp_path/single, then over 2 torchrun ranks into .../sharded."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=config, workflow_type="infer", output_dir=str(tmp_path / "single"), **settings)
    wf.initialize()
    with one_thread():
        wf.run()
    args = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]
    _torchrun([config, override], *args, f"--output_dir={tmp_path / 'sharded'}")


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    from tiny_sd import save_tiny_sd

    folder = tmp_path_factory.mktemp("sd") / "tiny"
    save_tiny_sd(folder, seed=0, text_attention_mask=True)
    return folder


@pytest.mark.slow
def test_sharded_ms_cxr_evaluation_writes_what_one_process_writes(tiny_sd_folder, phantom, tmp_path):
    settings = {"model_dir": str(tiny_sd_folder), "mimic_dir": str(phantom), "timesteps": [501, 101],
                "batch_size": 2, "n_overlays": 1}
    _run_single_and_sharded(os.path.join(CXR, "evaluate.yaml"), os.path.join(CXR, "multi_gpu_evaluate.yaml"),
                            settings, tmp_path)
    for name in ("auc_per_disease.csv", "auc_per_disease.md", "auc_per_token.csv", "per_image.csv"):
        assert (tmp_path / "sharded" / name).read_text() == (tmp_path / "single" / name).read_text(), name
    overlays = sorted(os.listdir(tmp_path / "single" / "overlays"))
    assert overlays and sorted(os.listdir(tmp_path / "sharded" / "overlays")) == overlays
    for name in overlays:  # the same first image of each disease
        single, sharded = (tmp_path / kind / "overlays" / name for kind in ("single", "sharded"))
        assert sharded.read_bytes() == single.read_bytes()


@pytest.fixture(scope="module")
def cxr_two_process_run(tiny_sd_folder, phantom, tmp_path_factory):
    """A 2-process MIMIC-CXR fine-tuning, 2 steps, with MLflow (phantom, tiny SD); returns (folder, args, stdout)."""
    root = tmp_path_factory.mktemp("cxr_ddp")
    args = [f"--pretrained={tiny_sd_folder}", f"--mimic_dir={phantom}", "--batch_size=2", "--warmup_steps=1",
            "--checkpoint_interval=1", "--tracking=mlflow"]
    out = _torchrun([os.path.join(CXR, "train.yaml"), os.path.join(CXR, "multi_gpu_train.yaml")], *args,
                    "--max_steps=2", f"--output_dir={root / 'run'}")
    return root / "run", args, out


def _mlflow_runs(folder) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.slow
def test_two_process_training_writes_one_set_of_outputs(cxr_two_process_run):
    folder, _, out = cxr_two_process_run
    assert out.count("effective batch 4 = batch 2 per process x 2 process(es) x 1 accumulation step(s)") == 1
    assert out.count("saved the fine-tuned model to") == 1
    assert sorted(os.listdir(folder / "checkpoints")) == ["checkpoint_final_iteration.pt", "checkpoint_iteration=2.pt"]
    assert sorted(p for p in os.listdir(folder) if not p.startswith("config_")) == [
        "checkpoints", "index.csv", "mlruns.db", "model", "settings.json", "train_log.json"]
    assert (folder / "model" / "unet").is_dir()
    log = json.loads((folder / "train_log.json").read_text())
    assert log["iterations"] == 2 and len(log["losses"]) == 2
    runs = _mlflow_runs(folder)
    assert len(runs) == 1 and runs[0].data.params["processes"] == "2"
    state = torch.load(folder / "checkpoints" / "checkpoint_final_iteration.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["unet"])  # the U-Net itself, not its DDP wrapper


@pytest.mark.slow
def test_two_process_training_resumes_from_its_last_checkpoint(cxr_two_process_run, tmp_path):
    from diffusers import UNet2DConditionModel

    first, args, _ = cxr_two_process_run
    folder = tmp_path / "run"
    shutil.copytree(first, folder)
    before = UNet2DConditionModel.from_pretrained(folder / "model" / "unet").state_dict()
    # what a run killed after its checkpoint at iteration 2 leaves behind: no final checkpoint, no model folder
    os.remove(folder / "checkpoints" / "checkpoint_final_iteration.pt")
    shutil.rmtree(folder / "model")
    out = _torchrun([os.path.join(CXR, "train.yaml"), os.path.join(CXR, "multi_gpu_train.yaml")], *args,
                    "--max_steps=3", f"--output_dir={folder}")
    assert f"resumed from {folder / 'checkpoints' / 'checkpoint_iteration=2.pt'} at iteration 2" in out
    log = json.loads((folder / "train_log.json").read_text())
    assert log["iterations"] == 3 and log["iterations_this_run"] == 1
    state = torch.load(folder / "checkpoints" / "checkpoint_final_iteration.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3
    after = UNet2DConditionModel.from_pretrained(folder / "model" / "unet").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(_mlflow_runs(folder)) == 2  # one per invocation
