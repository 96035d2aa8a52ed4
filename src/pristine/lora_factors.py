"""LoRA weights as low-rank factors per layer, ΔW = scale · B @ A, so several can become one.

A sum of LoRAs is a LoRA: the ranks stand side by side (A stacked over B's columns, each B carrying
its own scale). A fully trained weight change is one too, exactly, at rank min(out, in). That is how
SPF writes an incremental run (the earlier attribute plus the new one) or a full cross-attention run
as one standard `pytorch_lora_weights.safetensors` that diffusers' `load_lora_weights` reads: the
per-layer ranks go into the file's metadata (peft `rank_pattern`), every scale folded into B.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

READING = "_pristine_reading"  # the temporary adapter a saved LoRA is read through


@dataclass
class Factors:
    a: torch.Tensor  # (rank, in), or (rank, in, kh, kw) on a convolution
    b: torch.Tensor  # (out, rank), or (out, rank, 1, 1)
    scale: float = 1.0

    def delta(self) -> torch.Tensor:
        product = self.b.float().flatten(1) @ self.a.float().flatten(1)
        return self.scale * product.reshape(self.b.shape[0], *self.a.shape[1:])


def adapter_factors(denoiser, adapter: str) -> dict[str, Factors]:
    """The factors of a peft adapter on the denoiser, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: Factors(m.lora_A[adapter].weight.detach().float().clone(), m.lora_B[adapter].weight.detach().float().clone(),
                          float(m.scaling[adapter]))
            for name, m in denoiser.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def read_lora(backbone, path: Path) -> dict[str, Factors]:
    """A saved LoRA file's factors, read as the family's `load_lora_weights` reads it (through a
    temporary adapter, deleted after)."""
    denoiser = backbone._unwrapped(backbone.denoiser)
    state, alphas, metadata = backbone.pipeline_class().lora_state_dict(str(path.parent), weight_name=path.name,
                                                                         return_lora_metadata=True)
    prefix = f"{backbone.LORA_PREFIX}."
    if not any(k.startswith(prefix) for k in state):
        raise UsageError(f"{path}: holds no LoRA layers of the {backbone.family} family's denoiser")
    denoiser.load_lora_adapter(state, prefix=backbone.LORA_PREFIX, network_alphas=alphas, adapter_name=READING,
                               metadata=metadata)
    try:
        return adapter_factors(denoiser, READING)
    finally:
        denoiser.delete_adapters(READING)


def exact_factors(delta: torch.Tensor) -> Factors:
    """A whole weight change (out, in) as factors at rank min(out, in): one of them is the identity."""
    out_features, in_features = delta.shape
    if in_features <= out_features:
        return Factors(torch.eye(in_features), delta.detach().float().clone())
    return Factors(delta.detach().float().clone(), torch.eye(out_features))


def stack(*sets: dict[str, Factors]) -> dict[str, Factors]:
    """The sum of several LoRAs as one: per module the ranks side by side, scales folded into B."""
    out: dict[str, Factors] = {}
    for factors in sets:
        for name, f in factors.items():
            b = f.b.float() * f.scale
            if name in out:
                out[name] = Factors(torch.cat([out[name].a, f.a.float()]), torch.cat([out[name].b, b], dim=1))
            else:
                out[name] = Factors(f.a.float(), b)
    return out


def merge_into(denoiser, factors: dict[str, Factors]) -> None:
    """Add each ΔW into the base weight of its module (under an adapter, into the layer it wraps)."""
    modules = dict(denoiser.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            module = modules[name]
            weight = getattr(module, "base_layer", module).weight
            weight += f.delta().to(weight)


def write_lora(backbone, factors: dict[str, Factors], out_dir: Path) -> Path:
    """Factors as the family's standard LoRA file: scale 1 everywhere (alpha = rank per module)."""
    ranks = {name: f.a.shape[0] for name, f in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    layers = {}
    for name, f in factors.items():
        layers[f"{name}.lora_A.weight"] = f.a.float().contiguous()
        layers[f"{name}.lora_B.weight"] = (f.b.float() * f.scale).contiguous()
    metadata = {"r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                "target_modules": sorted(factors)}
    return backbone.write_lora_layers(layers, metadata, out_dir)
