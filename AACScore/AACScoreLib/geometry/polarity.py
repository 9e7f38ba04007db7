"""Which way round the grey values run: bone bright, as every model here was trained, or bone dark.

File tags can be wrong or missing (a PNG exported from a MONOCHROME1 image without its inversion, a Presentation LUT
Shape that contradicts the photometric tag), and the segmenter finds vertebrae either way round while the scorer
reads plaque worse on a bone-dark image. So the label map decides: vertebral bodies are denser than the discs and
soft tissue around them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLEARLY_INVERTED = -0.05
"""Bone contrast below this is a bone-dark image. On 140 development phantoms of every family, with the segmenter's
label maps, upright ones measured -0.028 and above and inverted looks -0.045 and below; a wrong inversion costs more
than a missed one, so the margin leans to leaving an image as it is."""


def bone_contrast(pixels: np.ndarray, labels: np.ndarray) -> float:
    """Median inside the L1-L5 bodies minus the median of a ring around them (discs, soft tissue; other labels
    left out), over the image's 5-95th percentile range: positive when bone is bright, negative when inverted."""
    step = max(1, max(labels.shape) // 512)  # a measure of medians: a coarse grid gives it in milliseconds
    pixels, labels = pixels[::step, ::step], labels[::step, ::step]
    bodies = np.isin(labels, (1, 2, 3, 4, 5))
    if not bodies.any():
        return 0.0
    body_side = np.sqrt(bodies.sum() / len(np.unique(labels[bodies])))
    near = ndimage.binary_dilation(bodies, iterations=max(1, int(0.1 * body_side)))
    around = ndimage.binary_dilation(bodies, iterations=max(2, int(0.4 * body_side))) & ~near & (labels == 0)
    if not around.any():
        return 0.0
    low, high = np.percentile(pixels, (5, 95))
    return float((np.median(pixels[bodies]) - np.median(pixels[around])) / max(float(high - low), 1e-6))


def inverted(pixels: np.ndarray) -> np.ndarray:
    """The image turned bone bright over its own range (as a viewer inverts it)."""
    return (pixels.max() + pixels.min() - pixels).astype(pixels.dtype)
