"""The AAC-24 regression network of Shao et al. (2025): a ResNet with scSE attention after every residual block.

The backbone is torchvision's ResNet (ResNet34 in the paper; ResNet18 allowed for the small CPU demo). Each
residual block is wrapped so that a concurrent spatial and channel squeeze & excitation (scSE, Roy et al. 2018)
recalibrates its output; the two recalibrated maps are combined by element-wise max (the max-out variant Roy et al.
found best in their follow-up study) or by addition (their original form), a setting. The ImageNet classifier is
replaced by BatchNorm1d -> Dropout(0.5) -> Linear(512, 1); an optional second head of the same form predicts the
eight wall subscores L1A..L4P. The network takes one grey channel: the first convolution's ImageNet filters are
summed over RGB, which is exactly what feeding the grey crop replicated to three channels would compute, for a third
of the cost. Output: (batch, 1) or (batch, 9); column 0 is always the AAC-24 total (what Grad-CAM explains).
The total head works in standardised units: its output is multiplied by the training scores' standard deviation and
shifted by their mean (two buffers saved with the weights), so that SGD at the paper's lr 0.01 does not diverge on a
0..24 target; the MSE on raw scores then differs from the trained loss only by the constant factor 1/std².
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
import torchvision

from ..errors import ModelPackageError
from ..kauppila import SUBSCORE_COLUMNS

BACKBONES = ("resnet18", "resnet34")
SCSE_COMBINE = ("max", "add")
# Grey crops are scaled to 0..1 (scoring.data.normalise_crop) and then standardised with the mean of ImageNet's
# RGB statistics, matching the summed first-layer filters.
INPUT_MEAN = 0.449
INPUT_STD = 0.226

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "backbone": "resnet34",
    "scse_combine": "max",
    "scse_reduction": 16,
    "dropout": 0.5,
    "subscores_head": False,
    "in_channels": 1,
}


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation: re-weights channels and pixels of a feature map."""

    def __init__(self, channels: int, reduction: int = 16, combine: str = "max"):
        super().__init__()
        if combine not in SCSE_COMBINE:
            raise ValueError(f"scSE combine must be one of {SCSE_COMBINE}, got {combine!r}")
        hidden = max(channels // reduction, 1)
        self.combine = combine
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial_gate = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = x * self.channel_gate(x)
        spatial = x * self.spatial_gate(x)
        return torch.maximum(channel, spatial) if self.combine == "max" else channel + spatial


class SCSEBlock(nn.Module):
    """A residual block followed by scSE on its output."""

    def __init__(self, block: nn.Module, scse: SCSE):
        super().__init__()
        self.block = block
        self.scse = scse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scse(self.block(x))


def _head(features: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(features), nn.Dropout(dropout), nn.Linear(features, outputs))


class ScorerNet(nn.Module):
    """scSE-ResNet regression of the AAC-24 total (and optionally the eight subscores) from a grey crop."""

    def __init__(self, architecture: dict[str, Any] | None = None):
        super().__init__()
        arch = {**DEFAULT_ARCHITECTURE, **(architecture or {})}
        if arch["backbone"] not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {arch['backbone']!r}")
        self.architecture = arch
        backbone = getattr(torchvision.models, arch["backbone"])(weights=None)
        if arch["in_channels"] != 3:
            old = backbone.conv1
            backbone.conv1 = nn.Conv2d(arch["in_channels"], old.out_channels, old.kernel_size, old.stride,
                                       old.padding, bias=False)
        for stage_name in ("layer1", "layer2", "layer3", "layer4"):
            stage = getattr(backbone, stage_name)
            for index, block in enumerate(stage):
                scse = SCSE(block.conv2.out_channels, arch["scse_reduction"], arch["scse_combine"])
                stage[index] = SCSEBlock(block, scse)
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = _head(features, 1, arch["dropout"])
        self.subscore_head = _head(features, len(SUBSCORE_COLUMNS), arch["dropout"]) if arch["subscores_head"] else None
        self.register_buffer("target_mean", torch.tensor(0.0))
        self.register_buffer("target_std", torch.tensor(1.0))

    def set_target_scale(self, mean: float, std: float) -> None:
        """Express the total head in units of the training scores (see the module docstring)."""
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(max(float(std), 1.0))

    @property
    def target_layer(self) -> nn.Module:
        """The last residual stage including its scSE modules: Grad-CAM's layer."""
        return self.backbone.layer4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (batch, 512): what the heads read, and what QC compares with training."""
        return self.backbone((x - INPUT_MEAN) / INPUT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        total = self.head(features) * self.target_std + self.target_mean
        if self.subscore_head is None:
            return total
        return torch.cat([total, self.subscore_head(features)], dim=1)


def scse_blocks(model: nn.Module) -> list[SCSEBlock]:
    """Every residual block that carries scSE (16 for ResNet34, 8 for ResNet18)."""
    return [m for m in model.modules() if isinstance(m, SCSEBlock)]


FREEZABLE_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def freeze_stages(model: ScorerNet, stages: Sequence[str]) -> list[nn.Module]:
    """Stop training the named backbone stages (fine-tuning on few cases keeps the early, generic filters);
    returns their modules, which the training loop keeps in eval mode so BatchNorm statistics stay too."""
    unknown = sorted(set(stages) - set(FREEZABLE_STAGES))
    if unknown:
        raise ValueError(f"stages to freeze must be among {', '.join(FREEZABLE_STAGES)}; got {', '.join(unknown)}")
    backbone = model.backbone
    modules = [m for stage in stages for m in ((backbone.conv1, backbone.bn1) if stage == "stem"
                                               else (getattr(backbone, stage),))]
    for module in modules:
        module.requires_grad_(False)
    return modules


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer: fine-tuning on few cases keeps their running statistics (batches of a handful of
    images from one site would otherwise replace what thousands of training images set)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batchnorm(model: ScorerNet, crops: torch.Tensor, batch: int = 16) -> None:
    """Re-estimate the backbone's BatchNorm statistics from a cohort's crops (N, 1, H, W) (AdaBN, Li et al. 2018).

    Why: those statistics are what depends most on how a site's images look, and estimating them needs no scores.
    Weights and the head's BatchNorm (on pooled features) are kept; the model is left in eval mode."""
    layers = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch, not a running one
        layer.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(crops), batch):
            model.features(crops[start:start + batch].to(device, torch.float32))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()


def build_model(architecture: dict[str, Any] | None = None, imagenet_weights: str | Path | None = None) -> ScorerNet:
    """A new network; ImageNet initialisation of the backbone from a local torchvision file when one is given."""
    model = ScorerNet(architecture)
    if imagenet_weights is not None:
        load_imagenet_weights(model, imagenet_weights)
    return model


def load_imagenet_weights(model: ScorerNet, path: str | Path) -> None:
    """Copy torchvision's ImageNet weights into the backbone (not the heads; scSE stays freshly initialised).

    torchvision names its files `<arch>-<first hex digits of the sha256>.pth`; that prefix is checked when present.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelPackageError(f"{path}: ImageNet weight file not found")
    match = re.search(r"-([0-9a-f]{6,64})\.pth$", path.name)
    if match:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(match.group(1)):
            raise ModelPackageError(f"{path}: sha256 {digest[:12]}... does not match the prefix {match.group(1)} in its name")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-weight files
        raise ModelPackageError(f"{path}: cannot be read as a torchvision weight file ({error})") from error
    target = model.backbone.state_dict()
    mapped = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        parts = key.split(".")
        if parts[0].startswith("layer") and len(parts) > 2:  # layer1.0.conv1.weight -> layer1.0.block.conv1.weight
            key = ".".join(parts[:2] + ["block"] + parts[2:])
        if key == "conv1.weight" and value.shape[1] != target[key].shape[1]:
            value = value.sum(dim=1, keepdim=True)
        if key not in target or target[key].shape != value.shape:
            raise ModelPackageError(f"{path}: weight {key} does not fit {model.architecture['backbone']}")
        mapped[key] = value
    missing = [k for k in target if k not in mapped and ".scse." not in k and not k.startswith("fc.")]
    if missing:
        raise ModelPackageError(f"{path}: lacks {len(missing)} backbone weights, e.g. {missing[0]}")
    model.backbone.load_state_dict(mapped, strict=False)


def state_dict_fp16(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights for a package: floating tensors as fp16 (half the size), counters kept as they are."""
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in model.state_dict().items()}


def model_from_state(architecture: dict[str, Any], state: dict[str, torch.Tensor]) -> ScorerNet:
    """A float32 network in eval mode from package weights (fp16 or fp32)."""
    model = ScorerNet(architecture)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as error:
        raise ModelPackageError(f"scorer weights do not fit the architecture {architecture}: {error}") from error
    return model.eval()
