"""The oracle: a classifier that reads every attribute of a Shapes-world picture, the judge of benchmarks.

Objects are read per place: positions are distinct within a scene, so each of the five places is a
slot that is empty or holds one object with a shape, color, size, pattern, marking and accent.
The penultimate layer is an image embedding for similarity (the DINO-style score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world import vocab
from ..world.scene import Scene

SLOT_HEADS = {
    "present": ("no", "yes"),
    "shape": vocab.SHAPES,
    "color": vocab.COLOR_NAMES,
    "size": vocab.SIZES,
    "pattern": vocab.PATTERNS,
    "marking": vocab.MARKINGS,
    "accent": vocab.COLOR_NAMES,
}
SCENE_HEADS = {"background": vocab.BACKGROUNDS, "style": vocab.STYLES}
SLOT_WIDTH = sum(len(v) for v in SLOT_HEADS.values())
IGNORE = -100


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Oracle(nn.Module):
    def __init__(self, widths=(32, 64, 128, 192), embed_dim=256, full_res_convs=2):
        super().__init__()
        self.config = {"widths": list(widths), "embed_dim": embed_dim, "full_res_convs": full_res_convs}
        w = widths
        # Markings on small objects are a few pixels wide (a small rim and a small dot differ only in
        # the pixels where two tones mix), so the first layers keep the full 32x32 resolution.
        self.features = nn.Sequential(
            _conv(3, w[0]),
            *[_conv(w[0], w[0]) for _ in range(full_res_convs - 1)],
            _conv(w[0], w[1], 2), _conv(w[1], w[1]),
            _conv(w[1], w[2], 2), _conv(w[2], w[2]),
            _conv(w[2], w[3], 2), _conv(w[3], w[3]),
            nn.Conv2d(w[3], 96, 1),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(96 * 16, embed_dim), nn.LayerNorm(embed_dim), nn.SiLU())
        self.slot_logits = nn.Linear(embed_dim, len(vocab.POSITIONS) * SLOT_WIDTH)
        self.scene_logits = nn.Linear(embed_dim, sum(len(v) for v in SCENE_HEADS.values()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: (B, 3, 32, 32) in [-1, 1]. Returns the embedding and logits per head.

        Slot heads have shape (B, 5, n_classes); scene heads (B, n_classes).
        """
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="area")
        emb = self.embed(self.features(images))
        slots = self.slot_logits(emb).view(len(images), len(vocab.POSITIONS), SLOT_WIDTH)
        scene = self.scene_logits(emb)
        logits, i = {}, 0
        for name, values in SLOT_HEADS.items():
            logits[name] = slots[..., i : i + len(values)]
            i += len(values)
        i = 0
        for name, values in SCENE_HEADS.items():
            logits[name] = scene[:, i : i + len(values)]
            i += len(values)
        return emb, logits

    # ---- saving and loading: safetensors plus a config.json ----

    def save(self, folder: str | Path) -> None:
        from ..checkpoint import atomic_save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save({k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()},
                    folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "Oracle":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = {"full_res_convs": 1, **json.loads((folder / "config.json").read_text())}  # older oracles had one
        model = cls(**config)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / "model.safetensors")).items()})
        return model.eval()

    # ---- reading pictures ----

    @torch.no_grad()
    def read(self, images) -> list[dict]:
        """What the oracle sees in each picture: its objects by place, background and style."""
        emb, logits = self(to_tensor(images))
        present = logits["present"].softmax(-1)[..., 1]
        out = []
        for b in range(len(emb)):
            objects = []
            for s, position in enumerate(vocab.POSITIONS):
                if present[b, s] < 0.5:
                    continue
                obj = {"position": position, "confidence": float(present[b, s])}
                for name, values in SLOT_HEADS.items():
                    if name != "present":
                        obj[name] = values[int(logits[name][b, s].argmax())]
                objects.append(obj)
            objects.sort(key=lambda o: -o["confidence"])
            out.append({
                "objects": objects,
                **{name: values[int(logits[name][b].argmax())] for name, values in SCENE_HEADS.items()},
            })
        return out

    @torch.no_grad()
    def embedding(self, images) -> torch.Tensor:
        """Unit-norm image embeddings, for similarity between pictures."""
        return F.normalize(self(to_tensor(images))[0], dim=-1)


def to_tensor(images) -> torch.Tensor:
    """uint8 HWC arrays / PIL images / a [-1,1] tensor batch -> a float (B,3,H,W) tensor in [-1,1]."""
    if torch.is_tensor(images):
        return images.float()
    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def labels(scene: Scene) -> dict[str, np.ndarray]:
    """Training targets of one scene: per slot (IGNORE where a head does not apply) and per scene."""
    out = {name: np.full(len(vocab.POSITIONS), IGNORE, np.int64) for name in SLOT_HEADS}
    out["present"][:] = 0
    for obj in scene.objects:
        s = vocab.POSITIONS.index(obj.position)
        out["present"][s] = 1
        for name in ("shape", "color", "size", "pattern", "marking"):
            out[name][s] = SLOT_HEADS[name].index(getattr(obj, name))
        if obj.marking != "none":
            out["accent"][s] = vocab.COLOR_NAMES.index(obj.accent)
    out["background"] = np.int64(vocab.BACKGROUNDS.index(scene.background))
    out["style"] = np.int64(vocab.STYLES.index(scene.style))
    return out


def loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    total, logs = 0.0, {}
    for name, lg in logits.items():
        value = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[name].reshape(-1), ignore_index=IGNORE)
        total = total + value
        logs[name] = round(value.item(), 4)
    return total, logs


@dataclass
class Accuracy:
    """Per-attribute accuracy of oracle readings against ground truth."""

    correct: dict
    total: dict

    def as_dict(self) -> dict[str, float]:
        return {k: self.correct[k] / self.total[k] for k in self.total if self.total[k]}


def accuracy(oracle: Oracle, images: torch.Tensor, scenes: list[Scene], batch: int = 256) -> dict[str, float]:
    """Accuracy of the oracle on rendered scenes, per attribute, slots where an object is."""
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            _, lg = oracle(images[i : i + batch])
            for j, scene in enumerate(scenes[i : i + batch]):
                target = labels(scene)
                for name in list(SLOT_HEADS) + list(SCENE_HEADS):
                    pred = lg[name][j].argmax(-1).numpy()
                    t = target[name]
                    valid = t != IGNORE
                    if name == "present":  # positions: right when every place is right, empty or not
                        name, hits, count = "position", int((pred == t).all()), 1
                    else:
                        hits, count = int(((pred == t) & valid).sum()), int(valid.sum())
                    correct[name] = correct.get(name, 0) + hits
                    total[name] = total.get(name, 0) + count
    return Accuracy(correct, total).as_dict()
