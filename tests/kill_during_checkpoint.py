"""Run by test_resume_after_kill: `pristine train FLAGS...`, killed with SIGKILL halfway through writing
the checkpoint of step KILL_AT_STEP (half of the file is on disk under its temporary name).

usage: kill_during_checkpoint.py KILL_AT_STEP TRAIN_FLAGS...
"""

import os
import signal
import sys

import pristine.checkpoint as checkpoint
from pristine.cli import main

if __name__ == "__main__":
    kill_at = f"step_{int(sys.argv[1]):07d}"
    real_save = checkpoint.save_file

    def save_then_die(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        if kill_at in str(path):
            with open(path, "rb+") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = save_then_die
    sys.exit(main(["train", *sys.argv[2:]]))
