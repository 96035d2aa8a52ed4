"""Stable Diffusion XL: a UNet on VAE latents, two CLIP text encoders (penultimate hidden states of
both, concatenated) plus the second one's pooled embedding and the size/crop "time ids"."""

from __future__ import annotations

import torch

from .sd import StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    family = "sdxl"
    TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    PIPELINE_KWARGS = {}
    ENCODES_WITH_PIPELINE = True
    KOHYA_SGM_NAMES = True
    KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # the pipeline's own encode_prompt: training sees exactly the conditioning inference builds
        embeds, _, pooled, _ = self.text_pipeline().encode_prompt(prompts, device=self.denoiser.device,
                                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def unconditional(self, n):
        # SDXL's pipeline guides against zeros, not the empty prompt's embedding, unless its config says otherwise
        import json

        index = json.loads((self.folder / "model_index.json").read_text())
        if not index.get("force_zeros_for_empty_prompt", True):
            return super().unconditional(n)
        return {k: torch.zeros_like(v) for k, v in self.encode_prompts([""] * n).items()}

    def context_init(self, word, n):
        self._no_contexts()  # two text encoders: ICO's contexts are placed in SD1.x/2.x's one only

    def encode_with_contexts(self, prompts, prefix, suffix):
        self._no_contexts()

    def predict(self, x_t, t, cond):
        # training images are resized and center-cropped to the target size: original = target, crop (0, 0)
        h, w = (d * self.vae_scale for d in x_t.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device).expand(len(x_t), 6)
        return self.denoiser(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                             added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": time_ids}).sample
