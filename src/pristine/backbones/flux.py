"""FLUX.1 (dev and schnell): an MMDiT transformer (double- then single-stream blocks) on 2x2-packed
16-channel latents; CLIP (pooled) + T5 (tokens); flow matching. dev-style models embed a guidance
value (`guidance_embeds`), schnell-style ones do not."""

from __future__ import annotations

from typing import ClassVar

import torch

from .flow import FlowMatchingBackbone


class FluxBackbone(FlowMatchingBackbone):
    family = "flux"
    TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    TIMESTEP_SAMPLING = "uniform"  # then shifted as the scheduler shifts (dev: by resolution; schnell: none)
    MAX_SEQUENCE_LENGTH = 512
    EXPORTS = ("kohya",)
    KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1_"}  # the CLIP one; T5 never gets a LoRA
    NEGATIVE_PROMPT = False  # guidance-distilled: the guidance value is an input, no negative branch
    # the guidance value a dev-style model is trained under (diffusers' FLUX DreamBooth script's default)
    TRAIN_GUIDANCE: ClassVar[float] = 3.5

    @classmethod
    def pipeline_class(cls):
        from diffusers import FluxPipeline

        return FluxPipeline

    @property
    def image_size(self) -> int:
        return self.vae.config.sample_size  # the transformer has no size of its own; FLUX.1's VAE says 1024

    def write_kohya(self, diffusers_lora, out, alpha):
        from ..export import write_kohya_flux

        modules = dict(self._unwrapped(self.denoiser).named_modules())
        return write_kohya_flux(diffusers_lora, out, alpha, lambda name: modules[name].out_features,
                                self.KOHYA_TEXT_PREFIXES)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.text_pipeline().encode_prompt(prompts, prompts, device=self.denoiser.device,
                                                               max_sequence_length=self.MAX_SEQUENCE_LENGTH)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, x_t, t, cond):
        pipe = self.pipeline_class()
        b, c, h, w = x_t.shape
        packed = pipe._pack_latents(x_t, b, c, h, w)  # (b, h/2 * w/2, 4c): the transformer's tokens
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.TRAIN_GUIDANCE, device=x_t.device, dtype=x_t.dtype)
        out = self.denoiser(hidden_states=packed, timestep=self.sigma(t, x_t), guidance=guidance, txt_ids=txt_ids,
                            img_ids=img_ids, **cond).sample
        return pipe._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)
