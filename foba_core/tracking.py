"""MLflow for stages that are not ignite engines (MONAI's ``--tracking mlflow`` only patches engines).

A stage runs inside ``stage_run(name, ...)``: when tracking is on, that is one MLflow run with the
stage's parameters, metrics and artifacts, in the same store MONAI's handlers use (a SQLite database
under the bundle's output folder, which works offline).
"""

from __future__ import annotations

import contextlib
import os
import sys


def requested_tracking(argv: list[str] | None = None) -> str | None:
    """Return the ``--tracking`` value given to ``python -m monai.bundle run`` (None when absent)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--tracking" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--tracking="):
            return arg.split("=", 1)[1]
    return None


def tracking_uri(output_dir: str, uri: str | None = None, tracking: str | None = None) -> str | None:
    """Return the MLflow store to log to: ``uri`` if given, MONAI's default store if tracking is on, else None."""
    if uri:
        return uri
    tracking = tracking if tracking is not None else requested_tracking()
    if tracking is None:
        return None
    if tracking != "mlflow":
        raise ValueError(f"--tracking {tracking!r} is not supported by foba's stages; use --tracking mlflow")
    from monai.utils import path_to_sqlite_uri

    os.makedirs(output_dir, exist_ok=True)
    return path_to_sqlite_uri(os.path.join(output_dir, "mlruns.db"))


@contextlib.contextmanager
def stage_run(name: str, uri: str | None, experiment: str, params: dict | None = None):
    """Yield a logger ``log(metrics=None, artifacts=())`` that records into one MLflow run when ``uri`` is set."""
    if uri is None:
        yield lambda metrics=None, artifacts=(): None
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name):
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

        def log(metrics: dict | None = None, artifacts=()) -> None:
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            for path in artifacts:
                if os.path.exists(path):
                    mlflow.log_artifact(path)

        yield log
