"""Adapter formats in and out: diffusers LoRA <-> kohya / ComfyUI key layout."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import atomic_save


def _ldm_block(name: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> the original (LDM) Stable Diffusion path kohya names keys by."""
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + i * (layers_per_block + 1) + j}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{i * (layers_per_block + 1) + j}.1.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", name)
    if m:
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no kohya name for UNet module {name!r}")


def _lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group diffusers LoRA tensors by the module they adapt: {module: {'down': A, 'up': B}}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"unet\.(.*)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)\.weight$", key)
        if not m:
            continue
        kind = "down" if m[2] in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
        pairs.setdefault(m[1], {})[kind] = value
    return pairs


def write_kohya(diffusers_lora: Path, out: Path, alpha: float, layers_per_block: int) -> Path:
    """kohya sd-scripts / ComfyUI layout: lora_unet_<ldm path>.lora_down/.lora_up/.alpha."""
    state = load_file(str(diffusers_lora))
    tensors = {}
    for module, pair in _lora_pairs(state).items():
        name = "lora_unet_" + _ldm_block(module, layers_per_block).replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = pair["down"].to(torch.float16)
        tensors[f"{name}.lora_up.weight"] = pair["up"].to(torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    atomic_save(tensors, out, metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha),
                                        "ss_network_dim": str(next(iter(_lora_pairs(state).values()))["down"].shape[0])})
    return out
