"""The one small interface every model family implements.

A method only ever asks a backbone to encode prompts, add noise, give the training target and
predict; epsilon, v-prediction and flow-matching families all fit behind these calls.

What a method may read of a prediction
--------------------------------------
- `predict(x_t, t, cond)` returns a tensor shaped like `x0` (the latents from `encode_images`), in the
  same space as `target(x0, noise, t)`: methods may subtract, compare and combine predictions and
  targets elementwise and reduce over any dimension (PureCC's R = f(y_tar) - f(∅) is such a difference).
- `t` is opaque: a method draws it with `sample_timesteps` and hands it back to `add_noise`, `target`
  and `predict`, never reads its values (DDPM integer steps in one family, flow sigmas in another).
- `cond` (from `encode_prompts`) is a dict of tensors batched along dim 0: methods may index, slice,
  concatenate and cache it along dim 0, never look inside.
- Latents are opaque too (4-D for every family here; FLUX packs them inside `predict` only).
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import UsageError
from ..files import durable_replace


class Backbone(ABC):
    family: str = ""
    denoiser: torch.nn.Module  # where adapters attach (UNet or transformer)
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    folder: Path
    # the pipeline attribute names of (tokenizer, text encoder) pairs, in order: new tokens go into all
    TEXT_PAIRS: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"),)
    # how the family's diffusers `save_lora_weights` names the denoiser: unet_lora_layers / transformer_lora_layers
    LORA_PREFIX: ClassVar[str] = "unet"
    # LoRA's default target modules (peft names) for this family's attention layers
    LORA_TARGETS: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # substrings naming the projections that map *text* to keys and values (Custom Diffusion trains them)
    TEXT_KV: ClassVar[tuple[str, ...]] = (".attn2.to_k.", ".attn2.to_v.")
    PIPELINE_KWARGS: ClassVar[dict] = {}  # extra from_pretrained / constructor settings of the family's pipeline
    ENCODES_WITH_PIPELINE: ClassVar[bool] = False  # encode_prompts goes through the pipeline's encode_prompt

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
        """Every component of the local diffusers folder, frozen; the denoiser is `unet` or `transformer`.

        safetensors only unless the user passed --allow-pickle (a pickle can run code; None lets the
        libraries fall back to .bin files)."""
        self.folder = Path(folder)
        pipe = self.pipeline_class().from_pretrained(str(self.folder), torch_dtype=dtype, local_files_only=True,
                                                     use_safetensors=None if allow_pickle else True, **self.PIPELINE_KWARGS)
        self.component_names = list(pipe.components)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
            setattr(self, name, component)
        self.denoiser = pipeline_denoiser(pipe)
        self.text_encoders = [enc for _, _, enc in self.text_pairs()]
        self.tokenizers = [tok for _, tok, _ in self.text_pairs()]

    # ---- prompts ----
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning for the denoiser, as keyword tensors batched along dim 0."""

    def text_pairs(self) -> list[tuple[str, object, torch.nn.Module]]:
        """(encoder name, tokenizer, text encoder) for every text encoder of the family."""
        return [(enc, getattr(self, tok), getattr(self, enc)) for tok, enc in self.TEXT_PAIRS
                if getattr(self, enc, None) is not None]  # SD3 may come without its T5

    def add_tokens(self, tokens: list[str], init_words: list[str], vectors_per_token: int = 1) -> list[list[int]]:
        """Tokens "<v1>" (and "<v1>_1", ... when several vectors) in every tokenizer/text encoder, their
        rows copied from the init words' mean; returns the new ids per encoder, in `text_pairs` order."""
        names = [[t] + [f"{t}_{k}" for k in range(1, vectors_per_token)] for t in tokens]
        for _, tokenizer, _ in self.text_pairs():
            vocab = tokenizer.get_vocab()
            for name in (n for group in names for n in group):
                if name in vocab or f"{name}</w>" in vocab:
                    raise UsageError(f"token {name!r} is already in the tokenizer's vocabulary; choose a new token such as <v1>")
        ids_per_encoder = []
        for _, tokenizer, encoder in self.text_pairs():
            init_ids = [tokenizer(word, add_special_tokens=False).input_ids or [tokenizer.eos_token_id] for word in init_words]
            tokenizer.add_tokens([n for group in names for n in group])
            encoder.resize_token_embeddings(len(tokenizer))
            weight = encoder.get_input_embeddings().weight
            new_ids = []
            with torch.no_grad():
                for group, init in zip(names, init_ids):
                    for name in group:
                        idx = tokenizer.convert_tokens_to_ids(name)
                        weight[idx] = weight[init].mean(0)
                        new_ids.append(idx)
            ids_per_encoder.append(new_ids)
        return ids_per_encoder

    def expand_prompt(self, prompt: str, tokens: dict[str, int]) -> str:
        """'<v1>' -> '<v1> <v1>_1 ...' for multi-vector tokens (as diffusers does when it loads them).
        Families whose pipeline expands prompts itself (TextualInversionLoaderMixin) return them as is."""
        from diffusers.loaders import TextualInversionLoaderMixin

        if issubclass(self.pipeline_class(), TextualInversionLoaderMixin) and self.ENCODES_WITH_PIPELINE:
            return prompt
        for token, n in tokens.items():
            if n > 1:
                prompt = prompt.replace(token, " ".join([token] + [f"{token}_{k}" for k in range(1, n)]))
        return prompt

    # ---- images and noise ----
    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents."""

    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output: eps, v, or the flow velocity eps - x0."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    # ---- adapters ----
    def text_kv_params(self) -> dict[str, torch.nn.Parameter]:
        """The weights projecting text into keys and values (cross-attention, or the text side of joint
        attention), by parameter name; a family without them raises a one-line error."""
        params = {n: p for n, p in self.denoiser.named_parameters() if any(s in n for s in self.TEXT_KV)}
        if not params:
            raise UsageError(f"the {self.family} model has no text key/value projections; custom_diffusion cannot apply")
        return params

    @contextmanager
    def original_denoiser(self, originals: dict[str, torch.Tensor] | None = None):
        """The model as it was loaded, for the forwards inside the block, on the same weights (no
        second copy of the model): every adapter layer of the denoiser and the text encoders switched
        off, and `originals` (parameter name -> its loaded value, for a method that trains base weights
        in place: Custom Diffusion's K/V) put back in place of the trained values. On exit everything
        is as before.

        Adapters are switched off by their flag alone: peft's `enable_adapters(False)` would also take
        the trained adapter's `requires_grad` away. Parameters are swapped by their `.data`, which no
        autograd graph records; run no gradient through the block."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        denoiser = self._unwrapped(self.denoiser)
        # the text encoders' adapters too (a LoRA trained with --train-text-encoder)
        layers = [m for model in (denoiser, *self.text_encoders) for m in model.modules() if isinstance(m, BaseTunerLayer)]
        was_off = [layer._disable_adapters for layer in layers]
        params = dict(denoiser.named_parameters()) if originals else {}
        trained = {}
        try:
            for layer in layers:
                layer._disable_adapters = True
            for name, value in (originals or {}).items():
                trained[name] = params[name].data
                params[name].data = value
            yield
        finally:
            for name, value in trained.items():
                params[name].data = value
            for layer, off in zip(layers, was_off):
                layer._disable_adapters = off

    # what a LoRA with --train-text-encoder adapts in each CLIP text encoder (diffusers' scripts' choice)
    TEXT_LORA_TARGETS: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # the prefix kohya sd-scripts names each text encoder's LoRA layers with
    KOHYA_TEXT_PREFIXES: ClassVar[dict[str, str]] = {"text_encoder": "lora_te_"}

    def lora_text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        """(pipeline name, encoder) of the text encoders a LoRA may train: the CLIP ones. T5 stays frozen,
        as in diffusers' scripts, whose loaders read no T5 LoRA either."""
        return [(name, enc) for name, _, enc in self.text_pairs()
                if type(self._unwrapped(enc)).__name__.startswith("CLIPText")]

    def add_text_lora(self, adapter: str, rank: int, alpha: float, dropout: float = 0.0) -> list[torch.nn.Parameter]:
        """A LoRA adapter on every CLIP text encoder's attention projections; returns its parameters."""
        from peft import LoraConfig

        params = []
        for _, encoder in self.lora_text_encoders():
            encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                                           target_modules=list(self.TEXT_LORA_TARGETS)), adapter_name=adapter)
            params += [p for n, p in encoder.named_parameters() if f".{adapter}." in n and "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def text_lora_params(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        """The text encoders' LoRA parameters of `adapter`, named '<encoder>.<parameter>'."""
        return {f"{name}.{n}": p for name, encoder in self.lora_text_encoders()
                for n, p in encoder.named_parameters() if f".{adapter}." in n and "lora_" in n}

    def save_lora(self, adapter: str, rank: int, alpha: float, targets: list[str], out_dir: Path) -> Path:
        """pytorch_lora_weights.safetensors in the layout this family's `load_lora_weights` reads,
        rank and alpha in its metadata; the text encoders' layers too where they carry the adapter."""
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self._unwrapped(self.denoiser), adapter_name=adapter)
        text_layers = {}
        for name, encoder in self.lora_text_encoders():
            if adapter not in (getattr(encoder, "peft_config", None) or {}):
                continue
            # not the embedding matrix, which the new tokens resized: their rows are in learned_embeds
            state = get_peft_model_state_dict(encoder, adapter_name=adapter, save_embedding_layers=False)
            # CLIP's layers by their transformers-4 path (text_model.encoder...), what kohya, ComfyUI and
            # every loader reads; transformers 5 dropped the text_model level, diffusers strips it again
            prefix = "" if hasattr(encoder, "text_model") else "text_model."
            text_layers[name] = {prefix + k: v for k, v in state.items()}
        metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
        text_metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(self.TEXT_LORA_TARGETS)}
        return self.write_lora_layers(layers, metadata, out_dir, text_layers, text_metadata)

    def write_lora_layers(self, layers: dict[str, torch.Tensor], metadata: dict, out_dir: Path,
                          text_layers: dict[str, dict[str, torch.Tensor]] | None = None,
                          text_metadata: dict | None = None) -> Path:
        """LoRA weights by peft name ("<module>.lora_A.weight") and their peft LoraConfig settings as
        pytorch_lora_weights.safetensors, the file this family's `load_lora_weights` reads; `text_layers`:
        the same per text encoder (pipeline name -> layers)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        if self.LORA_PREFIX == "unet":  # the UNet loaders read diffusers' names; the transformer ones peft's own
            layers = {_diffusers_lora_name(k): v for k, v in convert_state_dict_to_diffusers(layers).items()}
        parts = {f"{self.LORA_PREFIX}_lora_layers": {k: v.float() for k, v in layers.items()},
                 f"{self.LORA_PREFIX}_lora_adapter_metadata": metadata}
        for name, encoder_layers in (text_layers or {}).items():
            parts[f"{name}_lora_layers"] = {k: v.float() for k, v in encoder_layers.items()}
            parts[f"{name}_lora_adapter_metadata"] = text_metadata
        tmp = out_dir / ".lora.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        final = out_dir / "pytorch_lora_weights.safetensors"
        try:
            self.pipeline_class().save_lora_weights(tmp, safe_serialization=True, **parts)
            durable_replace(tmp / "pytorch_lora_weights.safetensors", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written folder behind
        return final

    EXPORTS: ClassVar[tuple[str, ...]] = ()  # extra LoRA formats the family writes (--export)
    EXPORT_NOTE: ClassVar[str] = ""  # why a format is missing, said with the refusal

    def check_export(self, formats: list[str]) -> None:
        """Before training: a format this family cannot write is a one-line error, not a late failure."""
        for fmt in formats:
            if fmt not in self.EXPORTS:
                note = f" ({self.EXPORT_NOTE})" if self.EXPORT_NOTE else ""
                raise UsageError(f"--export {fmt}: the {self.family} family has no {fmt} layout here{note}; "
                                 f"drop --export {fmt}")

    def write_kohya(self, diffusers_lora: Path, out: Path, alpha: float) -> Path:
        """The kohya / ComfyUI layout of a saved LoRA (families listing "kohya" in EXPORTS)."""
        raise UsageError(f"--export kohya: the {self.family} family has no kohya layout here; drop --export kohya")

    def cross_attention_layers(self) -> list[str]:
        """Names (in `denoiser.attn_processors`) of the layers where image queries attend to text; their maps
        are captured with `attention.capture_cross_attention(backbone.denoiser)`."""
        from ..attention import cross_attention_layers

        return cross_attention_layers(self._unwrapped(self.denoiser))

    # ---- the concept-centric (null-text) model ----
    def make_text_free(self, measure: bool = True) -> dict[str, torch.nn.Module]:
        """Every cross-attention block's output becomes a constant vector and the norm before it goes
        (METHODS.md 3); returns the constant modules by name. With `measure`, each keeps the block it
        replaced until `measure_null_text` has run it; without, constants are placeholders to load into."""
        raise UsageError(f"the {self.family} family has no separate cross-attention blocks (text enters joint "
                         "attention); concept_centric needs a UNet family (sd, sdxl)")

    def measure_null_text(self, latents: torch.Tensor, generator: torch.Generator, passes: int = 8) -> dict[str, torch.Tensor]:
        """The constants, measured: each replaced block's mean output for the empty prompt over real latents,
        real noise, positions and `passes` draws of timesteps; the replaced blocks are dropped afterwards."""
        raise UsageError(f"the {self.family} family has no separate cross-attention blocks; concept_centric needs sd or sdxl")

    # ---- image-specific contexts (ICO, METHODS.md 5) ----
    # Each training image's prompt is [SOS][ctx_i] <v> <class> [end_i]: the context vectors stand where the
    # text encoder's embedding layer has already added the position embeddings, so they are whole hidden
    # states of their positions (the authors' form). Where they go is the family's business.
    def _no_contexts(self):
        raise UsageError(f"--ico: the {self.family} family has no place for image-specific contexts here; ICO needs an "
                         "SD1.x/2.x model or pristine-mini (drop --ico)")

    def context_init(self, word: str, n: int) -> torch.Tensor:
        """(n, dim): the embedding layer's output for `word` at the first prompt position, n times: where
        context vectors start."""
        self._no_contexts()

    def encode_with_contexts(self, prompts: list[str], prefix: torch.Tensor, suffix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning for `[SOS] prefix[i] prompts[i] suffix[i] [EOS]`, prefix (batch, n_ctx, dim) and
        suffix (batch, n_end, dim) in place of the embedding layer's output there, on the graph."""
        self._no_contexts()

    # ---- sampling (the engine in sampling.py) ----
    # whether sampling.py's loop drives this family (flow families sample through their pipeline for now)
    GUIDED_SAMPLING: ClassVar[bool] = True
    NEGATIVE_PROMPT: ClassVar[bool] = True  # whether its pipeline's CFG takes a negative prompt (FLUX.1's not)

    def unconditional(self, n: int) -> dict[str, torch.Tensor]:
        """The condition for ∅, as the family's pipeline builds it for classifier-free guidance."""
        return self.encode_prompts([""] * n)

    def latent_shape(self, n: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = (height or self.image_size) // scale, (width or self.image_size) // scale
        return (n, self._unwrapped(self.denoiser).config.in_channels, h, w)

    # what a picture's side must be a multiple of, over the VAE's downscaling (flow families: 2x2 patches too)
    SIZE_PATCH: ClassVar[int] = 1

    @classmethod
    def size_multiple(cls, folder: Path) -> int:
        """The step in pixels of the picture sizes a model folder draws, read from its VAE's config."""
        import json

        try:
            blocks = json.loads((Path(folder) / "vae" / "config.json").read_text())["block_out_channels"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{folder}/vae/config.json: unreadable; the model folder is damaged")
        return 2 ** (len(blocks) - 1) * cls.SIZE_PATCH

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pictures in [0, 1], (n, h, w, 3) float on the CPU, as the pipeline's postprocess gives."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float()

    # ---- reading cross-attention (SPF) ----
    # A family provides these when it can say which key of its cross-attention holds which word of a
    # prompt; the others raise one line naming what is missing.
    # LoRA targets (peft names) of the projections of cross-attention alone
    CROSS_ATTENTION_TARGETS: ClassVar[tuple[str, ...]] = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

    def _no_capture(self):
        raise UsageError(f"the {self.family} family provides no cross-attention capture here (which key holds which "
                         "prompt word is not mapped); methods that read attention maps (spf) need an SD-family model: "
                         "SD1.x/2.x, SDXL or pristine-mini")

    def capture_attention(self, queries: dict | None = None):
        """A context manager yielding {layer: attention probabilities (batch, heads, pixels, tokens)} of the
        last forward, still on the graph; with `queries`, each layer's queries (batch, pixels, channels) go
        there too."""
        self._no_capture()

    def prompt_words(self, prompt: str) -> list:
        """Every word of the prompt with its key positions in cross-attention (phrases.PromptWord)."""
        self._no_capture()

    def phrase_positions(self, prompt: str, phrase: str) -> list[int]:
        """Key positions of every occurrence of the phrase (all of its tokens) in the prompt."""
        self._no_capture()

    def end_positions(self, prompt: str) -> list[int]:
        """Key positions of the end token and the padding after it."""
        self._no_capture()

    def text_token_states(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The per-token text states cross-attention reads, (batch, tokens, dim)."""
        self._no_capture()

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction implies in one step."""
        raise UsageError(f"the {self.family} family gives no one-step clean latent here")

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1] (the inverse of `encode_images`), differentiable."""
        raise UsageError(f"the {self.family} family decodes no latents here")

    # ---- inference ----
    @classmethod
    @abstractmethod
    def pipeline_class(cls):
        """The family's diffusers pipeline class."""

    def pipeline(self):
        """A diffusers pipeline over these very modules (no copies), with a fresh scheduler."""
        parts = {name: self._unwrapped(getattr(self, name)) for name in self.component_names}
        parts["unet" if "unet" in parts else "transformer"] = self._unwrapped(self.denoiser)
        parts["scheduler"] = self.sampling_scheduler()
        return self.pipeline_class()(**{**self.PIPELINE_KWARGS, **parts})

    def sampling_scheduler(self):
        return type(self.scheduler).from_config(self.scheduler.config)

    def generate(self, prompts: list[str], generators: list[torch.Generator], steps: int, guidance: float) -> list:
        """PIL images from the base model (prior-preservation class images)."""
        pipe = self.generation_pipeline()
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                        height=self.image_size, width=self.image_size).images

    def generation_pipeline(self):
        return self.pipeline()

    def text_pipeline(self):
        """One pipeline kept for its encode_prompt (families that encode prompts as their pipeline does)."""
        if "_text_pipeline" not in self.__dict__:
            self._text_pipeline = self.pipeline()
        return self._text_pipeline

    def _unwrapped(self, module):
        return getattr(module, "module", module)  # the module itself under DDP


def embeddings_file(k: int, encoder_name: str) -> str:
    """learned_embeds.safetensors for the first text encoder, learned_embeds_<encoder>.safetensors after."""
    return "learned_embeds.safetensors" if k == 0 else f"learned_embeds_{encoder_name}.safetensors"


def load_embeddings(pipe, run: Path, pairs: tuple[tuple[str, str], ...]) -> bool:
    """A run's learned tokens into every text encoder of a pipeline of the family, with diffusers'
    load_textual_inversion where the pipeline has it (SD3's has not: the rows are added directly)."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from safetensors.torch import load_file

    found = False
    for k, (tok, enc) in enumerate(pairs):
        path = Path(run) / embeddings_file(k, enc)
        if not path.is_file():
            continue
        for token, vectors in load_file(str(path)).items():
            if isinstance(pipe, TextualInversionLoaderMixin):
                pipe.load_textual_inversion({token: vectors}, token=token, text_encoder=getattr(pipe, enc),
                                            tokenizer=getattr(pipe, tok))
            else:
                _add_token_rows(getattr(pipe, tok), getattr(pipe, enc), token, vectors)
        found = True
    return found


def _add_token_rows(tokenizer, encoder, token: str, vectors: torch.Tensor) -> None:
    """What load_textual_inversion does, for one token: "<v1>" (and "<v1>_1", ... for several vectors)."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    names = [token] + [f"{token}_{k}" for k in range(1, len(vectors))]
    tokenizer.add_tokens(names)
    encoder.resize_token_embeddings(len(tokenizer))
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, row in zip(names, vectors):
            weight[tokenizer.convert_tokens_to_ids(name)] = row.to(weight.dtype)


def pipeline_denoiser(pipe) -> torch.nn.Module:
    """The denoiser of a diffusers pipeline of any family here."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _diffusers_lora_name(key: str) -> str:
    """Every layer in diffusers' UNet LoRA names. Its converter renames only the attention projections,
    and diffusers' loader decides the file's layout from its first key: a file mixing both layouts
    (LoRA on resnet convs or feed-forwards beside attention) loaded with half its layers silently gone."""
    return key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
