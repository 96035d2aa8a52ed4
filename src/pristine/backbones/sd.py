"""Stable Diffusion 1.x / 2.x (and pristine-mini): a UNet on VAE latents, one CLIP text encoder."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Backbone


class StableDiffusionBackbone(Backbone):
    family = "sd"

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        self.folder = folder
        # safetensors only: a pickle can run code (None lets the libraries fall back to .bin)
        load = {"torch_dtype": dtype, "local_files_only": True, "use_safetensors": None if allow_pickle else True}
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **load)
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", **load)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", **load)
        # training always uses the DDPM forward process the model was trained with
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False).eval()
        self.denoiser = self.unet
        self.text_encoders = [self.text_encoder]
        self.tokenizers = [self.tokenizer]

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- prompts ----
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}

    def add_tokens(self, tokens: list[str], init_words: list[str], vectors_per_token: int = 1) -> list[int]:
        """Tokens "<v1>" (and "<v1>_1", ... when several vectors) with rows copied from init words."""
        from ..errors import UsageError

        new_ids = []
        embeddings = self.text_encoder.get_input_embeddings()
        for token, word in zip(tokens, init_words):
            names = [token] + [f"{token}_{k}" for k in range(1, vectors_per_token)]
            for name in names:
                vocab = self.tokenizer.get_vocab()
                if name in vocab or f"{name}</w>" in vocab:
                    raise UsageError(f"token {name!r} is already in the tokenizer's vocabulary; choose a new token such as <v1>")
            self.tokenizer.add_tokens(names)
            init_ids = self.tokenizer(word, add_special_tokens=False).input_ids or [self.tokenizer.eos_token_id]
            self.text_encoder.resize_token_embeddings(len(self.tokenizer))
            embeddings = self.text_encoder.get_input_embeddings()
            with torch.no_grad():
                init = embeddings.weight[init_ids].mean(0)
                for name in names:
                    idx = self.tokenizer.convert_tokens_to_ids(name)
                    embeddings.weight[idx] = init
                    new_ids.append(idx)
        return new_ids

    def expand_prompt(self, prompt: str, tokens: dict[str, int]) -> str:
        """'<v1>' -> '<v1> <v1>_1 ...' for multi-vector tokens (as diffusers does when it loads them)."""
        for token, n in tokens.items():
            if n > 1:
                prompt = prompt.replace(token, " ".join([token] + [f"{token}_{k}" for k in range(1, n)]))
        return prompt

    # ---- images and noise ----
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mean
        return latents * self.vae.config.scaling_factor

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0, noise, t):
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def predict(self, x_t, t, cond):
        return self.unet(x_t, t, **cond).sample

    # ---- inference ----
    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
        text_encoder = getattr(self.text_encoder, "module", self.text_encoder)  # unwrapped under DDP
        return StableDiffusionPipeline(vae=self.vae, text_encoder=text_encoder, tokenizer=self.tokenizer,
                                       unet=self.denoiser, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
