"""Resumable training state in safetensors: model weights, optimizer moments, RNG, counters.

Nothing here unpickles. Optimizer state tensors are flattened to keys; its hyper-parameters and the
caller's counters travel as JSON in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import durable_replace


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial temporary behind


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer's state as flat tensors plus its hyper-parameters as JSON metadata."""
    opt = optimizer.state_dict()
    tensors = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": json.dumps(opt["param_groups"])}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def save_training_state(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict, scheduler=None):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        **opt_meta,
        "extra": json.dumps(extra),
        "lr_scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None),
    }
    atomic_save(tensors, path, meta)


def load_training_state(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer_tensors(optimizer, tensors, meta)
    torch.set_rng_state(tensors["rng.torch"])
    sched_state = json.loads(meta.get("lr_scheduler", "null"))
    if scheduler is not None and sched_state is not None:
        scheduler.load_state_dict(sched_state)
    return json.loads(meta["extra"])
