"""Overlay pictures for a person to check a result: radiograph, heatmap, vertebra outlines, segment boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_path
from ..kauppila import CATEGORY_COLORS

MAX_SIDE = 1200
HEAT_FLOOR = 0.15  # heat below this stays transparent, so weak diffuse evidence does not tint the whole crop
VERTEBRA_COLORS = ((230, 80, 80), (240, 160, 60), (230, 220, 70), (90, 200, 90), (80, 150, 240))


def display_gray(pixels: np.ndarray) -> np.ndarray:
    """uint8 display of a radiograph with a robust 1st–99.5th percentile window (bone bright)."""
    sample = pixels[:: max(1, pixels.shape[0] // 512), :: max(1, pixels.shape[1] // 512)]
    low, high = np.percentile(sample, [1.0, 99.5])
    scaled = (pixels.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """RGB uint8 of a 0..1 map through matplotlib's 'inferno' colour map."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def render_overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    geometry=None,
    title: str = "",
    category: str | None = None,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """A downscaled RGB picture: heatmap blended where it is non-zero, outlines and boundaries drawn on top."""
    scale = min(1.0, max_side / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    gray = np.asarray(Image.fromarray(display_gray(pixels)).resize(size, Image.BILINEAR))
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if heatmap is not None:
        heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.BILINEAR))
        alpha = (0.6 * np.clip((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0))[..., None]
        rgb = rgb * (1.0 - alpha) + heat_colors(heat).astype(np.float32) * alpha
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if labels is not None:
        small = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
        edges = _label_edges(small)
        overlay = np.asarray(image).copy()
        for value, color in enumerate(VERTEBRA_COLORS, start=1):
            overlay[edges & (small == value)] = color
        image = Image.fromarray(overlay)
        draw = ImageDraw.Draw(image)
    if geometry is not None:
        for segment in geometry.segments:
            polygon = [(float(c) * scale, float(r) * scale) for r, c in segment.polygon]
            draw.line(polygon + polygon[:1], fill=(80, 220, 255), width=2)
            r, c = segment.polygon.mean(axis=0) * scale
            draw.text((float(c), float(r)), segment.level, fill=(80, 220, 255))
    if title:
        color = CATEGORY_COLORS.get(category or "", "#ffffff")
        draw.rectangle((0, 0, size[0], 22), fill=(0, 0, 0))
        draw.text((6, 5), title, fill=color)
    return image


def save_overlay(path: str | Path, image: Image.Image) -> Path:
    """Write the PNG atomically."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", compress_level=3)
    return Path(path)


def _label_edges(labels: np.ndarray) -> np.ndarray:
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[1:] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return edges & (labels > 0)
