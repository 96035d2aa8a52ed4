"""pristine-mini: the small Stable-Diffusion-format model that ships inside the package."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"


def path() -> str:
    """The model folder: StableDiffusionPipeline.from_pretrained(pristine.mini.path()) loads it offline.

    PRISTINE_MINI_DIR, when set, names another folder in the same layout (a retrained pristine-mini,
    `pristine mini pretrain --out`), so every command and benchmark can judge it without reinstalling."""
    import os

    if os.environ.get("PRISTINE_MINI_DIR"):
        folder = Path(os.environ["PRISTINE_MINI_DIR"])
        if not (folder / "model_index.json").exists():
            from ..errors import UsageError

            raise UsageError(f"PRISTINE_MINI_DIR={folder}: no model_index.json there; point it at a pristine-mini "
                             "model folder (`pristine mini pretrain --out`) or unset it")
        return str(folder)
    if not (MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"pristine-mini weights are missing from {MODEL_DIR}; run `pristine mini pretrain`")
    return str(MODEL_DIR)


def load_pipeline(folder: str | Path | None = None, dtype=None):
    """The text-to-image pipeline in float32 (the weights are stored in float16 to keep the package small)."""
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(folder or path()), torch_dtype=dtype or torch.float32, local_files_only=True, safety_checker=None,
        use_safetensors=True,
    )


def load_oracle(folder: str | Path | None = None):
    from .oracle import Oracle

    return Oracle.load(Path(folder or path()) / "oracle")


def load_clip(folder: str | Path | None = None):
    """The whole mini CLIP (text and image towers) with its processor, for CLIP-T / CLIP-I."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = Path(folder or path()) / "clip"
    model = CLIPModel.from_pretrained(str(clip_dir), torch_dtype=torch.float32, local_files_only=True,
                                      use_safetensors=True).eval()
    return model, CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
