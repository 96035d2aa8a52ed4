"""Runs a training program and records when each of its optimizer steps ends, and its peak memory.

    python peer_timer.py RESULT.json SCRIPT.py ARGS...        # a script, as `python SCRIPT.py ARGS`
    python peer_timer.py RESULT.json -m MODULE ARGS...        # a module, as `python -m MODULE ARGS`

`pristine bench peer` runs both pristine and the other trainer through this file, so both are timed
the same way: a global post-hook on every torch optimizer's `step` (whatever wraps it: accelerate,
an LR scheduler), and the process's peak resident size at exit. It is run by path with the peer's own
Python, which need not have pristine installed: it imports nothing but the standard library and torch.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import resource
import runpy
import sys
import time


def main() -> None:
    result, target, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    started = time.perf_counter()

    def write() -> None:
        record = {"step_end_s": [t - started for t in stamps], "wall_s": time.perf_counter() - started,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "threads": torch.get_num_threads(), "torch": torch.__version__}
        with open(result + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(result + ".tmp", result)

    atexit.register(write)
    shim = os.environ.pop("PRISTINE_PEER_SHIM", "")
    if shim:
        # transformers and diffusers decide once (cached) whether torchvision is installed; they must
        # see it absent, because the stand-in holds only the transforms the script itself imports
        for name in ("transformers.utils.import_utils", "diffusers.utils.import_utils"):
            try:
                importlib.import_module(name).is_torchvision_available()
            except ImportError:
                pass
        sys.path.append(shim)
    if target == "-m":
        module, args = args[0], args[1:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
