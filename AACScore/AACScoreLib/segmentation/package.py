"""Segmenter model packages: convert an nnU-Net v2 results folder or export zip, and load one without pickles.

Why convert: nnU-Net checkpoints are pickles, which can run code when loaded. A package keeps nnU-Net's own
plans.json and dataset.json (they define the network and its preprocessing) beside the weights as safetensors,
with a manifest that pins every file's sha256 (packages.py). The one unpickling read happens here, at
conversion, with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

Researchers bring their own model with `setup_weights.py install RESULTS_FOLDER_OR_ZIP` (packages.py calls
`convert_nnunet_results`) or with `convert_nnunet_results` directly. Their labels must be named L1..L5; labels
named T12 and S1 (the top of the sacrum), when present, are context classes that the level counting uses (the
manifest's `labels` lists every class the model has).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelPackageError
from ..kauppila import CONTEXT_LABELS, VERTEBRAE
from ..io.labelmaps import context_of_segment, vertebra_of_segment
from .dataset import DEFAULT_LONG_SIDE_PX
from ..packages import ModelPackage, find_package, load_safetensors, read_verified, verify_package, write_package

PLANS = "plans.json"
DATASET = "dataset.json"
CONFIGURATION = "2d"


def weights_file(fold: int | str) -> str:
    return f"fold_{fold}.safetensors"


# ---------------------------------------------------------------------------------------------- reading checkpoints


def _find_results_folder(root: Path) -> Path:
    """The folder holding plans.json, dataset.json and fold_*/checkpoint_*.pth (root itself or one below)."""
    candidates = sorted(
        {plans.parent for plans in root.rglob(PLANS)
         if (plans.parent / DATASET).is_file() and any(plans.parent.glob("fold_*/checkpoint_*.pth"))}
    )
    configured = [path for path in candidates if path.name.endswith(f"__{CONFIGURATION}")] or candidates
    if not configured:
        raise ModelPackageError(f"{root}: no nnU-Net results folder (plans.json, dataset.json, fold_*/checkpoint_*.pth)")
    if len(configured) > 1:
        raise ModelPackageError(f"{root}: several nnU-Net results folders ({', '.join(map(str, configured))}); give one")
    return configured[0]


def read_checkpoint(path: str | Path) -> dict:
    """An nnU-Net checkpoint read without running pickled code (numpy scalars in its log are allowlisted)."""
    import numpy as np
    import torch

    safe = [np.dtype, np.ndarray, type(np.dtype(np.float32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
        safe += [scalar, _reconstruct]
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
        safe += [scalar, _reconstruct]
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler raises many types; all mean "refused or unreadable"
        raise ModelPackageError(f"{path}: cannot be read as a plain nnU-Net checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelPackageError(f"{path}: has no 'network_weights'; not an nnU-Net checkpoint")
    return checkpoint


def label_values(manifest: dict) -> dict[str, int]:
    """{'L1': network output index, ...} of a segmenter package (L1..L5 = 1..5 for packages from before context)."""
    return manifest.get("label_values") or {name: i + 1 for i, name in enumerate(VERTEBRAE)}


def context_classes(manifest: dict) -> tuple[str, ...]:
    """The context classes (T12, S1) a segmenter package has, in CONTEXT_LABELS order; () for L1..L5 only."""
    values = label_values(manifest)
    return tuple(name for name in CONTEXT_LABELS if name in values)


def _labels_by_level(dataset_json: dict, where: Path) -> dict[str, int]:
    """{'L1': network output index, ..., 'T12': ..., 'S1': ...} from dataset.json label names, matched by name
    (the context classes T12 and S1 only when the model has them)."""
    found: dict[str, int] = {}
    for name, value in dataset_json.get("labels", {}).items():
        level = vertebra_of_segment(name) or context_of_segment(name)
        if level is not None and isinstance(value, int):
            found[level] = value
    missing = [level for level in VERTEBRAE if level not in found]
    if missing:
        raise ModelPackageError(
            f"{where}: dataset.json labels {list(dataset_json.get('labels', {}))} name no {', '.join(missing)}; "
            f"a segmenter must label L1..L5 (names like 'L1' or 'L1 vertebra')"
        )
    return found


def _last_logged(logging: Any, key: str) -> Any:
    values = logging.get(key) if isinstance(logging, dict) else None
    if not values:
        return None
    value = values[-1]
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


# ---------------------------------------------------------------------------------------------- conversion


def convert_nnunet_results(
    source: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1.0",
    folds: list[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    fp16: bool = True,
    input_settings: dict | None = None,
    training_data: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Convert an nnU-Net v2 2d results folder (or nnU-Net's export zip) into a segmenter package at `out_dir`.

    `input_settings` overrides how images reach the network (see `default_input_settings`); for models from
    AACScore's own training it says the working spacing and intensity window the dataset was exported with.
    """
    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="aacscore-convert-") as scratch:
        if source.is_file():
            try:
                with zipfile.ZipFile(source) as archive:
                    archive.extractall(scratch)
            except zipfile.BadZipFile:
                raise ModelPackageError(f"{source}: neither an nnU-Net results folder nor a zip") from None
            root = Path(scratch)
        elif source.is_dir():
            root = source
        else:
            raise ModelPackageError(f"{source}: no such folder or zip")
        results = _find_results_folder(root)
        return _convert_folder(results, Path(out_dir), name=name, version=version, folds=folds,
                               checkpoint=checkpoint, fp16=fp16, input_settings=input_settings,
                               training_data=training_data, metrics=metrics)


def default_input_settings(plans: dict) -> dict:
    """How an imported model's images are prepared: nnU-Net's own spacing, raw intensities (no window).

    A model trained on PNGs (NaturalImage2DIO) has no millimetre spacing: images are then scaled to a fixed
    long side, which the user should override with the size the model was trained at.
    """
    spacing = plans["configurations"][CONFIGURATION]["spacing"]
    physical = plans.get("image_reader_writer") != "NaturalImage2DIO"
    return {
        "working_spacing_mm": [float(v) for v in spacing] if physical else None,
        "default_long_side_px": DEFAULT_LONG_SIDE_PX,
        "window_percentiles": None,
    }


def _convert_folder(results: Path, out_dir: Path, *, name, version, folds, checkpoint, fp16, input_settings,
                    training_data, metrics) -> Path:
    import torch
    from safetensors.torch import load, save

    plans = json.loads((results / PLANS).read_text(encoding="utf-8"))
    dataset_json = json.loads((results / DATASET).read_text(encoding="utf-8"))
    if CONFIGURATION not in plans.get("configurations", {}):
        raise ModelPackageError(f"{results}: plans.json has no '{CONFIGURATION}' configuration; only 2D models apply")
    label_values = _labels_by_level(dataset_json, results)
    if folds is None:
        folds = sorted((path.name[len("fold_"):] for path in results.glob("fold_*")
                        if (path / checkpoint).is_file()), key=str)
    if not folds:
        raise ModelPackageError(f"{results}: no fold_*/{checkpoint}")

    files: dict[str, bytes] = {}
    first = None
    for fold in folds:
        path = results / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ModelPackageError(f"{path}: missing")
        loaded = read_checkpoint(path)
        if loaded.get("init_args", {}).get("configuration", CONFIGURATION) != CONFIGURATION:
            raise ModelPackageError(f"{path}: trained with configuration {loaded['init_args']['configuration']!r}, "
                                    f"not '{CONFIGURATION}'")
        dtype = torch.float16 if fp16 else torch.float32
        weights = {key: (value.to(dtype) if value.is_floating_point() else value).contiguous().clone()
                   for key, value in unique_tensors(loaded["network_weights"]).items()}
        files[weights_file(fold)] = save(weights)
        first = first or loaded
    network = build_network(plans, dataset_json)
    n_parameters = sum(p.numel() for p in network.parameters())
    _load_weights(network, float32_weights(load(files[weights_file(folds[0])])), results)

    mirror = first.get("inference_allowed_mirroring_axes")
    logging = first.get("logging", {})
    summary = {
        "source": results.name,
        "dataset": plans.get("dataset_name"),
        "epochs": first.get("current_epoch"),
        "last_train_loss": _last_logged(logging, "train_losses"),
        "last_pseudo_dice": _last_logged(logging, "dice_per_class_or_region"),
        **(training_data or {}),
    }
    configuration = plans["configurations"][CONFIGURATION]
    manifest = {
        "name": name or f"{plans.get('dataset_name', 'nnunet')}-{results.name.split('__')[0]}".replace("_", "-"),
        "version": version,
        "kind": "segmenter",
        "architecture": {
            "framework": "nnU-Net v2",
            "trainer": first.get("trainer_name"),
            "plans": plans.get("plans_name"),
            "configuration": CONFIGURATION,
            "folds": [str(fold) for fold in folds],
            "network_class": configuration.get("architecture", {}).get("network_class_name"),
            "n_stages": configuration.get("architecture", {}).get("arch_kwargs", {}).get("n_stages"),
            "features_per_stage": configuration.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage"),
            "patch_size": configuration.get("patch_size"),
            "parameters": n_parameters,
            "weights_dtype": "float16" if fp16 else "float32",
        },
        "input": {
            **default_input_settings(plans),
            **(input_settings or {}),
            "mirror_axes": list(mirror) if mirror is not None else [],
        },
        "labels": list(label_values),
        "label_values": label_values,
        "training_data": summary,
        "metrics": metrics or {},
    }
    files[PLANS] = (results / PLANS).read_bytes()
    files[DATASET] = (results / DATASET).read_bytes()
    package = write_package(out_dir, manifest, files)
    return package.path


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedSegmenter:
    """What the predictor needs, read from a verified package: no pickles anywhere."""

    package: ModelPackage
    plans: dict
    dataset_json: dict
    network: Any  # torch.nn.Module built from the plans, first fold's weights loaded
    fold_weights: list[dict]  # one float32 state dict per fold


def build_network(plans: dict, dataset_json: dict):
    """nnU-Net's own network for the plans' 2d configuration (what nnUNetTrainer.build_network_architecture does)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    n_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
    n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(plans_manager, configuration, n_inputs, n_outputs,
                                                   enable_deep_supervision=False)


def _storage_groups(state: dict) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    return groups


def unique_tensors(state: dict) -> dict:
    """The state dict without aliases: nnU-Net's U-Net reaches each weight under up to four names."""
    return {keys[0]: state[keys[0]] for keys in _storage_groups(state).values()}


def float32_weights(state: dict) -> dict:
    """Stored (fp16) weights as float32, the dtype the network runs in; integer buffers as they are."""
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def _load_weights(network, weights: dict, where) -> dict:
    """Load alias-free weights into `network`; return its full state dict (every alias) for nnUNetPredictor."""
    full = {}
    for keys in _storage_groups(network.state_dict()).values():
        given = [key for key in keys if key in weights]
        if not given:
            raise ModelPackageError(f"{where}: weights lack {keys[0]}; they do not fit the network the plans "
                                    f"describe (a custom trainer architecture?)")
        full.update({key: weights[given[0]] for key in keys})
    unexpected = sorted(set(weights) - set(full))
    if unexpected:
        raise ModelPackageError(f"{where}: weights hold {unexpected[0]}, which the plans' network lacks")
    try:
        network.load_state_dict(full, strict=True)
    except RuntimeError as error:
        raise ModelPackageError(
            f"{where}: weights do not fit the network the plans describe: {str(error).splitlines()[0]}"
        ) from None
    return full


def transfer_weights(network, weights: dict, where) -> list[str]:
    """Start `network` from a package's weights, by nnU-Net's pretrained-weights rule: every weight must fit by
    name and shape, except the segmentation output layers when the class count differs (nnU-Net's own loader
    does the same, but unpickles a checkpoint; this reads the package's safetensors).

    Beyond nnU-Net: when classes were appended or dropped at the end (L1..L5, then T12 and S1), the output rows
    of the classes both have keep the base's weights, so the network starts as the base for those and learns only
    the new rows. Returns the names of the output layers left wholly or partly fresh."""
    state = network.state_dict()
    fresh = []
    for keys in _storage_groups(state).values():
        given = next((key for key in keys if key in weights), None)
        shape_fits = given is not None and tuple(weights[given].shape) == tuple(state[keys[0]].shape)
        if not shape_fits:
            if ".seg_layers." in keys[0]:
                fresh.append(keys[0])
                if given is not None and _same_but_class_count(weights[given].shape, state[keys[0]].shape):
                    value = state[keys[0]].clone()
                    shared = min(weights[given].shape[0], value.shape[0])
                    value[:shared] = weights[given][:shared].to(value.dtype)
                    for key in keys:
                        state[key] = value
                continue
            raise ModelPackageError(f"{where}: weight {keys[0]} does not fit the network being trained "
                                    f"(another architecture?); fine-tune with the base package's plans")
        value = weights[given].to(state[keys[0]].dtype)
        for key in keys:
            state[key] = value
    network.load_state_dict(state, strict=True)
    return fresh


def _same_but_class_count(base_shape, new_shape) -> bool:
    return len(base_shape) == len(new_shape) and tuple(base_shape[1:]) == tuple(new_shape[1:])


def load_segmenter_package(package: str | Path | ModelPackage | None = None, models_dir=None) -> LoadedSegmenter:
    """Verify a segmenter package (every file's sha256) and build its network with the first fold's weights."""
    if not isinstance(package, ModelPackage):
        package = find_package(package, "segmenter", models_dir)
    package = verify_package(package.path)
    if package.kind != "segmenter":
        raise ModelPackageError(f"{package.path}: is a {package.kind} package, not a segmenter")
    plans = json.loads(read_verified(package, PLANS))
    dataset_json = json.loads(read_verified(package, DATASET))
    folds = package.manifest["architecture"].get("folds") or []
    if not folds:
        raise ModelPackageError(f"{package.path}: manifest architecture lists no folds")
    network = build_network(plans, dataset_json)
    fold_weights = []
    for fold in reversed(folds):  # the first fold is loaded last, so the network holds it
        weights = float32_weights(load_safetensors(package, weights_file(fold)))
        fold_weights.insert(0, _load_weights(network, weights, package.path))
    network.eval()
    return LoadedSegmenter(package, plans, dataset_json, network, fold_weights)
