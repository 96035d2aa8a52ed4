"""Drawing scenes with numpy: supersampled masks, procedural textures, post-process styles.

Everything is a pure function of the scene (its texture_seed included), so renders are
bit-identical across runs and machines.
"""

from __future__ import annotations

import numpy as np

from . import vocab
from .scene import Scene, WorldObject

SUPERSAMPLE = 4


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(c, c)  # x, y in [0, 1], y grows downwards


# ---- shapes: inside tests in object-local coordinates (unit radius, y up) -------------------


def _polygon_inside(x, y, n_sides: int, radius: float, rotation: float = 0.0) -> np.ndarray:
    """Regular convex polygon: inside every half-plane of its edges."""
    inside = np.ones_like(x, dtype=bool)
    apothem = radius * np.cos(np.pi / n_sides)
    for k in range(n_sides):
        a = rotation + (k + 0.5) * 2 * np.pi / n_sides
        inside &= x * np.cos(a) + y * np.sin(a) <= apothem
    return inside


def _star_inside(x, y) -> np.ndarray:
    r = np.hypot(x, y)
    theta = np.mod(np.arctan2(y, x) - np.pi / 2, 2 * np.pi / 5)  # one point straight up
    phase = np.abs(theta / (2 * np.pi / 5) - 0.5) * 2  # 1 at a point, 0 between points
    r_outer, r_inner = 1.0, 0.42
    return r <= r_inner + (r_outer - r_inner) * phase**1.6


def _heart_inside(x, y) -> np.ndarray:
    xs, ys = x * 1.15, y * 1.15 + 0.1
    return (xs**2 + ys**2 - 1) ** 3 - xs**2 * ys**3 <= 0


SHAPE_FNS = {
    "circle": lambda x, y: x**2 + y**2 <= 0.92**2,
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) <= 0.74,
    "triangle": lambda x, y: _polygon_inside(x, y + 0.12, 3, 1.05, rotation=-5 * np.pi / 6),
    "star": _star_inside,
    "heart": _heart_inside,
    "diamond": lambda x, y: np.abs(x) * 0.8 + np.abs(y) <= 0.98,
    "hexagon": lambda x, y: _polygon_inside(x, y, 6, 0.95),
    "cross": lambda x, y: ((np.abs(x) <= 0.33) & (np.abs(y) <= 0.92)) | ((np.abs(y) <= 0.33) & (np.abs(x) <= 0.92)),
}


# ---- patterns and markings: which pixels of an object take the second tone -----------------


def _pattern_mask(pattern: str, gx, gy, lx, ly) -> np.ndarray | None:
    """gx, gy: image coordinates in [0,1] (patterns keep one scale at every object size)."""
    if pattern == "striped":
        return np.mod((gx + gy) / 0.125, 1.0) < 0.5
    if pattern == "dotted":
        cx, cy = np.mod(gx / 0.1, 1.0) - 0.5, np.mod(gy / 0.1, 1.0) - 0.5
        return cx**2 + cy**2 <= 0.3**2
    if pattern == "checkered":
        return (np.floor(gx / 0.0625) + np.floor(gy / 0.0625)) % 2 == 0
    if pattern == "zigzag":
        tri = np.abs(np.mod(gx / 0.125, 1.0) - 0.5) * 0.125
        return np.mod((gy + tri) / 0.125, 1.0) < 0.5
    return None  # solid; gradient is a blend, handled by the caller


def _marking_mask(marking: str, lx, ly) -> np.ndarray | None:
    """lx, ly: object-local unit coordinates, so a marking sits at the same place on the object."""
    if marking == "split":
        return lx > 0
    if marking == "band":
        return np.abs(ly) <= 0.25
    if marking == "dot":
        return lx**2 + ly**2 <= 0.38**2
    if marking == "quarters":
        return (lx > 0) ^ (ly > 0)
    return None  # rim is drawn from the mask's border


# ---- backgrounds ---------------------------------------------------------------------------


def _background(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(n)
    img = np.zeros((n, n, 3), np.float32)

    def fill(rgb):
        img[:] = np.asarray(rgb, np.float32) / 255

    def noise(scale: float, cells: int = 8):
        coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
        rep = -(-n // cells)
        return np.kron(coarse, np.ones((rep, rep), np.float32))[:n, :n, None] * scale

    if name == "white":
        fill((244, 244, 240))
    elif name == "night":
        fill((18, 22, 58))
        for _ in range(rng.integers(6, 12)):
            sx, sy = rng.uniform(0, 1, 2)
            img[(x - sx) ** 2 + (y - sy) ** 2 < (0.012) ** 2] = (0.95, 0.95, 0.8)
    elif name == "grass":
        fill((78, 150, 52))
        blades = np.sin(x * 90 + rng.uniform(0, 6)) * np.sin(y * 13 + x * 7)
        img += blades[..., None] * np.array([0.04, 0.09, 0.03], np.float32) + noise(0.03)
    elif name == "sky":
        top, bottom = np.array([95, 160, 235], np.float32) / 255, np.array([185, 220, 250], np.float32) / 255
        img[:] = top + (bottom - top) * y[..., None]
        for _ in range(rng.integers(1, 3)):
            cx, cy = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
            cloud = np.exp(-(((x - cx) / 0.16) ** 2 + ((y - cy) / 0.06) ** 2))
            img += (1 - img) * cloud[..., None] * 0.8
    elif name == "sand":
        fill((226, 200, 150))
        img += noise(0.025, 16) + rng.normal(0, 0.025, (n, n, 1)).astype(np.float32)
    elif name == "water":
        fill((35, 95, 170))
        waves = np.sin(y * 70 + np.sin(x * 12 + rng.uniform(0, 6)) * 2.5)
        img += (waves > 0.75)[..., None] * np.array([0.18, 0.22, 0.2], np.float32)
    elif name == "wood":
        fill((150, 100, 58))
        grain = np.sin(y * 60 + np.sin(x * 5 + rng.uniform(0, 6)) * 3)
        img += grain[..., None] * np.array([0.06, 0.045, 0.025], np.float32)
    elif name == "brick":
        fill((165, 72, 52))
        row = np.floor(y / 0.125)
        col = np.mod(x / 0.25 + 0.5 * np.mod(row, 2), 1.0)
        mortar = (np.mod(y / 0.125, 1.0) < 0.12) | (col < 0.05)
        img[mortar] = (0.8, 0.78, 0.72)
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 1)


# ---- objects ---------------------------------------------------------------------------------


def _color(name: str, brightness: float = 1.0) -> np.ndarray:
    return np.clip(np.asarray(vocab.COLORS[name], np.float32) / 255 * brightness, 0, 1)


def _border(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of the mask within `width` pixels of its outside (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _draw_object(img: np.ndarray, obj: WorldObject, style: str) -> np.ndarray:
    n = img.shape[0]
    gx, gy = _grid(n)
    cx, cy = vocab.POSITION_XY[obj.position]
    cx, cy = cx + obj.jitter[0], cy + obj.jitter[1]
    radius = vocab.SIZE_RADIUS[obj.size]
    a = np.deg2rad(obj.angle)
    dx, dy = (gx - cx) / radius, -(gy - cy) / radius
    lx, ly = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    mask = SHAPE_FNS[obj.shape](lx, ly)

    base = _color(obj.color, obj.brightness)
    fill = np.broadcast_to(base, img.shape).copy()
    second = _pattern_mask(obj.pattern, gx, gy, lx, ly)
    if second is not None:
        fill[second] = base * 0.45
    if obj.pattern == "gradient":  # the color fades to white from top to bottom of the object
        t = np.clip((ly + 1) / 2, 0, 1)[..., None]
        fill = fill * t + (1 - t) * np.array([0.97, 0.97, 0.97], np.float32)
    if obj.marking != "none":
        accent = _color(obj.accent or obj.color, obj.brightness)
        if obj.marking == "rim":  # 0.3 of the radius: rims of half the radius made small rims read as small dots
            marked = _border(mask, max(SUPERSAMPLE, round(0.3 * radius * n)))
        else:
            marked = _marking_mask(obj.marking, lx, ly)
        fill[marked] = accent

    outline_width = max(1, n // 40) if style == "cartoon" else max(1, n // 128)
    outline = _border(mask, outline_width)
    fill[outline] = (0.05, 0.05, 0.05) if style == "cartoon" else base * 0.6
    img[mask] = fill[mask]
    return mask


# ---- styles ----------------------------------------------------------------------------------


def _apply_style(img: np.ndarray, style: str) -> np.ndarray:
    if style == "plain":
        return img
    if style == "cartoon":
        return np.round(img * 4) / 4  # flat, posterized colors
    if style == "retro":
        sepia = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        toned = 0.55 * (img @ sepia.T) + 0.45 * img
        n = img.shape[0]
        x, y = _grid(n)
        vignette = 1 - 0.55 * ((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2
        rows = (np.arange(n) * 32 // n) % 2 == 1  # every other output row darker
        scan = np.where(rows, 0.82, 1.0).astype(np.float32)[:, None]
        return np.clip(toned * vignette[..., None] * scan[..., None], 0, 1)
    raise ValueError(f"unknown style {style!r}")


def _downsample(a: np.ndarray, factor: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // factor, factor, w // factor, factor, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene, size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene: an RGB uint8 image (size x size) and one boolean mask per object."""
    n = size * SUPERSAMPLE
    rng = np.random.default_rng(scene.texture_seed)
    img = _background(scene.background, n, rng)
    masks = [_draw_object(img, obj, scene.style) for obj in scene.objects]
    img = _apply_style(img, scene.style)
    out = np.clip(np.round(_downsample(img, SUPERSAMPLE) * 255), 0, 255).astype(np.uint8)
    small_masks = [_downsample(m.astype(np.float32), SUPERSAMPLE) >= 0.5 for m in masks]
    return out, small_masks
