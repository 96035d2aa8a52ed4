"""Attention processors that capture (and later edit) cross-attention: what SPF's losses and DCI's
blending read. They compute attention exactly as the default processor does, keeping the maps."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class CaptureCrossAttention:
    """Runs one attention block and, for cross-attention, stores its probabilities in `store[name]`
    as (batch, heads, pixels, tokens), still attached to the graph so losses can use them."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, pixels, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        probs = attn.get_attention_scores(query, key, mask)
        if cross:
            self.store[self.name] = probs.view(batch, attn.heads, pixels, -1)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(denoiser) -> list[str]:
    return [name for name in denoiser.attn_processors if ".attn2." in name]


@contextmanager
def capture_cross_attention(denoiser):
    """Inside the block every cross-attention map of the last forward is in the yielded dict."""
    store: dict[str, torch.Tensor] = {}
    original = denoiser.attn_processors
    processors = {name: CaptureCrossAttention(store, name) if ".attn2." in name else proc
                  for name, proc in original.items()}
    denoiser.set_attn_processor(processors)
    try:
        yield store
    finally:
        denoiser.set_attn_processor(original)
