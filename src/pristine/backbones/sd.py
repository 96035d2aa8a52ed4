"""Stable Diffusion 1.x / 2.x (and pristine-mini): a UNet on VAE latents, one CLIP text encoder."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Backbone


class ConstantCrossAttention(torch.nn.Module):
    """Stands where a transformer block's cross-attention (and the norm before it) was: adds the same
    vector at every position, whatever the text. The vector is a buffer, so it is in the state dict and
    a strict load fails without it (the authors' release loads a zero buffer with strict=False).

    While `replaced` holds the original (norm, attention), the module runs them instead and sums their
    outputs: that is how the constant is measured, by real forward passes."""

    def __init__(self, dim: int, replaced: tuple[torch.nn.Module, torch.nn.Module] | None = None):
        super().__init__()
        self.register_buffer("constant", torch.zeros(dim))
        # a plain attribute, not submodules: the replaced weights are neither trained nor saved
        self.replaced = replaced
        self.total, self.count = None, 0

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.replaced is None:
            return self.constant.to(hidden_states.dtype).expand_as(hidden_states)
        norm, attention = self.replaced
        out = attention(norm(hidden_states), encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                        **kwargs)
        flat = out.detach().double().reshape(-1, out.shape[-1])  # (batch x positions, dim)
        self.total = flat.sum(0) if self.total is None else self.total + flat.sum(0)
        self.count += len(flat)
        return out

    def finish_measuring(self) -> torch.Tensor:
        if not self.count:
            raise RuntimeError("a cross-attention block never ran while its constant was measured")
        with torch.no_grad():
            self.constant.copy_((self.total / self.count).to(self.constant))
        self.replaced, self.total, self.count = None, None, 0
        return self.constant.detach().clone()


class StableDiffusionBackbone(Backbone):
    """Also the base of SDXL: the DDPM forward process on VAE latents and a UNet denoiser."""

    family = "sd"
    PIPELINE_KWARGS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    EXPORTS = ("kohya",)

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
        from diffusers import DDPMScheduler

        super().__init__(folder, dtype, allow_pickle)
        # training always uses the DDPM forward process the model was trained with
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type

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
        return self.denoiser(x_t, t, **cond).sample

    # ---- the concept-centric (null-text) model ----
    def make_text_free(self, measure: bool = True) -> dict[str, torch.nn.Module]:
        denoiser = self._unwrapped(self.denoiser)
        blocks = [(name, m) for name, m in denoiser.named_modules()
                  if getattr(m, "attn2", None) is not None and getattr(m.attn2, "is_cross_attention", False)]
        if not blocks:
            raise ValueError("no cross-attention blocks found in the UNet")
        constants = {}
        for name, block in blocks:
            dim = block.attn2.to_out[0].out_features
            replaced = (block.norm2, block.attn2) if measure else None
            device = block.attn2.to_out[0].weight.device
            block.attn2 = ConstantCrossAttention(dim, replaced).to(device)
            block.norm2 = torch.nn.Identity()
            constants[f"{name}.attn2" if name else "attn2"] = block.attn2
        return constants

    def measure_null_text(self, latents, generator, passes=8):
        modules = {n: m for n, m in self._unwrapped(self.denoiser).named_modules() if isinstance(m, ConstantCrossAttention)}
        pending = [m for m in modules.values() if m.replaced is not None]
        if not pending:
            raise ValueError("nothing to measure: call make_text_free(measure=True) first")
        device = self.denoiser.device
        for m in pending:  # the replaced blocks are no submodules, so they did not move with the model
            for part in m.replaced:
                part.to(device)
        latents = latents.to(device)
        cond = self.unconditional(len(latents))
        with torch.no_grad():
            for _ in range(passes):
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                t = self.sample_timesteps(len(latents), generator).to(device)
                self.predict(self.add_noise(latents, noise, t), t, cond)
        return {n: m.finish_measuring() for n, m in modules.items() if m in pending}

    def predict_x0(self, x_t, t, pred):
        alpha = self.noise_scheduler.alphas_cumprod.to(x_t.device)[t.to(x_t.device)].view(-1, *([1] * (x_t.ndim - 1)))
        alpha = alpha.to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            return alpha.sqrt() * x_t - (1 - alpha).sqrt() * pred
        return (x_t - (1 - alpha).sqrt() * pred) / alpha.sqrt()

    def decode_latents(self, latents):
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    # ---- reading cross-attention: keys are the CLIP tokens, start token first ----
    def capture_attention(self, queries=None):
        from ..attention import capture_cross_attention

        return capture_cross_attention(self._unwrapped(self.denoiser), queries)

    def prompt_words(self, prompt):
        from ..phrases import prompt_words

        return prompt_words(self.tokenizer, prompt, limit=self.tokenizer.model_max_length - 1)

    def phrase_positions(self, prompt, phrase):
        from ..phrases import phrase_positions

        return phrase_positions(self.tokenizer, prompt, phrase, limit=self.tokenizer.model_max_length - 1)

    def end_positions(self, prompt):
        from ..phrases import end_positions

        return end_positions(self.tokenizer, prompt, self.tokenizer.model_max_length)

    def text_token_states(self, cond):
        return cond["encoder_hidden_states"]

    # ---- image-specific contexts (ICO): the CLIP embedding layer's output, positions already added ----
    def _text_embeddings(self):
        """The CLIP text model's embedding layer (token + position), whichever transformers nests it."""
        encoder = self.text_encoder
        return getattr(encoder, "text_model", encoder).embeddings

    def context_init(self, word, n):
        embeddings = self._text_embeddings()
        ids = [self.tokenizer.bos_token_id, *self.tokenizer(word, add_special_tokens=False).input_ids[:1],
               self.tokenizer.eos_token_id]
        with torch.no_grad():
            states = embeddings(input_ids=torch.tensor([ids], device=self.text_encoder.device))
        return states[0, 1].detach().clone().repeat(n, 1)

    def encode_with_contexts(self, prompts, prefix, suffix):
        tok = self.tokenizer
        n_ctx, n_end = prefix.shape[1], suffix.shape[1]
        rows = tok(prompts, padding="max_length", max_length=tok.model_max_length - n_ctx - n_end, truncation=True).input_ids
        ids, prefix_at, suffix_at = [], [], []
        for row in rows:
            k = list(row).index(tok.eos_token_id, 1) - 1  # the prompt's own tokens
            # placeholders (the start token's id) where the contexts go; their embeddings are replaced
            ids.append(row[:1] + [tok.bos_token_id] * n_ctx + row[1:1 + k] + [tok.bos_token_id] * n_end + row[1 + k:])
            prefix_at.append(list(range(1, 1 + n_ctx)))
            suffix_at.append(list(range(1 + n_ctx + k, 1 + n_ctx + k + n_end)))

        def insert(module, args, output):
            out = output.clone()
            for i in range(len(out)):
                out[i, prefix_at[i]] = prefix[i].to(out.dtype)
                out[i, suffix_at[i]] = suffix[i].to(out.dtype)
            return out

        handle = self._text_embeddings().register_forward_hook(insert)
        try:
            states = self.text_encoder(torch.tensor(ids, device=self.text_encoder.device))[0]
        finally:
            handle.remove()
        return {"encoder_hidden_states": states}

    # ---- outputs and inference ----
    # kohya trains SD1.x/2.x on a copy of diffusers' UNet, so its keys keep diffusers' block names;
    # SDXL's override says SGM (input_blocks_...), the UNet kohya trains SDXL on
    KOHYA_SGM_NAMES = False

    def write_kohya(self, diffusers_lora: Path, out: Path, alpha: float) -> Path:
        from ..export import ldm_block, write_kohya

        config = dict(self._unwrapped(self.unet).config)
        path = (lambda module: ldm_block(module, config)) if self.KOHYA_SGM_NAMES else (lambda module: module)
        return write_kohya(diffusers_lora, out, alpha, path, self.KOHYA_TEXT_PREFIXES)

    def sampling_scheduler(self):
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    def generation_pipeline(self):
        from diffusers import DDIMScheduler

        pipe = self.pipeline()
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # 30 DDIM steps, not 1000 DDPM ones
        return pipe
