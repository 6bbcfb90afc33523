"""train_net.py in which rank 1 raises at iteration 3: the whole job must end, not hang."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import detectron2.utils.comm as comm  # noqa: E402

import train_net  # noqa: E402

_run_step = train_net.Trainer.run_step


def _run_step_failing_on_rank_1(self):
    if comm.get_rank() == 1 and self.iter == 3:
        raise RuntimeError("injected fault on rank 1 at iteration 3")
    _run_step(self)


# at import time, so that the processes spawned by launch (which re-import this file) have it
train_net.Trainer.run_step = _run_step_failing_on_rank_1

if __name__ == "__main__":
    train_net.command(train_net.argument_parser().parse_args())
