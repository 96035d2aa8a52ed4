"""Metrics for real models: CLIP-T, CLIP-I (a transformers CLIPModel) and DINO (a ViT / DINOv2),
each loaded from a local folder the user names; nothing is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError


def _check(folder: str, kind: str) -> Path:
    """A metric model folder of the right kind with intact safetensors weights, before loading it."""
    from ..data import read_text_file
    from ..files import check_model_weights

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UsageError(f"--{kind} {folder}: not a transformers model folder (no config.json)")
    try:
        model_type = str(json.loads(read_text_file(path / "config.json")).get("model_type", ""))
    except (ValueError, AttributeError):
        raise UsageError(f"--{kind} {path / 'config.json'}: not a JSON model config")
    if (kind == "clip") != model_type.startswith("clip"):
        wanted = "a CLIP model (model_type clip)" if kind == "clip" else "a ViT / DINOv2 image model, not CLIP"
        raise UsageError(f"--{kind} {folder}: its config.json says model_type {model_type!r}; give {wanted}")
    check_model_weights(path)
    return path


def _load(folder: str, kind: str):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    path = _check(folder, kind)
    if kind == "clip":
        return CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval(), \
            CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    return AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval(), \
        AutoImageProcessor.from_pretrained(str(path), local_files_only=True)


def _projected(features) -> torch.Tensor:
    return features if torch.is_tensor(features) else features.pooler_output


class RealMetrics:
    def __init__(self, clip: str | None = None, dino: str | None = None):
        self.check(clip, dino)
        self.clip = _load(clip, "clip") if clip else None
        self.dino = _load(dino, "dino") if dino else None

    @staticmethod
    def check(clip: str | None, dino: str | None) -> None:
        if not clip and not dino:
            raise UsageError("no metric model given: pass --clip DIR (CLIP-T, CLIP-I) and/or --dino DIR (DINO)")
        for folder, kind in ((clip, "clip"), (dino, "dino")):
            if folder:
                _check(folder, kind)

    @torch.no_grad()
    def clip_images(self, images) -> torch.Tensor:
        model, processor = self.clip
        return F.normalize(_projected(model.get_image_features(**processor(images=list(images), return_tensors="pt"))), dim=-1)

    @torch.no_grad()
    def clip_texts(self, texts) -> torch.Tensor:
        model, processor = self.clip
        inputs = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return F.normalize(_projected(model.get_text_features(**inputs)), dim=-1)

    @torch.no_grad()
    def dino_images(self, images) -> torch.Tensor:
        model, processor = self.dino
        out = model(**processor(images=list(images), return_tensors="pt"))
        return F.normalize(out.last_hidden_state[:, 0], dim=-1)  # the CLS token

    def score(self, images, prompts: list[str], references) -> dict[str, float]:
        """Means over images: CLIP-T to each image's prompt, CLIP-I and DINO to every reference."""
        out = {"n_images": len(images)}
        if self.clip is not None:
            emb = self.clip_images(images)
            out["clip_t"] = float((emb * self.clip_texts(prompts)).sum(-1).mean())
            if references:
                out["clip_i"] = float((emb @ self.clip_images(references).T).mean())
        if self.dino is not None and references:
            out["dino"] = float((self.dino_images(images) @ self.dino_images(references).T).mean())
        return out


def read_image_folder(folder: Path, need_prompts: bool = True) -> tuple[list, list[str | None]]:
    """Images with their prompts (metadata.jsonl, or a .txt beside each image)."""
    from ..data import read_folder

    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder of images")
    files, images, texts = read_folder(folder)
    if not files:
        raise UsageError(f"{folder}: holds no images")
    missing = [f.name for f, t in zip(files, texts) if t is None]
    if need_prompts and missing:
        raise UsageError(f"{folder / missing[0]}: no prompt for it; add a .txt beside it or a metadata.jsonl line")
    return images, texts
