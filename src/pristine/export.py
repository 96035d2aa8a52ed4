"""Adapter formats in and out: diffusers LoRA <-> kohya / ComfyUI key layout.

kohya sd-scripts names a LoRA layer `lora_unet_<module path, dots as underscores>` (text encoders:
`lora_te_` for SD1.x/2.x's one, `lora_te1_` / `lora_te2_` for SDXL's two and FLUX.1's CLIP), with
`.lora_down.weight`, `.lora_up.weight` and `.alpha`. The module path is the UNet kohya itself trains
on: for SD1.x/2.x that is a copy of diffusers' UNet (`down_blocks_0_attentions_0_...`), for SDXL the
original (SGM) one (`input_blocks_4_1_...`); FLUX.1 follows BFL's model with fused q/k/v.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import atomic_save


def ldm_block(name: str, config: dict) -> str:
    """diffusers UNet module path -> the original (LDM / SGM) Stable Diffusion path kohya names SDXL keys
    by; `config` is the UNet's (its layers per block, and which up blocks have attention)."""
    layers_per_block = config["layers_per_block"]
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
    m = re.match(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?resnets\.(\d+)\.(\w+)$", name)
    if m and m[4] in _LDM_RESNET:  # a resnet's layers (LoRA on convolutions, kohya's conv_dim)
        kind, i, j, layer = m[1], int(m[2] or 0), int(m[3]), _LDM_RESNET[m[4]]
        if kind == "mid_block":
            return f"middle_block.{2 * j}.{layer}"
        block = 1 + i * (layers_per_block + 1) + j if kind == "down_blocks" else i * (layers_per_block + 1) + j
        return f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{block}.0.{layer}"
    # a block's resampler: its own input block after the down block's layers; in the up block's last
    # output block, after the resnet and, where the block has one, the attention
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", name)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (layers_per_block + 1)}.0.op"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", name)
    if m:
        i = int(m[1])
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * (layers_per_block + 1) + layers_per_block}.{slot}.conv"
    raise ValueError(f"no kohya name for UNet module {name!r}")


# diffusers' ResnetBlock2D layer -> the original ResBlock's
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def _lora_pairs(state: dict[str, torch.Tensor], prefix: str = "unet") -> dict[str, dict[str, torch.Tensor]]:
    """Group diffusers LoRA tensors by the module they adapt: {module: {'down': A, 'up': B}}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(re.escape(prefix) + r"\.(.*)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)\.weight$", key)
        if not m:
            continue
        kind = "down" if m[2] in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
        pairs.setdefault(m[1], {})[kind] = value
    return pairs


def _kohya_layer(tensors: dict, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    tensors[f"{name}.lora_down.weight"] = down.to(torch.float16)
    tensors[f"{name}.lora_up.weight"] = up.to(torch.float16)
    tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)


def _text_encoder_layers(state: dict[str, torch.Tensor], tensors: dict, alpha: float,
                         text_prefixes: dict[str, str]) -> None:
    """The text encoders' LoRA layers (diffusers file prefix -> kohya prefix), module paths as they are."""
    for file_prefix, kohya_prefix in text_prefixes.items():
        for module, pair in _lora_pairs(state, file_prefix).items():
            _kohya_layer(tensors, kohya_prefix + module.replace(".", "_"), pair["down"], pair["up"], alpha)


def write_kohya(diffusers_lora: Path, out: Path, alpha: float, unet_path=lambda module: module,
                text_prefixes: dict[str, str] | None = None) -> Path:
    """kohya sd-scripts / ComfyUI layout of a UNet family's LoRA: lora_unet_<unet_path(module)>, and the
    text encoders' layers under their kohya prefixes."""
    state = load_file(str(diffusers_lora))
    pairs = _lora_pairs(state)
    tensors = {}
    for module, pair in pairs.items():
        _kohya_layer(tensors, "lora_unet_" + unet_path(module).replace(".", "_"), pair["down"], pair["up"], alpha)
    _text_encoder_layers(state, tensors, alpha, text_prefixes or {})
    atomic_save(tensors, out, metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha),
                                        "ss_network_dim": str(next(iter(pairs.values()))["down"].shape[0])})
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


def write_kohya_flux(diffusers_lora: Path, out: Path, alpha: float, out_features,
                     text_prefixes: dict[str, str] | None = None) -> Path:
    """kohya sd-scripts / ComfyUI FLUX.1 layout. LoRAs on the parts of a fused layer become one LoRA of
    the summed rank whose up matrix is block-diagonal (zero blocks for parts without a LoRA), with the
    alpha scaled alike, so alpha / rank, and the update, stay the same; `out_features(module)` gives a
    part's output width. The CLIP text encoder's layers (when trained) keep their own names under `lora_te1_`."""
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
    _text_encoder_layers(state, tensors, alpha, text_prefixes or {})
    atomic_save(tensors, out, metadata={"ss_network_module": "networks.lora_flux", "ss_network_alpha": str(alpha)})
    return out


# ---- Custom Diffusion: diffusers' attention-processor layout ----------------------------------------

CUSTOM_DIFFUSION_PROCS = "pytorch_custom_diffusion_weights.safetensors"  # the name diffusers' script writes


def custom_diffusion_attn_procs(unet, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained cross-attention K/V (denoiser parameter name -> weight) as the state dict
    `unet.load_attn_procs` turns into CustomDiffusionAttnProcessors: '<processor>.to_k_custom_diffusion.weight'
    and '.to_v_custom_diffusion.weight' per cross-attention layer. Every other attention layer gets an
    empty tensor under its processor's name: the loader then builds a plain processor for it, and the
    set of processors is complete, which `set_attn_processor` requires (diffusers' own safetensors file
    leaves them out, so it loads only with the pickled variant)."""
    out = {}
    for processor in unet.attn_processors:
        layer = processor[: -len(".processor")]
        k, v = trained.get(f"{layer}.to_k.weight"), trained.get(f"{layer}.to_v.weight")
        if k is None or v is None:
            out[processor] = torch.zeros(0)
            continue
        out[f"{processor}.to_k_custom_diffusion.weight"] = k.detach().float().contiguous()
        out[f"{processor}.to_v_custom_diffusion.weight"] = v.detach().float().contiguous()
    return out
