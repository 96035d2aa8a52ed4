"""Seconds per training step for each model family x method on the tiny test models (batch 2, 16 px,
median of five steps after two of warm-up):
the shape of the cost, not an absolute claim. Prints a markdown table for docs/FAMILIES.md."""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_families  # noqa: E402
import tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from pristine.backbones import load_backbone  # noqa: E402
from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents  # noqa: E402
from pristine.methods import get_method  # noqa: E402
from pristine.world.concepts import get_concept  # noqa: E402
from pristine.world.render import render  # noqa: E402

BUILDERS = {"SD 1.x": tiny_model.build_tiny_sd, "SDXL": tiny_families.build_tiny_sdxl, "SD3": tiny_families.build_tiny_sd3,
            "FLUX dev": tiny_families.build_tiny_flux,
            "FLUX schnell": lambda f: tiny_families.build_tiny_flux(f, guidance_embeds=False)}
METHODS = ("lora", "dreambooth", "textual_inversion", "custom_diffusion", "purecc")


def main():
    root = Path(tempfile.mkdtemp())
    images = root / "star"
    images.mkdir()
    for k, scene in enumerate(get_concept("ember_star").references(5)):
        Image.fromarray(render(scene)[0]).save(images / f"{k}.png")
    spec = ConceptSpec(str(images), "<v1>", "star")
    print("| family | " + " | ".join(METHODS) + " |")
    print("| --- |" + " --- |" * len(METHODS))
    for family, build in BUILDERS.items():
        folder = build(root / family.replace(" ", "_"))
        row = []
        for method in METHODS:
            backbone = load_backbone(str(folder))
            cls = get_method(method)
            # PureCC: step 0 is its stage 1, step 1 stage 2's first; both are warm-up, stage 2 is timed
            m = cls(cls.Config.from_dict({"stage1_steps": 1} if method == "purecc" else {}), backbone, [spec])
            opt = torch.optim.AdamW(m.setup(), lr=1e-4)
            data = build_training_set([ConceptImages.load(spec)], 16, flip=False)
            cache_latents(data, backbone)
            times = []
            for step in range(7):
                g = torch.Generator().manual_seed(step)
                batch = {**data.draw(2, g), "step": step}
                t0 = time.perf_counter()
                loss, _ = m.loss(batch, g)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            row.append(f"{sorted(times[2:])[2]:.3f}")  # median of the five steps after two of warm-up
        print(f"| {family} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
