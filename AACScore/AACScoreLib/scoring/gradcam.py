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
    outputs: np.ndarray | None = None  # the network's outputs for this input (the same forward pass), float32

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
    needs_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    # Gradients are needed from the output back to the target layer only: the layers before it need none, which
    # spares most of the backward pass.
    model.requires_grad_(False)
    model.target_layer.requires_grad_(True)
    try:
        with GradCAM(model=model, target_layers=[model.target_layer]) as cam:
            maps = cam(input_tensor=image, targets=[ClassifierOutputTarget(0)])
            outputs = cam.outputs[0].detach().float().cpu().numpy()
    finally:
        model.train(was_training)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(needs_grad[name])
    crop_map = np.nan_to_num(np.asarray(maps[0], dtype=np.float32), nan=0.0)
    all_zero = not float(crop_map.max()) > 0.0
    return Heatmap(np.zeros_like(crop_map) if all_zero else np.clip(crop_map, 0.0, 1.0), all_zero, outputs)


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


PLAQUE_TOLERANCE_MM = 5.0  # "on the plaque": within this distance of a drawn deposit (Grad-CAM's cells are coarse)


def crop_mask(mask: np.ndarray, geometry, input_size: tuple[int, int]) -> np.ndarray:
    """A radiograph-grid mask resampled into the crop at input_size: the share of each crop pixel it covers."""
    from ..geometry.spine import extract_crop

    return np.clip(extract_crop(mask.astype(np.float32), geometry.crop, out_shape=tuple(input_size)), 0.0, 1.0)


def heat_shares(crop_map: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, float | None]:
    """For each region (a crop-space coverage map in 0..1): the share of the heat's mass on it (`<name>_heat`,
    None for an all-zero map) and its share of the crop's area (`<name>_area`, what a uniform map would give)."""
    total = float(np.sum(crop_map))
    shares: dict[str, float | None] = {}
    for name, coverage in regions.items():
        shares[f"{name}_heat"] = float(np.sum(crop_map * coverage)) / total if total > 0 else None
        shares[f"{name}_area"] = float(np.mean(coverage))
    return shares


def plaque_mask(phantom, tolerance_mm: float = PLAQUE_TOLERANCE_MM) -> np.ndarray:
    """Pixels of a phantom within `tolerance_mm` of its calcified plaque on the L1-L4 walls (the plaque that
    counts): the family's own plaque mask when it has one, else the centre lines of the deposits in its truth."""
    from scipy import ndimage
    from skimage.draw import line

    shape = phantom.pixels.shape
    if phantom.plaque_mask is not None:
        mask = np.asarray(phantom.plaque_mask, dtype=bool)
    else:
        mask = np.zeros(shape, dtype=bool)
        for deposit in phantom.truth["deposits"]:
            points = np.rint(np.asarray(deposit["polyline"], dtype=float)).astype(int)
            points = np.clip(points, 0, np.array(shape) - 1)
            for (r0, c0), (r1, c1) in zip(points[:-1], points[1:]):
                rows, cols = line(r0, c0, r1, c1)
                mask[rows, cols] = True
    if not mask.any():
        return mask
    radius = tolerance_mm / float(phantom.truth["spacing"][0])
    rows, cols = np.nonzero(mask)
    pad = int(np.ceil(radius)) + 1
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, shape[1])
    near = np.zeros(shape, dtype=bool)
    near[r0:r1, c0:c1] = ndimage.distance_transform_edt(~mask[r0:r1, c0:c1]) <= radius
    return near
