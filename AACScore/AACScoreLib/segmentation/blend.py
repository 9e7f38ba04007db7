"""Blend a further-trained segmenter with the package it started from: a weighted mean of their weights.

Why: training a segmenter further on a few families (a short CPU run) teaches it what those show and makes it
forget some of what it held for images from elsewhere. Averaging the weights of the further-trained network with
its base keeps much of both (WiSE-FT, Wortsman et al. 2022): networks trained further from one start lie in one
basin, so the mean of their weights is a network of its own, as fast as either. Where only the new images matter
(a model fine-tuned for one site's cohort) the blend gives part of the gain back, so fine-tuning does not blend.
The new package's manifest records both packages and the weight.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ModelPackageError
from ..packages import package_reference, read_verified, write_package
from .package import CONFIGURATION, DATASET, PLANS, load_segmenter_package, unique_tensors, weights_file


def blend_segmenters(base: str | Path, tuned: str | Path, weight: float, out: str | Path,
                     version: str | None = None, models_dir=None) -> Path:
    """Write a segmenter package at `out` whose weights are (1 - weight) * base + weight * tuned; returns its path.

    Both must be the same network with the same classes and folds (`tuned` trained further from `base`, or both
    from one start); the new package takes `tuned`'s plans, inputs and name. Its metrics are left empty: neither
    package's figures describe the blend."""
    import torch
    from safetensors.torch import save

    if not 0.0 <= weight <= 1.0:
        raise ModelPackageError(f"{out}: the blend weight must lie in [0, 1], not {weight}")
    first, second = load_segmenter_package(base, models_dir), load_segmenter_package(tuned, models_dir)
    manifest = second.package.manifest
    folds = manifest["architecture"]["folds"]
    for what, a, b in (("network", _network(first.plans), _network(second.plans)),
                       ("labels", first.dataset_json.get("labels"), second.dataset_json.get("labels")),
                       ("folds", first.package.manifest["architecture"]["folds"], folds)):
        if a != b:
            raise ModelPackageError(f"{second.package.path}: its {what} differs from {first.package.path}'s; only "
                                    f"packages of one network with one set of classes and folds can be blended")
    dtype = torch.float16 if manifest["architecture"].get("weights_dtype") == "float16" else torch.float32
    files: dict[str, bytes] = {}
    for fold, a, b in zip(folds, first.fold_weights, second.fold_weights):
        mean = {key: ((1.0 - weight) * a[key] + weight * b[key]).to(dtype) if a[key].is_floating_point() else a[key]
                for key in unique_tensors(a)}
        files[weights_file(fold)] = save({key: value.contiguous() for key, value in mean.items()})
    files[PLANS] = read_verified(second.package, PLANS)
    files[DATASET] = read_verified(second.package, DATASET)
    blended = {
        **manifest,
        "version": version or f"{manifest['version']}+blend{round(weight * 100)}",
        "training_data": {**manifest.get("training_data", {}),
                          "blended": {"base": package_reference(first.package),
                                      "tuned": package_reference(second.package), "weight_of_tuned": weight}},
        "metrics": {},
    }
    return write_package(out, blended, files).path


def _network(plans: dict) -> dict:
    """What defines the network and its input in nnU-Net plans; the rest (median shapes, batch size, intensity
    statistics of the training set) may differ between two trainings of one network."""
    configuration = plans["configurations"][CONFIGURATION]
    return {key: configuration.get(key) for key in ("architecture", "patch_size", "normalization_schemes")} | {
        "transpose_forward": plans.get("transpose_forward")}


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "blend-segmenters", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="average a further-trained segmenter's weights with its base's (WiSE-FT)",
        description="Write a segmenter package whose weights are (1 - W) x BASE + W x TUNED: training further "
                    "teaches a segmenter what its new data show and makes it forget some of what it held; the "
                    "blend keeps much of both, at the same speed.")
    parser.add_argument("base", help="the package TUNED started from (name, name==version or path)")
    parser.add_argument("tuned", help="the package trained further (name, name==version or path)")
    parser.add_argument("--weight", type=float, default=0.5, help="W, the share of TUNED")
    parser.add_argument("--version", default=None, help="version of the new package (default: TUNED's +blendW)")
    parser.add_argument("--out", required=True, help="package folder to write")
    parser.set_defaults(func=_blend_command)


def _blend_command(args) -> int:
    print(f"wrote {blend_segmenters(args.base, args.tuned, args.weight, args.out, args.version)}")
    return 0
