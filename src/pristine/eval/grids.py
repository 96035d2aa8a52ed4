"""Image grids with captions, the picture format of every report."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_grid(rows: list[list[np.ndarray]], row_labels: list[str] | None = None, scale: int = 4,
              label_width: int = 260, pad: int = 2) -> Image.Image:
    """rows of uint8 HxWx3 images -> one picture, each row with its caption on the left."""
    h, w = rows[0][0].shape[:2]
    cell_h, cell_w = h * scale, w * scale
    n_cols = max(len(r) for r in rows)
    left = label_width if row_labels else 0
    canvas = Image.new("RGB", (left + n_cols * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        y = pad + r * (cell_h + pad)
        if row_labels:
            lines = textwrap.wrap(row_labels[r], width=max(10, label_width // 7))[: max(1, cell_h // 12)]
            for k, line in enumerate(lines):
                draw.text((4, y + 2 + 12 * k), line, fill="black", font=font)
        for c, image in enumerate(row):
            tile = Image.fromarray(np.asarray(image, np.uint8)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * (cell_w + pad), y))
    return canvas
