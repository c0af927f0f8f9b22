"""Run ``python -m monai.bundle <args>`` in this process and SIGKILL it at a chosen point (tests/test_kill.py).

    python tests/kill_run.py POINT:N run --config_file ... [--key value ...]

POINT is where the process kills itself:
  iteration         after training iteration N has completed (between checkpoints)
  checkpoint-write  inside the N-th checkpoint this process writes, when half of its bytes are on disk
  prune             after the N-th checkpoint is complete, before the older ones are removed
"""

import os
import runpy
import signal
import sys


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, n: int) -> None:
    from foba_core import checkpoints, engines

    if point == "iteration":
        from ignite.engine import Events

        run = engines.ResumableTrainer.run

        def run_then_die(self):
            self.add_event_handler(Events.ITERATION_COMPLETED(once=n), lambda engine: kill())
            run(self)

        engines.ResumableTrainer.run = run_then_die
    elif point == "checkpoint-write":
        real, count = checkpoints.atomic_write, [0]

        def write_half_then_die(path, write):
            count[0] += 1
            if count[0] < n:
                return real(path, write)

            def half(tmp):
                write(tmp)
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                kill()

            return real(path, half)

        checkpoints.atomic_write = write_half_then_die
    elif point == "prune":
        real, count = checkpoints.prune_checkpoints, [0]

        def die_before_pruning(*args, **kwargs):
            count[0] += 1
            if count[0] >= n:
                kill()
            return real(*args, **kwargs)

        checkpoints.prune_checkpoints = die_before_pruning
    else:
        raise SystemExit(f"unknown kill point {point!r}; use iteration, checkpoint-write or prune")


if __name__ == "__main__":
    point, n = sys.argv[1].split(":")
    install(point, int(n))
    sys.argv = ["monai.bundle", *sys.argv[2:]]
    runpy.run_module("monai.bundle", run_name="__main__")
