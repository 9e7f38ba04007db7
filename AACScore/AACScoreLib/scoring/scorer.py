"""Scoring with a trained model package: crop -> AAC-24 total (and subscores), and its Grad-CAM heatmap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelPackageError
from ..kauppila import MAX_SUBSCORE, MAX_TOTAL, SUBSCORE_COLUMNS, category


@dataclass
class ScoreResult:
    """The predicted AAC-24 total (clipped to 0..24, not rounded) and, when the model has them, the subscores."""

    aac24: float
    subscores: dict[str, float] | None = None

    @property
    def category(self) -> str:
        return category(self.aac24)


class Scorer:
    """A scorer package loaded for inference on one device."""

    def __init__(self, model, manifest: dict, device, package=None):
        self.model = model
        self.manifest = manifest
        self.device = device
        self.package = package  # the ModelPackage it came from: QC reads its calibration file from there
        # the package's sha256 identity (manifest and weights); "" when not from a package
        self.identity = package.identity if package is not None else ""
        self.input_size: tuple[int, int] = tuple(int(v) for v in manifest["input"]["size"])

    @classmethod
    def from_package(cls, package=None, device: str = "cpu") -> "Scorer":
        """Load a package (ModelPackage, folder/zip path, name, or None for the newest scorer) on device
        "cpu", "cuda" or "auto"; weights are checked against the manifest's sha256 before use."""
        from ..packages import ModelPackage, find_package, load_safetensors
        from .model import model_from_state
        from ..devices import resolve_device

        if not isinstance(package, ModelPackage):
            package = find_package(None if package is None else str(package), "scorer")
        manifest = package.manifest
        try:
            architecture = manifest["architecture"]
            weights = architecture["weights"]
            size = manifest["input"]["size"]
        except (KeyError, TypeError):
            raise ModelPackageError(f"{package.path}: manifest lacks architecture.weights or input.size") from None
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in size)):
            raise ModelPackageError(f"{package.path}: input.size must be [rows, cols] of whole numbers of at least 16 "
                                    f"pixels, got {size!r} (refused)")
        model_settings = {k: architecture[k] for k in ("backbone", "scse_combine", "scse_reduction", "dropout",
                                                       "subscores_head", "in_channels") if k in architecture}
        model = model_from_state(model_settings, load_safetensors(package, weights))
        device = resolve_device(device)
        return cls(model.to(device), manifest, device, package)

    @property
    def has_subscores(self) -> bool:
        return self.model.subscore_head is not None

    def crop(self, pixels: np.ndarray, geometry) -> np.ndarray:
        """The model's input crop from a radiograph and its geometry (exactly as in training)."""
        from ..geometry.spine import extract_crop

        return extract_crop(pixels, geometry.crop, out_shape=self.input_size)

    def prepare(self, crop_pixels: np.ndarray):
        """A crop (raw intensities, any size, upright with anterior on the left) -> network input (1, 1, H, W)."""
        import torch
        import torch.nn.functional as F

        from .data import normalise_crop

        crop = np.asarray(crop_pixels, dtype=np.float32)
        if crop.ndim != 2:
            raise ValueError(f"a crop must be a 2D array, got shape {crop.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
        if tuple(crop.shape) != self.input_size:
            tensor = F.interpolate(tensor, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return torch.from_numpy(normalise_crop(tensor[0, 0].numpy()))[None, None].to(self.device)

    def score(self, crop_pixels: np.ndarray) -> ScoreResult:
        import torch

        self.model.eval()
        with torch.no_grad():
            output = self.model(self.prepare(crop_pixels))[0].float().cpu().numpy()
        return _score_result(output)

    def heatmap(self, crop_pixels: np.ndarray):
        """Grad-CAM of the total for this crop (heatmap.Heatmap; .on_image(geometry.crop, shape) maps it back)."""
        from .gradcam import grad_cam

        return grad_cam(self.model, self.prepare(crop_pixels))

    def score_and_heatmap(self, crop_pixels: np.ndarray):
        """(ScoreResult, Heatmap) from one forward pass: Grad-CAM's pass gives the outputs too, which halves the
        network's cost per radiograph (the score equals `score`'s: the same arithmetic, with gradients kept)."""
        heat = self.heatmap(crop_pixels)
        return _score_result(heat.outputs), heat


def _score_result(output: np.ndarray) -> ScoreResult:
    """The total clipped to 0..24 and, when the network has them, the subscores clipped to 0..3."""
    total = float(np.clip(output[0], 0.0, MAX_TOTAL))
    subscores = None
    if len(output) > 1:
        subscores = {name: float(np.clip(v, 0.0, MAX_SUBSCORE)) for name, v in zip(SUBSCORE_COLUMNS, output[1:])}
    return ScoreResult(total, subscores)

