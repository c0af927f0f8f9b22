"""The main job as a list of stages (paper Sec. 3-4), each one rerunnable on its own.

A :class:`Stage` owns one folder ``OUT/<name>``. Before its work runs it records there, in ``stage.json``,
the settings that shape its outputs and the records of the stages it reads (``needs``); when the work is
done the record says so. Run again, a stage is skipped when its record is complete and equal to what it
would write now; a record with other settings or other upstream records empties the folder and the stage
runs again. A stage interrupted midway keeps its folder (checkpoints, finished chunks) and resumes when
rerun with the same settings. So a main job rerun with one changed setting reruns exactly the stages that
depend on it, and says which it skipped.

The standalone bundles (MIMIC-CXR train / evaluate / prepare, toy pretraining) write one output folder without
stages; :func:`guard_folder` records their settings there (``settings.json``) and refuses a rerun into that folder
with other settings, naming them, so that old and new outputs never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from foba_core import distributed, tracking
from foba_core.io import write_json

RECORD = "stage.json"
SETTINGS = "settings.json"


def plain(value):
    """Return ``value`` as JSON data: tuples as lists, paths, devices and dtypes as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _read_json(path: Path, fix: str) -> dict | None:
    """Return the JSON record at ``path``, None when there is none; an unreadable one names itself and ``fix``."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); {fix}") from err


def read_record(folder: str | os.PathLike) -> dict | None:
    """Return the ``stage.json`` of a stage folder, None when there is none; an unreadable one names itself."""
    return _read_json(Path(folder) / RECORD, f"delete the folder {folder} to recompute that stage")


def changed_settings(old: dict, new: dict) -> list[str]:
    """Return one line ``key: old -> new`` per setting whose value differs between two sets of settings."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def guard_folder(folder: str | os.PathLike, settings: dict, outputs: Sequence[str] = (), record: bool = True) -> dict:
    """Return ``settings`` as recorded in ``folder/settings.json``, refusing a folder that holds outputs of others.

    ``settings`` are those that shape a standalone bundle's outputs (not progress bars, tracking, logging, worker
    counts or the device); ``outputs`` are the names, inside ``folder``, of what the bundle writes. Without a
    ``settings.json`` the settings are recorded (with ``record``; ``record=False`` only compares, for a bundle that
    checks more before it records). With one that differs, a FileExistsError names each changed setting
    (``--lr: 0.0005 -> 0.001``) and the outputs found, to be deleted, or another --output_dir to be passed; when
    none of the outputs exists (an earlier run stopped before writing any) nothing can mix and the new settings
    replace the old ones.
    """
    folder, new = Path(folder), plain(settings)
    path = folder / SETTINGS
    old = _read_json(path, f"delete it, or pass another --output_dir than {folder}")
    if old is not None and old != new:
        found = [name for name in outputs if (folder / name).exists()]
        if found:
            changes = "\n".join(f"  --{line}" for line in changed_settings(old, new))
            raise FileExistsError(
                f"{folder} holds the outputs of other settings (recorded in {path}):\n{changes}\nA rerun into it "
                f"would mix old and new outputs: delete {', '.join(found + [SETTINGS])} in {folder}, or pass "
                "another --output_dir")
    if record and old != new:
        write_json(new, path)
    return new


def _digest(record: dict) -> str:
    body = {"settings": record["settings"], "needs": record["needs"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class Stage:
    """One stage of the main job: ``work`` (ignite engines, objects with ``run()``, or callables) fills ``OUT/name``.

    ``settings`` are the values that shape the stage's outputs (batch sizes and progress bars are not);
    ``needs`` names the stages whose outputs it reads, which must be complete. ``run()`` returns the stage.
    With ``tracking_uri`` (or ``--tracking mlflow``) the stage's settings and ``metrics`` go to one MLflow run.
    Under torchrun every process runs the work (rank 0 alone with ``rank0_only``, while the others wait); rank 0
    alone writes the record and empties a stale folder. With ``not_applicable`` (a reason) the stage does not apply
    to this run's settings: ``run()`` says why and does nothing.
    """

    def __init__(self, name: str, output_dir: str, settings: dict | None = None, needs: Sequence[str] = (),
                 work=None, metrics: Callable[[], dict] | None = None, experiment_name: str = "foba",
                 tracking_uri: str | None = None, rank0_only: bool = False, not_applicable: str | None = None):
        self.name, self.output_dir, self.not_applicable = str(name), os.path.abspath(output_dir), not_applicable
        self.settings, self.needs = plain(settings or {}), [str(n) for n in needs]
        self.work = [] if work is None else list(work) if isinstance(work, (list, tuple)) else [work]
        self.metrics, self.experiment, self.rank0_only = metrics, experiment_name, bool(rank0_only)
        self.uri = tracking.tracking_uri(self.output_dir, tracking_uri)

    @property
    def folder(self) -> str:
        """Return the stage's own folder, OUT/<name>."""
        return os.path.join(self.output_dir, self.name)

    def path(self, *parts: str) -> str:
        """Return a path inside the stage's folder."""
        return os.path.join(self.folder, *parts)

    def wanted(self) -> dict:
        """Return the record this stage would write now: its settings and the digests of the stages it reads."""
        needs = {}
        for name in self.needs:
            record = read_record(os.path.join(self.output_dir, name))
            if record is None or not record.get("complete"):
                raise RuntimeError(f"stage {self.name!r} reads the outputs of stage {name!r}, which "
                                   f"{'is unfinished' if record else 'has not run'} in {self.output_dir}; "
                                   f"run {name!r} first (the bundle's pipeline.yaml runs every stage in order)")
            needs[name] = record["digest"]
        record = {"stage": self.name, "settings": self.settings, "needs": needs}
        return {**record, "digest": _digest(record)}

    def changes(self, old: dict, new: dict) -> list[str]:
        """Return one line per setting or upstream stage whose value differs between two records."""
        return changed_settings(old["settings"], new["settings"]) + [
            f"upstream stage {n} changed" for n in new["needs"] if old["needs"].get(n) != new["needs"][n]]

    def run(self) -> Stage:
        """Skip the stage if its outputs are current (or it does not apply), else (re)compute them; return the stage."""
        if self.not_applicable:
            print(f"stage {self.name}: not run, {self.not_applicable}", flush=True)
            return self
        distributed.barrier()  # every process reads the record before any process writes it
        new, old = self.wanted(), read_record(self.folder)
        if old and old.get("digest") == new["digest"] and old.get("complete"):
            print(f"stage {self.name}: skipped, its outputs in {self.folder} match the settings", flush=True)
            return self
        rank0 = distributed.is_rank0()
        if old and old.get("digest") != new["digest"]:
            print(f"stage {self.name}: rerun ({'; '.join(self.changes(old, new)) or 'record changed'})", flush=True)
            if rank0:
                shutil.rmtree(self.folder)
        elif old:
            print(f"stage {self.name}: resuming the unfinished run in {self.folder}", flush=True)
        else:
            print(f"stage {self.name}: running", flush=True)
        if rank0:
            write_json({**new, "complete": False}, self.path(RECORD))
        distributed.barrier()  # no process starts before rank 0 has emptied a stale folder
        start = time.perf_counter()
        if rank0 or not self.rank0_only:
            with tracking.stage_run(self.name, self.uri if rank0 else None, self.experiment, self.settings) as log:
                for work in self.work:
                    work.run() if hasattr(work, "run") else work()
                    if getattr(work, "finished", True) is False:  # a trainer that was stopped before its end
                        raise RuntimeError(f"stage {self.name!r} stopped before the end of its training; rerun the "
                                           "same command to resume it from its last checkpoint")
                log(self.metrics() if self.metrics is not None else None)
        if rank0:
            write_json({**new, "complete": True, "seconds": time.perf_counter() - start}, self.path(RECORD))
        distributed.barrier()
        return self


def stage_seconds(output_dir: str, names: Sequence[str]) -> dict:
    """Return {stage: seconds of its last computation} for the complete stages among ``names``."""
    out = {}
    for name in names:
        record = read_record(os.path.join(output_dir, name))
        if record and record.get("complete") and "seconds" in record:
            out[name] = float(record["seconds"])
    return out
