"""Attention processors that capture (and later edit) cross-attention: what SPF's losses and DCI's
blending read. They compute attention exactly as the default processor does, keeping the maps."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class AttentionPass:
    """One attention block computed as diffusers' default processor does it, split where processors
    read or change it: `query` (before the heads split), `probs` and `value` (per head) after the
    scores; `finish(heads)` takes the heads' outputs (batch * heads, pixels, dim) to the block's output."""

    def __init__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        self.attn, self.residual = attn, hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        self.spatial_shape = tuple(hidden_states.shape) if hidden_states.ndim == 4 else None
        if self.spatial_shape is not None:
            b, c, h, w = self.spatial_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        self.batch, self.pixels, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self.cross = encoder_hidden_states is not None
        context = encoder_hidden_states if self.cross else hidden_states
        if self.cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        self.query = attn.to_q(hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(context))
        self.value = attn.head_to_batch_dim(attn.to_v(context))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], self.batch)
        self.probs = attn.get_attention_scores(attn.head_to_batch_dim(self.query), key, mask)

    def finish(self, heads: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(heads)))
        if self.spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(self.spatial_shape)
        if attn.residual_connection:
            out = out + self.residual
        return out / attn.rescale_output_factor


class CaptureCrossAttention:
    """Runs one attention block and, for cross-attention, stores its probabilities in `store[name]`
    as (batch, heads, pixels, tokens), and with a `queries` dict its queries there as (batch, pixels,
    channels), still attached to the graph so losses can use them."""

    def __init__(self, store: dict, name: str, queries: dict | None = None):
        self.store, self.name, self.queries = store, name, queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        p = AttentionPass(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if p.cross:
            if self.queries is not None:
                self.queries[self.name] = p.query
            self.store[self.name] = p.probs.view(p.batch, attn.heads, p.pixels, -1)
        return p.finish(torch.bmm(p.probs, p.value))


class CaptureJointAttention:
    """Runs a joint-attention (MMDiT) block with its own processor and stores, for the image queries,
    their attention over the text keys, renormalised over the text tokens: (batch, heads, pixels, tokens),
    the same shape and meaning as a UNet's cross-attention map. Recomputes the queries and keys for the
    map (rotary embedding included where the family has one), attached to the graph."""

    def __init__(self, original, store: dict, name: str):
        self.original, self.store, self.name = original, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        extra = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if encoder_hidden_states is not None:
            self.store[self.name] = _joint_text_map(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return out


def _joint_text_map(attn, image, text, rotary) -> torch.Tensor:
    def heads(x, norm):  # (batch, tokens, heads, head_dim), normalised as the block does
        x = x.unflatten(-1, (attn.heads, -1))
        return norm(x) if norm is not None else x

    q_img, k_img = heads(attn.to_q(image), attn.norm_q), heads(attn.to_k(image), attn.norm_k)
    q_txt, k_txt = heads(attn.add_q_proj(text), attn.norm_added_q), heads(attn.add_k_proj(text), attn.norm_added_k)
    n_txt = text.shape[1]
    if rotary is not None:  # FLUX: positions over [text; image], text first
        from diffusers.models.embeddings import apply_rotary_emb

        q = apply_rotary_emb(torch.cat([q_txt, q_img], 1), rotary, sequence_dim=1)
        k = apply_rotary_emb(torch.cat([k_txt, k_img], 1), rotary, sequence_dim=1)
        q_img, k_txt = q[:, n_txt:], k[:, :n_txt]
    scores = torch.einsum("bphd,bthd->bhpt", q_img, k_txt) * q_img.shape[-1] ** -0.5
    return scores.softmax(-1)


def _joint_layers(denoiser) -> list[str]:
    """Processors of joint-attention blocks with separate text projections (MMDiT double-stream blocks)."""
    modules = dict(denoiser.named_modules())
    return [name for name in denoiser.attn_processors
            if getattr(modules.get(name.removesuffix(".processor")), "add_k_proj", None) is not None]


def cross_attention_layers(denoiser) -> list[str]:
    """Where image queries attend to text: a UNet's attn2, or MMDiT joint attention's text side."""
    return [name for name in denoiser.attn_processors if ".attn2." in name] or _joint_layers(denoiser)


@contextmanager
def capture_cross_attention(denoiser, queries: dict | None = None):
    """Inside the block every cross-attention map of the last forward is in the yielded dict (and, given a
    `queries` dict, every UNet cross-attention layer's queries in it)."""
    store: dict[str, torch.Tensor] = {}
    original = denoiser.attn_processors
    layers = set(cross_attention_layers(denoiser))
    joint = not any(".attn2." in name for name in layers)
    processors = {name: (CaptureJointAttention(proc, store, name) if joint else CaptureCrossAttention(store, name, queries))
                  if name in layers else proc for name, proc in original.items()}
    denoiser.set_attn_processor(processors)
    try:
        yield store
    finally:
        denoiser.set_attn_processor(original)
