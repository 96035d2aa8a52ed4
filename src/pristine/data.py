"""Concept datasets: image folders with captions or templates, preprocessing, prior-preservation images.

Every image is checked when the run starts, so a bad file stops the run before any training with a
message naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # animations: the first frame
MIN_IMAGE_SIDE = 8  # pixels; below it a picture holds nothing to learn from
TEMPLATES = (
    "a photo of {token} {cls}",
    "a picture of {token} {cls}",
    "a photo of the {token} {cls}",
    "{token} {cls}",
    "a close-up photo of {token} {cls}",
    "a good photo of a {token} {cls}",
)


@dataclass
class ConceptSpec:
    """One concept to learn: where its images are, the token that names it and its class word."""

    images: str
    token: str = ""  # empty for a text-free method (concept_centric): the folder is the whole concept
    class_word: str = ""
    init_word: str | None = None  # what the token's embedding starts from (default: the class word)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF rotation applied; grayscale, palette, 16-bit and CMYK converted; alpha composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":  # 32-bit float (a TIFF): values in [0, 1], or [0, 255] when any is above 1
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if array.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).round().astype(np.uint8))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255, 0, 255).astype(np.uint8))
    if image.mode in ("P", "LA", "PA") or (image.mode == "RGBA"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int, crop: str = "center", rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize the short side to `size`, crop a square, map to a (3, size, size) tensor in [-1, 1]."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)


# Per-image prompts a method may read besides the caption (PureCC: y_base, y_tar).
PROMPT_FIELDS = ("y_base", "y_tar")


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8")


def _read_metadata(folder: Path) -> dict[str, dict]:
    """metadata.jsonl: {file_name: {"text": caption, and any of PROMPT_FIELDS}}."""
    records = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(read_text_file(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                entry = {"text": record["text"]}
                for key in PROMPT_FIELDS:
                    if key in record:
                        if not isinstance(record[key], str):
                            raise TypeError
                        entry[key] = record[key]
                if not isinstance(record["file_name"], str):
                    raise TypeError
                records[record["file_name"]] = entry
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text' "
                                 f"(and optional text fields {', '.join(PROMPT_FIELDS)})")
            if not (folder / record["file_name"]).is_file():
                raise UsageError(f"{meta}:{n}: {record['file_name']!r} is not in the folder; remove the line or add the image")
    return records


def read_folder(folder: Path, extras: list[dict] | None = None) -> tuple[list[Path], list[Image.Image], list[str | None]]:
    """Every image in a folder (RGB, checked) with its caption if it has one (.txt beside it, or metadata.jsonl).

    `extras`, when given, receives each image's other prompt fields from metadata.jsonl."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
    metadata = _read_metadata(folder)
    listed = {name: entry["text"] for name, entry in metadata.items()}
    if extras is not None:
        extras.extend({k: v for k, v in metadata.get(p.name, {}).items() if k != "text"} for p in files)
    images, texts = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(to_rgb(im))
        except Image.DecompressionBombError:
            raise UsageError(f"{path}: declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); "
                             "remove it or scale it down")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
            raise UsageError(f"{path}: not a readable image ({type(e).__name__}); remove or replace it")
        if min(images[-1].size) < MIN_IMAGE_SIDE:
            raise UsageError(f"{path}: {images[-1].size[0]}x{images[-1].size[1]} pixels, below the {MIN_IMAGE_SIDE}-pixel "
                             "minimum; remove it or use a larger picture")
        txt = path.with_suffix(".txt")
        texts.append(read_text_file(txt).strip() if txt.is_file() else listed.get(path.name))
    return files, images, texts


@dataclass
class ConceptImages:
    """A concept's images, loaded and checked, with one caption each."""

    spec: ConceptSpec
    paths: list[Path]
    images: list[Image.Image]
    captions: list[str]
    extras: list[dict] | None = None  # per image: prompt fields besides the caption (data.PROMPT_FIELDS)

    @classmethod
    def load(cls, spec: ConceptSpec, captioned: bool = True, instance_prompt: str = "") -> "ConceptImages":
        """`captioned=False`: a domain's uncaptioned folder for a text-free method; captions are ignored.
        `instance_prompt`: the caption of every image without its own (.txt, metadata.jsonl), instead of
        the templates."""
        folder = Path(spec.images)
        if not folder.exists():
            raise UsageError(f"images folder {folder} does not exist; give a folder of the concept's images")
        if not folder.is_dir():
            raise UsageError(f"images {folder} is not a folder; give a folder of the concept's images")
        extras: list[dict] = []
        files, images, texts = read_folder(folder, extras)
        if not files:
            raise UsageError(f"images folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add 3-20 pictures of the concept")
        if not captioned:
            return cls(spec, files, images, [""] * len(files), [{} for _ in files])
        captions = []
        for i, (path, text) in enumerate(zip(files, texts)):
            if text is None:
                text = instance_prompt or TEMPLATES[i % len(TEMPLATES)].format(token=spec.token, cls=spec.class_word)
            elif spec.token not in text:
                raise UsageError(f"caption of {path} does not name the token {spec.token!r}: {text!r}; add the token to it")
            captions.append(text)
            if "y_tar" in extras[i] and spec.token not in extras[i]["y_tar"]:
                raise UsageError(f"y_tar of {path} in metadata.jsonl does not name the token {spec.token!r}; add the token to it")
        return cls(spec, files, images, captions, extras)


@dataclass
class TrainingSet:
    """All concept examples (and prior-preservation examples), preprocessed to tensors once."""

    pixels: torch.Tensor  # (N, 3, S, S)
    prompts: list[str]
    concept_index: torch.Tensor  # (N,) which concept; -1 for prior images
    is_prior: torch.Tensor  # (N,) bool
    flip: bool = True
    latents: torch.Tensor | None = None  # cached when the VAE is frozen: (N, 2 if flip else 1, C, h, w)
    sources: list[Image.Image] | None = None  # kept for random crops, cut afresh at every draw
    size: int = 0
    extras: list[dict] | None = None  # per example: prompt fields besides the caption

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, batch_size: int, generator: torch.Generator, prior_batch: int = 0,
             shard: tuple[int, int] = (0, 1)) -> dict:
        """A batch of instance examples (and prior examples), drawn from the step's generator.

        With `shard` (this process, processes), the batch of all processes together is drawn (the
        same on each) and this process keeps its share: batch_size instance examples and prior_batch
        prior ones; `positions` says where they sit in the whole batch, `global_size` how big it is."""
        rank, world = shard
        inst = torch.nonzero(~self.is_prior).flatten()
        idx = inst[torch.randint(0, len(inst), (batch_size * world,), generator=generator)]
        mine = torch.arange(rank * batch_size, (rank + 1) * batch_size)
        if prior_batch:
            prior = torch.nonzero(self.is_prior).flatten()
            idx = torch.cat([idx, prior[torch.randint(0, len(prior), (prior_batch * world,), generator=generator)]])
            mine = torch.cat([mine, batch_size * world + torch.arange(rank * prior_batch, (rank + 1) * prior_batch)])
        flips = (torch.rand(len(idx), generator=generator) < 0.5) & self.flip
        global_size = len(idx)
        idx, flips = idx[mine], flips[mine]
        batch = {"index": idx, "positions": mine, "global_size": global_size,
                 "prompts": [self.prompts[i] for i in idx.tolist()], "is_prior": self.is_prior[idx],
                 "concept": self.concept_index[idx],
                 "extras": [self.extras[i] if self.extras else {} for i in idx.tolist()]}
        if self.latents is not None:
            batch["latents"] = self.latents[idx, flips.long() if self.flip else torch.zeros_like(idx)]
            return batch
        if self.sources is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
            px = torch.stack([preprocess(self.sources[i], self.size, "random", rng) for i in idx.tolist()])
        else:
            px = self.pixels[idx]
        batch["pixels"] = torch.where(flips[:, None, None, None], px.flip(-1), px)
        return batch


def build_training_set(concepts: list[ConceptImages], size: int, flip: bool = True, crop: str = "center",
                       prior: tuple[list[Image.Image], list[str]] | None = None) -> TrainingSet:
    images = [im for c in concepts for im in c.images]
    prompts = [t for c in concepts for t in c.captions]
    which = [k for k, c in enumerate(concepts) for _ in c.images]
    extras = [e for c in concepts for e in (c.extras or [{}] * len(c.images))]
    n_inst = len(prompts)
    if prior is not None:
        images += prior[0]
        prompts += prior[1]
        which += [-1] * len(prior[1])
        extras += [{}] * len(prior[1])
    is_prior = torch.zeros(len(prompts), dtype=torch.bool)
    is_prior[n_inst:] = True
    pixels = torch.stack([preprocess(im, size) for im in images])
    return TrainingSet(pixels, prompts, torch.tensor(which), is_prior, flip,
                       sources=images if crop == "random" else None, size=size, extras=extras)


def cache_latents(data: TrainingSet, backbone, batch: int = 64) -> None:
    """Encode every image (and its mirror) once: the VAE is frozen in every method."""
    out = []
    with torch.no_grad():
        for i in range(0, len(data.pixels), batch):
            px = data.pixels[i : i + batch]
            views = [backbone.encode_images(px)] + ([backbone.encode_images(px.flip(-1))] if data.flip else [])
            out.append(torch.stack(views, dim=1))
    data.latents = torch.cat(out)


# ---- prior preservation: class images from the base model, cached for reuse -----------------


def class_images(backbone, class_prompt: str, n: int, cache_root: Path, seed: int = 0, steps: int = 30,
                 guidance: float = 5.0) -> list[Path]:
    """n images of `class_prompt` from the base model, generated once and reused by later runs."""
    from tqdm import tqdm

    key = hashlib.sha1(json.dumps([str(backbone.folder.resolve()), class_prompt, seed, steps, guidance]).encode()).hexdigest()[:16]
    folder = cache_root / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(class_prompt)
    missing = [i for i in range(n) if not (folder / f"{i:05d}.png").exists()]
    if missing:
        for start in tqdm(range(0, len(missing), 16), desc=f"class images: {class_prompt!r}"):
            ids = missing[start : start + 16]
            gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in ids]
            images = backbone.generate([class_prompt] * len(ids), gens, steps, guidance)
            for i, image in zip(ids, images):
                tmp = folder / f"{i:05d}.tmp.png"
                image.save(tmp)
                tmp.rename(folder / f"{i:05d}.png")
    return [folder / f"{i:05d}.png" for i in range(n)]
