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


def _lora_pairs(state: dict[str, torch.Tensor], prefix: str = "unet") -> dict[str, dict[str, torch.Tensor]]:
    """Group diffusers LoRA tensors by the module they adapt: {module: {'down': A, 'up': B}}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(prefix + r"\.(.*)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)\.weight$", key)
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


# ---- FLUX.1: kohya names follow the original (BFL) model, whose q/k/v (and, in single-stream blocks,
# the MLP input) are one fused linear layer each ------------------------------------------------------

_FLUX_DOUBLE = {  # diffusers module (under transformer_blocks.i) -> kohya module (double_blocks_i_...)
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn_qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn_qkv",
    ("attn.to_out.0",): "img_attn_proj", ("attn.to_add_out",): "txt_attn_proj",
    ("ff.net.0.proj",): "img_mlp_0", ("ff.net.2",): "img_mlp_2",
    ("ff_context.net.0.proj",): "txt_mlp_0", ("ff_context.net.2",): "txt_mlp_2",
    ("norm1.linear",): "img_mod_lin", ("norm1_context.linear",): "txt_mod_lin",
}
_FLUX_SINGLE = {  # under single_transformer_blocks.i -> single_blocks_i_...
    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"): "linear1",
    ("proj_out",): "linear2", ("norm.linear",): "modulation_lin",
}


def write_kohya_flux(diffusers_lora: Path, out: Path, alpha: float, out_features) -> Path:
    """kohya sd-scripts / ComfyUI FLUX.1 layout. LoRAs on the parts of a fused layer become one LoRA of
    the summed rank whose up matrix is block-diagonal (zero blocks for parts without a LoRA), with the
    alpha scaled alike, so alpha / rank, and the update, stay the same; `out_features(module)` gives a
    part's output width."""
    state = load_file(str(diffusers_lora))
    pairs = _lora_pairs(state, "transformer")
    tensors, used = {}, set()
    for module in sorted(pairs):
        m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.*)", module)
        table = _FLUX_SINGLE if m and m[1] == "single_transformer_blocks" else _FLUX_DOUBLE
        group = next((g for g in table if m and m[3] in g), None)
        if group is None:
            raise ValueError(f"no kohya name for FLUX.1 module {module!r}")
        names = [f"{m[1]}.{m[2]}.{part}" for part in group]
        if names[0] in used:
            continue
        used.update(names)
        rank = pairs[module]["down"].shape[0]
        downs, ups = [], []
        for name in names:
            pair = pairs.get(name)
            if pair is None:  # a part without LoRA: zero rows in the fused up matrix
                dim_in = pairs[module]["down"].shape[1]
                pair = {"down": torch.zeros(rank, dim_in), "up": torch.zeros(out_features(name), rank)}
            downs.append(pair["down"].float())
            ups.append(pair["up"].float())
        kohya = f"lora_unet_{'single_blocks' if m[1].startswith('single') else 'double_blocks'}_{m[2]}_{table[group]}"
        tensors[f"{kohya}.lora_down.weight"] = torch.cat(downs).to(torch.float16)
        tensors[f"{kohya}.lora_up.weight"] = torch.block_diag(*ups).to(torch.float16)
        tensors[f"{kohya}.alpha"] = torch.tensor(float(alpha) * len(names), dtype=torch.float16)
    atomic_save(tensors, out, metadata={"ss_network_module": "networks.lora_flux", "ss_network_alpha": str(alpha)})
    return out
