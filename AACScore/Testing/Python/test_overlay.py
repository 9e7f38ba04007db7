"""Overlay pictures: heatmap only where it is strong, outlines drawn, written whole."""

from __future__ import annotations

import numpy as np
from PIL import Image

from AACScoreLib.io.overlay import render_overlay, save_overlay


def test_overlay_tints_only_strong_heat_and_draws_vertebra_outlines(tmp_path):
    pixels = np.tile(np.linspace(0, 1000, 400, dtype=np.float32), (300, 1))
    heat = np.zeros_like(pixels)
    heat[100:150, 100:150] = 1.0
    heat[200:250, 200:250] = 0.1  # weak: stays transparent
    labels = np.zeros(pixels.shape, np.uint8)
    labels[40:80, 300:350] = 1
    plain = np.asarray(render_overlay(pixels, max_side=400)).astype(int)
    image = np.asarray(render_overlay(pixels, heat, labels, title="x  AAC-24 3.0", category="no/mild", max_side=400))
    assert image.shape == (300, 400, 3)
    assert np.abs(image[125, 125].astype(int) - plain[125, 125]).sum() > 60
    assert np.array_equal(image[225, 225], plain[225, 225])
    assert tuple(image[40, 320]) == (230, 80, 80) and tuple(image[60, 320]) == tuple(plain[60, 320])
    path = save_overlay(tmp_path / "a_heatmap.png", Image.fromarray(image))
    assert Image.open(path).size == (400, 300) and [p.name for p in tmp_path.iterdir()] == ["a_heatmap.png"]


def test_large_radiographs_are_downscaled_for_the_picture():
    picture = render_overlay(np.zeros((3000, 2400), np.float32), np.zeros((3000, 2400), np.float32))
    assert max(picture.size) == 1200
