"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_scorer_package(tmp_path_factory):
    """A real scorer package (ResNet-18 at 64x32, untrained, fixed seed): its ModelPackage."""
    import torch

    from AACScoreLib.scoring.model import build_model
    from AACScoreLib.scoring.training import TrainResult, TrainSettings, build_manifest, write_scorer_package

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than two on a machine whose cores are shared
    settings = TrainSettings(input_size=(64, 32), backbone="resnet18", subscores_head=True)
    torch.manual_seed(0)
    model = build_model(settings.architecture()).eval()
    manifest = build_manifest(model, settings, TrainResult(0, 0, 0, None, 0.0, "cpu"), {"source": "none"}, {},
                              "tiny-scorer", "0.0")
    yield write_scorer_package(tmp_path_factory.mktemp("models") / "tiny-scorer", model, manifest)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_scorer(tiny_scorer_package):
    """The tiny scorer package loaded as the product loads it."""
    from AACScoreLib.scoring.scorer import Scorer

    return Scorer.from_package(tiny_scorer_package.path)
