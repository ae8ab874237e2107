"""dSprites-like images: one white sprite (square, ellipse or heart) on black, 64×64, binary.

The latent grid follows the original dataset: 3 shapes × 6 scales (0.5..1) × 40 orientations (0..2π, both ends
included, as in dSprites) × 32 x positions × 32 y positions. Latents are sampled uniformly from that grid, which is
what VTAB's random 1,000 training images amount to.
"""

from __future__ import annotations

import numpy as np

VERSION = 2  # in the cache key: bump whenever the images or labels change
SIZE = 64
SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)  # 0 and 2π are both values, as in dSprites
POSITIONS = np.linspace(0.0, 1.0, 32)
# Sprite half-extent at scale 1 and the span of centres, in pixels: the largest sprite stays inside the frame.
_HALF_EXTENT = 10.0
_CENTRE_LO, _CENTRE_HI = 10.5, 52.5

LATENT_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")  # columns of the latent index array


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether sprite-frame points (u right, v up; the sprite spans about [-1, 1]) are inside the canonical shape."""
    if shape == 0:  # square: slightly smaller so its area is close to the others'
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == 1:  # ellipse elongated along u (2:1), so orientation is visible modulo π
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    # heart: the implicit curve (x² + y² − 1)³ − x² y³ ≤ 0 spans x ∈ [−1.14, 1.14], y ∈ [−1, 1.24]; shrink and centre
    x, y = u * 1.12, v * 1.12 + 0.12
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def sample_latents(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly random latent index rows (shape, scale, orientation, pos_x, pos_y), int64 (n, 5)."""
    highs = np.array([len(SHAPES), len(SCALES), len(ORIENTATIONS), len(POSITIONS), len(POSITIONS)])
    # Drawn row by row, so the first k rows do not depend on n (a preview shows a split's first images).
    return rng.integers(0, highs, size=(n, len(highs))).astype(np.int64)


def draw_sprites(latents: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Render latent index rows (n, 5) into uint8 images (n, 64, 64) with values 0 or 255."""
    latents = np.asarray(latents, dtype=np.int64)
    out = np.zeros((len(latents), SIZE, SIZE), dtype=np.uint8)
    # Pixel centres; image rows go down, so v (up) is −row.
    cols = np.arange(SIZE, dtype=np.float64)[None, None, :] + 0.5
    rows = np.arange(SIZE, dtype=np.float64)[None, :, None] + 0.5
    for start in range(0, len(latents), chunk):
        lat = latents[start:start + chunk]
        scale = SCALES[lat[:, 1]][:, None, None] * _HALF_EXTENT
        angle = ORIENTATIONS[lat[:, 2]][:, None, None]
        cx = (_CENTRE_LO + POSITIONS[lat[:, 3]] * (_CENTRE_HI - _CENTRE_LO))[:, None, None]
        cy = (_CENTRE_LO + POSITIONS[lat[:, 4]] * (_CENTRE_HI - _CENTRE_LO))[:, None, None]
        dx, dy = cols - cx, -(rows - cy)
        # Rotate the pixel grid by −angle so the sprite appears rotated by +angle (counter-clockwise).
        cos, sin = np.cos(angle), np.sin(angle)
        u = (cos * dx + sin * dy) / scale
        v = (-sin * dx + cos * dy) / scale
        block = out[start:start + chunk]
        for shape in range(len(SHAPES)):
            sel = lat[:, 0] == shape
            if sel.any():
                block[sel] = np.where(_inside(shape, u[sel], v[sel]), 255, 0).astype(np.uint8)
    return out


def render_dsprites(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random dSprites-like images and their latent indices: uint8 (n, 64, 64), int64 (n, 5)."""
    latents = sample_latents(n, np.random.default_rng(seed))
    return draw_sprites(latents), latents


def label_location(latents: np.ndarray, num_classes: int = 16) -> np.ndarray:
    """VTAB ``dsprites_loc``: the x position index (0..31) binned to ``num_classes`` equal bins."""
    return (latents[:, 3] * num_classes // len(POSITIONS)).astype(np.int64)


def label_orientation(latents: np.ndarray, num_classes: int = 16) -> np.ndarray:
    """VTAB ``dsprites_ori``: the orientation index (0..39) binned as VTAB does, ``floor(i / (40 / num_classes))``."""
    return (latents[:, 2] * num_classes // len(ORIENTATIONS)).astype(np.int64)
