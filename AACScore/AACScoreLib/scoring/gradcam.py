"""Grad-CAM heatmaps of the AAC-24 regression: where in the crop the network found what raised the score.

pytorch-grad-cam computes the map on the last residual stage (its scSE modules included) for output 0, the total.
Grad-CAM keeps only positive evidence (ReLU), so a crop the network scores low can give an all-zero map: that is a
valid answer ("nothing raised the score"), reported by a flag, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Heatmap:
    """Grad-CAM map in crop space at the network's input size, 0..1 (1 = strongest), and whether it is all zero."""

    crop_map: np.ndarray
    all_zero: bool

    def on_image(self, crop, image_shape: tuple[int, int]) -> np.ndarray:
        """The map on the radiograph grid (0 outside the crop), via geometry.crop_to_image."""
        from ..geometry.spine import crop_to_image

        return crop_to_image(self.crop_map, crop, image_shape)


def grad_cam(model, image) -> Heatmap:
    """Grad-CAM of output 0 (the AAC-24 total) for one prepared input (1, 1, H, W) or (1, H, W) or (H, W)."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = torch.as_tensor(image, dtype=torch.float32)
    while image.dim() < 4:
        image = image.unsqueeze(0)
    was_training = model.training
    try:
        with GradCAM(model=model, target_layers=[model.target_layer]) as cam:
            maps = cam(input_tensor=image, targets=[ClassifierOutputTarget(0)])
    finally:
        model.train(was_training)
    crop_map = np.nan_to_num(np.asarray(maps[0], dtype=np.float32), nan=0.0)
    all_zero = not float(crop_map.max()) > 0.0
    return Heatmap(np.zeros_like(crop_map) if all_zero else np.clip(crop_map, 0.0, 1.0), all_zero)


def band_mask(geometry, image_shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the union of the four aortic segment polygons (L1–L4) on the radiograph grid."""
    from skimage.draw import polygon

    mask = np.zeros(image_shape, dtype=bool)
    for segment in geometry.segments:
        rows, cols = polygon(segment.polygon[:, 0], segment.polygon[:, 1], shape=image_shape)
        mask[rows, cols] = True
    return mask


def band_fraction(image_map: np.ndarray, geometry) -> float | None:
    """Share of the heatmap's mass that lies on the aortic band; None for an all-zero map."""
    total = float(np.sum(image_map))
    if total <= 0.0:
        return None
    return float(np.sum(image_map[band_mask(geometry, image_map.shape)]) / total)
