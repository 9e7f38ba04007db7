"""SynthSeg-style randomisation of training images, so that a network cannot rely on one generator's look.

Given an image (a radiograph, a crop, a working image) and, when known, its label map, `randomise` returns a new
image of the same shape in [0, 1] with random intensities per tissue label, a random intensity curve, a smooth
multiplicative bias field, gamma, blur, a resolution drop, noise and, sometimes, inverted contrast. Geometry is
never changed, so the label map (and any truth in pixels) stays valid. Anchors: SynthSeg (Billot et al. 2023) and
SyntheX (Gao et al. 2023): heavy randomisation of simulated images is what carries a model to real ones.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import upsample

INVERSION_CHANCE = 0.2  # at strength 1


def randomise(image: np.ndarray, rng: np.random.Generator, labels: np.ndarray | None = None,
              strength: float = 1.0) -> np.ndarray:
    """A randomised float32 copy of a 2D `image` in [0, 1], deterministic for a given `rng` state.

    labels: optional integer map of the same shape (0 background, 1..7 vertebrae and context, or any tissue
    labels); each label present gets its own random brightness and contrast. strength: 0 keeps the image
    (only rescaled to [0, 1]), 1 is the full range; values in between scale every effect.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"randomise takes a 2D image, got shape {image.shape}")
    if labels is not None and np.shape(labels) != image.shape:
        raise ValueError(f"labels {np.shape(labels)} do not match the image {image.shape}")
    s = float(np.clip(strength, 0.0, 1.0))
    out = _unit_range(image)
    if s == 0.0:
        return out
    out = _intensity_curve(out, rng, s)
    if labels is not None:
        out = _per_label(out, np.asarray(labels), rng, s)
    out = out * _bias_field(out.shape, rng, s)
    out = _unit_range(out)
    out = np.power(np.clip(out, 0.0, 1.0), np.float32(np.exp(rng.normal(0.0, 0.3 * s))))
    sigma = rng.uniform(0.0, 1.5 * s, 2)
    if sigma.max() > 0.2:
        out = ndimage.gaussian_filter(out, sigma, truncate=3.0)
    if rng.random() < 0.3 * s:
        out = _resolution_drop(out, int(rng.integers(2, 3 + round(2 * s))))
    noise = rng.uniform(0.0, 0.06 * s)
    out = out + noise * rng.standard_normal(out.shape, dtype=np.float32)
    if rng.random() < INVERSION_CHANCE * s:
        out = -out
    return _unit_range(out)


def _unit_range(image: np.ndarray) -> np.ndarray:
    """Robust min-max to [0, 1] (0.5th and 99.5th percentiles of a subsample)."""
    step = max(1, image.size // 20000)
    low, high = np.percentile(image.ravel()[::step], (0.5, 99.5))
    if high <= low:
        return np.zeros(image.shape, np.float32)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _intensity_curve(image: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A random monotone curve through 6 knots: other detector responses and processing."""
    knots = np.linspace(0.0, 1.0, 6)
    values = np.cumsum(np.exp(rng.normal(0.0, 0.6 * s, 6)))
    values = (values - values[0]) / (values[-1] - values[0])
    return np.interp(image, knots, values).astype(np.float32)


def _per_label(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Each tissue label gets a random contrast around its mean and a random brightness offset (soft-edged)."""
    index = labels.astype(np.intp, copy=False)
    if index.min() < 0:
        raise ValueError("labels must be non-negative")
    n = int(index.max()) + 1
    counts = np.bincount(index.ravel(), minlength=n)
    means = (np.bincount(index.ravel(), weights=image.ravel(), minlength=n) / np.maximum(counts, 1)).astype(np.float32)
    gains = np.exp(rng.normal(0.0, 0.3 * s, n)).astype(np.float32)
    offsets = rng.normal(0.0, 0.15 * s, n).astype(np.float32)
    shifted = ndimage.gaussian_filter(offsets[index] - (gains[index] - 1.0) * means[index], 1.0)
    return image * gains[index] + shifted


def _bias_field(shape: tuple[int, int], rng: np.random.Generator, s: float) -> np.ndarray:
    """Smooth multiplicative field: a bicubic surface through a coarse random grid, exponentiated."""
    grid = rng.normal(0.0, 0.25 * s, (4, 4)).astype(np.float32)
    small = (-(-shape[0] // 8), -(-shape[1] // 8))
    field = ndimage.zoom(grid, (small[0] / 4, small[1] / 4), order=3, mode="nearest", grid_mode=True)
    return np.exp(upsample(field, 8, shape))


def _resolution_drop(image: np.ndarray, factor: int) -> np.ndarray:
    """Average over factor x factor blocks, then back up bilinearly: a coarser detector or a resized export."""
    rows, cols = (-(-n // factor) for n in image.shape)
    padded = np.pad(image, ((0, rows * factor - image.shape[0]), (0, cols * factor - image.shape[1])), mode="edge")
    return upsample(padded.reshape(rows, factor, cols, factor).mean(axis=(1, 3)), factor, image.shape)
