"""Stable Diffusion 3 / 3.5: an MMDiT transformer (joint attention over image and text tokens) on
16-channel VAE latents; CLIP-L + CLIP-G (hidden states and pooled) + T5; flow matching."""

from __future__ import annotations

import torch

from .flow import FlowMatchingBackbone


class StableDiffusion3Backbone(FlowMatchingBackbone):
    family = "sd3"
    TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
    TIMESTEP_SAMPLING = "logit_normal"
    MAX_SEQUENCE_LENGTH = 256
    # a kohya SD3 file could not be checked against any loader: diffusers' SD3 loader converts none
    EXPORT_NOTE = "diffusers' SD3 loader reads no kohya file; share pytorch_lora_weights.safetensors"

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    @property
    def image_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.text_pipeline().encode_prompt(
            prompts, prompts, prompts, device=self.denoiser.device, do_classifier_free_guidance=False,
            max_sequence_length=self.MAX_SEQUENCE_LENGTH)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, x_t, t, cond):
        # the transformer takes σ on the scheduler's 0..1000 scale, as the pipeline passes it
        timestep = self.sigma(t, x_t) * self.scheduler.config.num_train_timesteps
        return self.denoiser(hidden_states=x_t, timestep=timestep, **cond).sample
