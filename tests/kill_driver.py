"""Run `sparsevl train ARGS...` and, if asked, stop at a chosen point so that a test can SIGKILL the process there.

PAUSE=step:N  waits before the forward pass of step N+1 (steps 1..N are done);
PAUSE=save:N  waits inside the save of checkpoint-N, after model and optimizer are written, before the RNG
              state and trainer_state.json. In both cases the file named by MARKER is created first.
The wait only picks the moment; the kill itself is a real SIGKILL from the test.
STEPS=FILE     appends the number of every step this process trains to FILE (one per line), so a test can
              tell that a resumed process trains only the remaining steps.
"""

import os
import sys
import time
from pathlib import Path

from sparsevl.cli import main
from sparsevl.train.trainer import SparseVLTrainer


def wait_forever(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def install_pause(point: str, marker: str) -> None:
    kind, step = point.split(":")
    step = int(step)
    method = {"step": "training_step", "save": "_save_rng_state"}[kind]
    original = getattr(SparseVLTrainer, method)

    def paused(self, *args, **kwargs):
        if self.state.global_step == step:
            wait_forever(marker)
        return original(self, *args, **kwargs)

    setattr(SparseVLTrainer, method, paused)


def record_steps(path: str) -> None:
    original = SparseVLTrainer.training_step

    def recorded(self, *args, **kwargs):
        with open(path, "a") as handle:
            handle.write(f"{self.state.global_step + 1}\n")
        return original(self, *args, **kwargs)

    SparseVLTrainer.training_step = recorded


if __name__ == "__main__":
    if os.environ.get("STEPS"):
        record_steps(os.environ["STEPS"])
    if os.environ.get("PAUSE"):
        install_pause(os.environ["PAUSE"], os.environ["MARKER"])
    sys.exit(main(["train", *sys.argv[1:]]))
