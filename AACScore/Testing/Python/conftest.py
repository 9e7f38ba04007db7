"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_scorer(tmp_path_factory):
    """A real scorer package (ResNet-18 at 64x32, untrained, fixed seed), loaded as the product loads it."""
    import torch

    from AACScoreLib.scoring.scorer import Scorer
    from AACScoreLib.scoring.model import build_model
    from AACScoreLib.scoring.training import TrainResult, TrainSettings, build_manifest, write_scorer_package

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than two on a machine whose cores are shared
    settings = TrainSettings(input_size=(64, 32), backbone="resnet18", subscores_head=True)
    torch.manual_seed(0)
    model = build_model(settings.architecture()).eval()
    manifest = build_manifest(model, settings, TrainResult(0, 0, 0, None, 0.0, "cpu"), {"source": "none"}, {},
                              "tiny-scorer", "0.0")
    package = write_scorer_package(tmp_path_factory.mktemp("models") / "tiny-scorer", model, manifest)
    yield Scorer.from_package(package.path)
    torch.set_num_threads(threads)
