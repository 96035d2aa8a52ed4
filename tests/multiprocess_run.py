"""Run by the multi-process tests under torchrun: one training run, then each process writes the
tensors it trained (and the optimizer step it reached) to DUMP/rank{N}.safetensors.

usage: multiprocess_run.py DUMP_FOLDER TRAIN_FLAGS...
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from pristine.cli import build_parser, train_config_from_args
from pristine.train import run_training

if __name__ == "__main__":
    from accelerate import PartialState

    dump = Path(sys.argv[1])
    config = train_config_from_args(build_parser().parse_args(["train", *sys.argv[2:]]))
    out, method = run_training(config)
    rank = PartialState().process_index
    dump.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in method.trainable_state().items()},
              str(dump / f"rank{rank}.safetensors"))
