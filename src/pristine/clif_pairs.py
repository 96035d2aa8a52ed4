"""CLIF's image-text pairs (METHODS.md section 4): Global, Region and Mix.

- Global: a concept image as it is, with its caption.
- Region: one concept's segment alone (the rest of the picture filled with a plain color), cropped
  around it and captioned with that concept alone: "a <v1> star".
- Mix: segments of two or three concepts pasted side by side into one picture, captioned jointly:
  "a <v1> star on the left and a <v2> heart on the right".

Segments come from masks beside the images where they exist (`NAME_mask*.png`, white = the concept,
as `pristine world render` writes them), otherwise from a small SLIC-like over-segmentation (the
superpixels that do not touch the border), or a centre crop. Every pair knows which concepts it shows
(the contrastive loss must not count two pairs of the same concepts as each other's negatives) and
where each concept is in its picture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UsageError

SEGMENTS = ("auto", "masks", "slic", "crop")
FILL = (244, 244, 240)  # what surrounds a pasted segment: a plain, light background
# Where Mix pastes its segments (centre in [0, 1] image coordinates) and how a caption says it
PLACES = {2: (("left", (0.25, 0.5)), ("right", (0.75, 0.5))),
          3: (("left", (0.2, 0.62)), ("right", (0.8, 0.62)), ("top", (0.5, 0.22)))}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top"}


@dataclass
class Pair:
    kind: str  # global | region | mix
    image: np.ndarray  # (S, S, 3) uint8
    caption: str
    concepts: tuple[int, ...]  # indices (into the run's concepts) of what the picture shows, sorted
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # concept index -> (S, S) bool, where known

    @property
    def key(self) -> int:
        """One number per set of concepts: pairs with equal keys show the same concepts."""
        return sum(1 << k for k in self.concepts)


def concept_phrase(token: str, class_word: str) -> str:
    return f"a {token} {class_word}"


# ---- segments of one image -----------------------------------------------------------------------


def mask_beside(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """The union of `STEM_mask*.png` beside an image (white = the concept), or None when there is none."""
    files = sorted(path.parent.glob(f"{path.stem}_mask*.png"))
    if not files:
        return None
    union = np.zeros((size[1], size[0]), bool)
    for f in files:
        try:
            with Image.open(f) as im:
                m = im.convert("L")
        except (OSError, ValueError) as e:
            raise UsageError(f"{f}: not a readable mask ({type(e).__name__}); remove or replace it")
        if m.size != size:
            raise UsageError(f"{f}: {m.size[0]}x{m.size[1]} pixels but its image is {size[0]}x{size[1]}; "
                             "a mask must match its image")
        union |= np.asarray(m) > 127
    return union


def slic_labels(image: np.ndarray, n_segments: int = 48, compactness: float = 10.0, iterations: int = 8,
                max_side: int = 96) -> np.ndarray:
    """A small SLIC: k-means over (colour, position) from a grid of seeds, each pixel compared with
    the seeds near it only in effect through the position term. Returns an (H, W) label map.

    scikit-image's slic is the usual tool; this keeps pristine free of that dependency for a use
    (finding one foreground object) that needs no more."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR),
                       np.float32) if scale < 1 else image.astype(np.float32)
    sh, sw = small.shape[:2]
    step = max(1.0, np.sqrt(sh * sw / n_segments))
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    feats = np.concatenate([small.reshape(-1, 3), (np.stack([ys, xs], -1) * (compactness * 255 / 100 / step)).reshape(-1, 2)], 1)
    gy = np.arange(step / 2, sh, step)
    gx = np.arange(step / 2, sw, step)
    seeds = [(int(y), int(x)) for y in gy for x in gx]
    centers = np.stack([feats[y * sw + x] for y, x in seeds])
    for _ in range(iterations):
        d = ((feats[:, None, :] - centers[None]) ** 2).sum(-1)
        labels = d.argmin(1)
        for k in range(len(centers)):
            members = feats[labels == k]
            if len(members):
                centers[k] = members.mean(0)
    labels = labels.reshape(sh, sw)
    if scale < 1:
        labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.NEAREST))
    return labels


def slic_foreground(image: np.ndarray, min_distance: float = 40.0) -> np.ndarray | None:
    """The superpixels that touch no border of the picture and whose colour is unlike every border
    superpixel's (a photo's subject rarely touches the border, its background mostly does), or None
    when they cover almost nothing or almost everything."""
    labels = slic_labels(image)
    pixels = image.reshape(-1, 3).astype(np.float32)
    flat = labels.reshape(-1)
    means = {k: pixels[flat == k].mean(0) for k in np.unique(flat)}
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.stack([means[k] for k in border])
    fg_labels = [k for k in means if k not in border
                 and np.sqrt(((background - means[k]) ** 2).sum(-1)).min() > min_distance]
    fg = np.isin(labels, fg_labels)
    return fg if 0.02 <= fg.mean() <= 0.9 else None


def centre_crop_mask(h: int, w: int, fraction: float = 0.6) -> np.ndarray:
    m = np.zeros((h, w), bool)
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    m[top:top + ch, left:left + cw] = True
    return m


def concept_segment(path: Path, image: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """(the concept's pixels in the image, how they were found: masks | slic | crop)."""
    h, w = image.shape[:2]
    if mode in ("auto", "masks"):
        m = mask_beside(path, (w, h))
        if m is not None and m.any():
            return m, "masks"
        if mode == "masks":
            raise UsageError(f"method_args.segments: masks, but {path} has no {path.stem}_mask*.png beside it "
                             "(white = the concept); add the masks, or use segments=auto")
    if mode in ("auto", "slic"):
        m = slic_foreground(image)
        if m is not None:
            return m, "slic"
    return centre_crop_mask(h, w), "crop"


# ---- building pairs ------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def _square_cut(image: np.ndarray, mask: np.ndarray, keep_background: bool, margin: float = 0.15):
    """The segment cut out in a square around it (padded with FILL where the square leaves the image):
    (pixels, mask), the background filled unless `keep_background` (a crop is its own segment)."""
    top, left, bottom, right = _bbox(mask)
    side = int(np.ceil(max(bottom - top, right - left) * (1 + 2 * margin)))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    pixels = np.empty((side, side, 3), np.uint8)
    pixels[:] = FILL
    cut = np.zeros((side, side), bool)
    h, w = mask.shape
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + side), min(w, x0 + side)
    src = image[sy0:sy1, sx0:sx1]
    m = mask[sy0:sy1, sx0:sx1]
    dst = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
    pixels[dst] = src if keep_background else np.where(m[..., None], src, np.asarray(FILL, np.uint8))
    cut[dst] = m
    return pixels, cut


def _resize(pixels: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    im = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BICUBIC if side > pixels.shape[0] else Image.BOX))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)) >= 128
    return im, m


def region_pair(k: int, token: str, class_word: str, image: np.ndarray, mask: np.ndarray, how: str, size: int) -> Pair:
    pixels, cut = _square_cut(image, mask, keep_background=how == "crop")
    pixels, cut = _resize(pixels, cut, size)
    if how != "crop":  # resampling blurs the fill into the segment's edge: keep the cut-out crisp
        pixels = np.where(cut[..., None], pixels, np.asarray(FILL, np.uint8))
    return Pair("region", pixels, concept_phrase(token, class_word), (k,), {k: cut})


def mix_pair(parts: list[tuple[int, str, str, np.ndarray, np.ndarray, str]], size: int) -> Pair:
    """parts: (concept index, token, class word, image, mask, how) per concept, pasted at PLACES in order."""
    places = PLACES[len(parts)]
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = FILL
    masks, phrases = {}, []
    box = int(size * (0.44 if len(parts) == 2 else 0.38))  # each segment fits a box of this side
    for (k, token, class_word, image, mask, how), (place, (px, py)) in zip(parts, places):
        pixels, cut = _square_cut(image, mask, keep_background=how == "crop", margin=0.0)
        pixels, cut = _resize(pixels, cut, box)
        y0 = min(max(0, int(round(py * size - box / 2))), size - box)
        x0 = min(max(0, int(round(px * size - box / 2))), size - box)
        region = canvas[y0:y0 + box, x0:x0 + box]
        region[cut] = pixels[cut]
        full = np.zeros((size, size), bool)
        full[y0:y0 + box, x0:x0 + box] = cut
        for other in masks.values():  # a later paste covers an earlier one where they overlap
            other &= ~full
        masks[k] = full
        phrases.append(f"{concept_phrase(token, class_word)} {PLACE_PHRASES[place]}")
    return Pair("mix", canvas, " and ".join(phrases), tuple(sorted(masks)), masks)


def _square(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A centre square of the image at `size` (as data.preprocess cuts it), and the box it was cut from."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(image.crop(box).resize((size, size), Image.BICUBIC)), box


def build_pairs(concepts, size: int, segments: str = "auto", mixes: int = 0, seed: int = 0) -> list[Pair]:
    """Global and Region pairs for every image of every concept (data.ConceptImages), then `mixes`
    Mix pairs (0: as many as there are images) of two concepts, and of three when there are three or
    more, drawn from a generator seeded by `seed`."""
    if segments not in SEGMENTS:
        raise UsageError(f"method_args.segments: {segments!r} is not one of {', '.join(SEGMENTS)}")
    pairs: list[Pair] = []
    sources: list[list[tuple[np.ndarray, np.ndarray, str]]] = []
    for k, c in enumerate(concepts):
        mine = []
        for path, image, caption in zip(c.paths, c.images, c.captions):
            square, box = _square(image, size)
            mask, how = concept_segment(Path(path), np.asarray(image), segments)
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).crop(box).resize((size, size), Image.BILINEAR)) >= 128
            if not mask.any():  # the centre square cut the concept away: fall back to a crop of the square
                mask, how = centre_crop_mask(size, size), "crop"
            pairs.append(Pair("global", square, caption, (k,), {k: mask} if how == "masks" else {}))
            pairs.append(region_pair(k, c.spec.token, c.spec.class_word, square, mask, how, size))
            mine.append((square, mask, how))
        sources.append(mine)
    if len(concepts) >= 2:
        rng = np.random.default_rng(seed)
        n = mixes or sum(len(s) for s in sources)
        for i in range(n):
            n_parts = 3 if len(concepts) >= 3 and i % 2 == 1 else 2
            chosen = rng.choice(len(concepts), n_parts, replace=False)
            parts = []
            for k in chosen.tolist():
                image, mask, how = sources[k][int(rng.integers(len(sources[k])))]
                parts.append((k, concepts[k].spec.token, concepts[k].spec.class_word, image, mask, how))
            pairs.append(mix_pair(parts, size))
    return pairs


def dump_pairs(pairs: list[Pair], folder: Path, tokens: list[str]) -> Path:
    """Every pair as a PNG with its masks (`NNNNN_KIND_mask_<concept>.png`) and one `pairs.jsonl` line:
    file_name, kind, text, concepts (tokens), masks."""
    from .files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, p in enumerate(pairs):
        name = f"{i:05d}_{p.kind}"
        Image.fromarray(p.image).save(folder / f"{name}.png")
        masks = {}
        for k, m in p.masks.items():
            file = f"{name}_mask_{k}.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(folder / file)
            masks[tokens[k]] = file
        lines.append(json.dumps({"file_name": f"{name}.png", "kind": p.kind, "text": p.caption,
                                 "concepts": [tokens[k] for k in p.concepts], "masks": masks}))
    atomic_write_text(folder / "pairs.jsonl", "".join(line + "\n" for line in lines))
    return folder
