"""L1–L5 segmentation of a radiograph with an nnU-Net v2 2D model, in process, on arrays.

Why not nnU-Net's file-based prediction: it resamples the full-size image and writes files. Vertebrae are
large, so the image is shrunk once to the model's coarse working grid (area averaging), windowed and
normalised as in training, and run through nnUNetPredictor's sliding window as one tile covering the whole
working image (mirroring off by default: 2x faster). Only the small logits are interpolated back (bilinear),
and only inside the spine's bounding box.

When the image carries no pixel spacing (a PNG or JPEG export), the working grid first assumes a typical field
of view; if the vertebral bodies the network finds there are far from a lumbar body's typical size, the network
runs again (at most twice) on a grid rescaled to make them typical: the spine is its own ruler. If it finds no
body to measure, only pieces of at most a body and a half, the view is wider than assumed (a full spine, a padded
export), and it looks again at a view twice as wide before measuring. A spacing the
file states is kept unless the bodies come out half as large again as typical, or smaller by as much (a wrong
tag: no adult's lumbar bodies are that far from typical); then it is doubted the same way, and said. An image whose
PatientOrientation has the feet elsewhere than at the bottom is turned upright for the network, which was
trained on upright images, and its labels turned back. One whose tag does not say which way up it is (or that
has none) is shown to the upright check (segmentation/upright.py), and turned the same way when the check is sure
it is stored turned; a turned result is always one to look at.

Levels are counted from landmarks, as readers do (segmentation/levels.py): the vertebral bodies are the
connected pieces of the network's foreground; counted from S1 (or the body most like L5) below and from T12 (or
the body most like L1) above, and the two counts compared. A doubtful count turns the status to "warning". If
counting leaves a vertebra missing, the network's own per-pixel levels are used instead. Post-processing keeps
the largest connected piece of each vertebra, checks that labels increase down the spine (principal axis of
the centroids), and reports a missing vertebra (status "error") or one about twice the others' height, i.e.
two vertebrae merged (status "warning").
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..devices import resolve_device
from ..errors import AACScoreError, Cancelled
from ..geometry import polarity
from ..geometry.orientation import says_which_way_up, upright_turns
from ..kauppila import CONTEXT_LABELS, VERTEBRAE
from .dataset import resample_image, to_working_image, working_shape
from .levels import LevelAssignment, count_levels, flag_doubtful, pixel_assignment, spine_axis
from .upright import TURN_NAMES, UprightCheck
from ..io.radiograph import Radiograph

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]

MERGED_HEIGHT_RATIO = 1.7  # a vertebra this many times the median height is taken for two merged
JOINED_SHARE = 0.2  # a full-size piece with this share of its pixels on a second level holds two bodies
BOX_MARGIN_PX = 3  # working pixels kept around the spine when mapping back to full size
TYPICAL_BODY_MM = 31.0  # side of a square of a lumbar body's lateral area: 30-33 mm over the phantom families
MAX_RESCALES = 2  # off its scale the network draws bodies nearer its training size, so one step can fall short
RESCALE_BEYOND = 0.10  # unknown spacing: the grid is rescaled when the bodies are this far (relative) from typical
SPACING_DISAGREES = 0.5  # a known spacing is doubted when the bodies come out 1.5 times typical or 1/1.5 of it
MIN_BODIES_FOR_SCALE = 3  # vertebrae the network must find before their size sets the scale
MIN_BODY_SHARE = 0.2  # pieces smaller than this share of the largest are specks, not bodies
WIDER_VIEW = 2.0  # unknown spacing, bodies too small to find: the view is taken this much wider (full spine, padded)
WIDER_IF_LARGEST_UNDER = 1.5  # ... when even the largest piece is under this many typical bodies (2: joined ones)
TURN_IF_SURE = 0.9  # an untagged image is segmented turned when the upright check gives its turn this probability


@dataclass
class SegmentationResult:
    labels: np.ndarray  # uint8 (H, W) at the image's size: 0 background, 1..5 = L1..L5
    status: str  # "ok" | "warning" | "error"
    message: str
    spacing_assumed: bool = False
    seconds: float = 0.0
    context: np.ndarray | None = None  # uint8 (H, W): 6 = T12, 7 = S1; None for a model without context classes
    levels: LevelAssignment | None = None  # how L1..L5 were counted (None when no body was found)
    working_shape: tuple[int, int] | None = None  # the grid the network last ran on, upright: QC looks again there
    turns: int = 0  # quarter turns (numpy.rot90's k) that made the image upright for the network
    bone_contrast: float | None = None  # of the image as stored (geometry/polarity.py): below the margin, inverted


# ---------------------------------------------------------------------------------------------- post-processing


def _largest_components(labels: np.ndarray, values: Sequence[int] = range(1, len(VERTEBRAE) + 1)) -> np.ndarray:
    from scipy import ndimage

    out = np.zeros_like(labels)
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        pieces, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if count > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            mask = pieces == (int(np.argmax(sizes)) + 1)
        out[mask] = value
    return out


def postprocess_labels(labels: np.ndarray) -> tuple[np.ndarray, str, str]:
    """(labels, status, message): largest piece per vertebra, anatomical order, missing/merged checks."""
    labels = _largest_components(labels)
    present = [v for v in range(1, len(VERTEBRAE) + 1) if (labels == v).any()]
    notes, status = [], "ok"
    if not present:
        return labels, "error", "no vertebra found"
    coords = {v: np.argwhere(labels == v).astype(np.float64) for v in present}
    centroids = np.array([coords[v].mean(axis=0) for v in present])
    if len(present) >= 2:
        axis = spine_axis(centroids, np.array(present, dtype=float))  # the way the model's own labels increase
        order = [present[i] for i in np.argsort((centroids - centroids.mean(axis=0)) @ axis)]
        if order != present:
            relabelled = np.zeros_like(labels)
            for old, new in zip(order, present):
                relabelled[labels == old] = new
            labels = relabelled
            coords = {new: coords[old] for old, new in zip(order, present)}
            notes.append("labels re-assigned in anatomical order down the spine")
        heights = {v: np.ptp(coords[v] @ axis) + 1 for v in present}
        median = float(np.median(list(heights.values())))
        merged = [VERTEBRAE[v - 1] for v in present if len(present) >= 3 and heights[v] > MERGED_HEIGHT_RATIO * median]
        if merged:
            status = "warning"
            notes.append(f"{', '.join(merged)} is about twice the height of the others: two vertebrae may be merged")
    missing = [VERTEBRAE[v - 1] for v in range(1, len(VERTEBRAE) + 1) if v not in present]
    if missing:
        status = "error"
        notes.insert(0, f"{', '.join(missing)} not found")
    return labels, status, "; ".join(notes)


def levels_at_full_size(foreground: np.ndarray, levels: np.ndarray, box: tuple[int, int, int, int],
                        full_shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Full-size labels inside `box`: each connected piece of `foreground` takes the working-grid level that
    most of its pixels fall on (pieces on no level are dropped), unless a fifth or more of it falls on a second
    level: then it joins two bodies, and each of its pixels takes the nearest level. Returns (labels, how many
    pieces were parted so)."""
    from scipy import ndimage

    pieces, count = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    (h, w), (H, W), (R0, R1, C0, C1) = levels.shape, full_shape, box
    rows = np.minimum(((np.arange(R0, R1) + 0.5) * h / H).astype(int), h - 1)
    cols = np.minimum(((np.arange(C0, C1) + 0.5) * w / W).astype(int), w - 1)
    coarse = levels[np.ix_(rows, cols)]
    votes = np.bincount((pieces * 8 + coarse).ravel(), minlength=(count + 1) * 8).reshape(count + 1, 8)
    votes[:, 0] = 0
    choice = np.where(votes.max(axis=1) > 0, votes.argmax(axis=1), 0).astype(np.uint8)
    choice[0] = 0
    full = choice[pieces]
    runner_up = np.sort(votes, axis=1)[:, -2]
    joined = np.flatnonzero((runner_up > 0) & (runner_up >= JOINED_SHARE * votes.sum(axis=1)))
    joined = joined[joined > 0]  # piece 0 is the background
    if joined.size:  # a piece over two levels (bodies joined across a disc): each pixel takes the nearest level
        nearest = ndimage.distance_transform_edt(coarse == 0, return_distances=False, return_indices=True)
        inside = np.isin(pieces, joined)
        full[inside] = coarse[tuple(nearest)][inside]
    return full, int(joined.size)


# ---------------------------------------------------------------------------------------------- segmenter


class Segmenter:
    """An nnU-Net 2D vertebra model loaded from a package, ready to segment radiographs in process."""

    def __init__(self, loaded, device, use_mirroring: bool = False, whole_image: bool = True,
                 count_by_bodies: bool = True, upright: "UprightCheck | None" = None):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from .package import CONFIGURATION, context_classes, label_values

        self.package = loaded.package
        self.manifest = loaded.package.manifest
        self.identity = loaded.package.identity
        settings = self.manifest["input"]
        self.working_spacing = settings.get("working_spacing_mm")
        self.default_long_side = settings.get("default_long_side_px")
        self.window = settings.get("window_percentiles")
        mirror_axes = tuple(settings.get("mirror_axes") or ()) or None
        plans_manager = PlansManager(loaded.plans)
        self.configuration = plans_manager.get_configuration(CONFIGURATION)
        self.transpose_forward = plans_manager.transpose_forward
        self.intensity_properties = plans_manager.foreground_intensity_properties_per_channel
        self.device = device
        self.whole_image = whole_image
        self.count_by_bodies = count_by_bodies
        self.upright = upright  # tells the turn of an image whose PatientOrientation does not (None: taken upright)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice whenever the device is the CPU
            self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                             perform_everything_on_device=device.type == "cuda", device=device,
                                             verbose=False, allow_tqdm=False)
        self.predictor.manual_initialization(loaded.network.to(device), plans_manager, self.configuration,
                                             loaded.fold_weights, loaded.dataset_json,
                                             self.manifest["architecture"].get("trainer") or "nnUNetTrainer",
                                             mirror_axes)
        values = label_values(self.manifest)
        context = context_classes(self.manifest)
        self.classes = VERTEBRAE + context  # the channels after background, as `ordered_channels` orders them
        self.channel_of_class = [int(values[name]) for name in self.classes]
        # label value of each reordered channel: 0, 1..5 = L1..L5, then 6 = T12 / 7 = S1 for those the model has
        self.value_of_channel = np.array([0, *range(1, len(VERTEBRAE) + 1), *(CONTEXT_LABELS[n] for n in context)],
                                         np.uint8)

    @classmethod
    def from_package(cls, package=None, device: str = "auto", use_mirroring: bool = False,
                     whole_image: bool = True, count_by_bodies: bool = True, models_dir=None,
                     upright: str | None = "auto") -> "Segmenter":
        """Load a segmenter package (path, name, ModelPackage, or None for the newest installed/bundled), with the
        upright check `upright` names: "auto" for the newest installed/bundled upright package if there is one,
        a name or path for that one, None for none (untagged images are then taken as upright)."""
        from ..packages import list_packages
        from .package import load_segmenter_package

        check = None
        if upright == "auto" and any(found.kind == "upright" for found in list_packages(models_dir)):
            check = UprightCheck.from_package(None, device, models_dir)
        elif upright not in (None, "auto"):
            check = UprightCheck.from_package(upright, device, models_dir)
        return cls(load_segmenter_package(package, models_dir), resolve_device(device), use_mirroring, whole_image,
                   count_by_bodies, check)

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        import nnunetv2.preprocessing.normalization.default_normalization_schemes as schemes

        scheme = getattr(schemes, self.configuration.normalization_schemes[0], None)
        if scheme is None:
            raise AACScoreError(f"{self.package.path}: unsupported normalization "
                                f"{self.configuration.normalization_schemes[0]}")
        normaliser = scheme(use_mask_for_norm=False, intensityproperties=self.intensity_properties.get("0", {}))
        return normaliser.run(image.astype(np.float32)).astype(np.float32)

    def predict_logits(self, image: np.ndarray):
        """Network logits (channels, h, w) for an image already on the working grid."""
        import torch

        if self.transpose_forward[0] != 0:
            raise AACScoreError(f"{self.package.path}: plans transpose the slice axis; not a 2D model")
        axes = [a - 1 for a in self.transpose_forward[1:]]
        data = np.ascontiguousarray(self._normalise(image).transpose(axes))[None, None]  # (c, slice, h, w)
        self.predictor.configuration_manager = self._tiling(data.shape[2:])
        logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))[:, 0]
        return logits.float().permute(0, *[1 + a for a in np.argsort(axes)])

    def _tiling(self, shape: tuple[int, int]):
        """The configuration the sliding window uses: one tile covering the whole working image when it is at
        most three times the training patch (one pass instead of four overlapping ones), else the training patch.
        The tile is never smaller than the patch: a tiny image would leave the deepest stages one pixel wide."""
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

        if not self.whole_image:
            return self.configuration
        divisor = np.prod(np.array(self.configuration.pool_op_kernel_sizes), axis=0)
        tile = [int(np.ceil(size / d) * d) for size, d in zip(shape, divisor)]
        tile = [max(t, p) for t, p in zip(tile, self.configuration.patch_size)]  # small images are padded
        if np.prod(tile) > 3 * np.prod(self.configuration.patch_size):
            return self.configuration
        return ConfigurationManager({**self.configuration.configuration, "patch_size": tile})

    def segment(self, radiograph: Radiograph, progress: Progress | None = None,
                cancel: Cancel | None = None) -> SegmentationResult:
        """Label L1..L5 (and T12/S1 context, for a model with those classes) on the radiograph's own pixel grid,
        with how the levels were counted; raises Cancelled when `cancel()` turns True. An image whose
        PatientOrientation does not say which way up it is is looked at by the upright check (when the segmenter
        has one), and segmented turned when that is sure the image is turned. One whose vertebrae come out darker
        than the tissue around them is segmented again inverted, as the network was trained (bone bright)."""
        started = time.perf_counter()

        def step(fraction: float, text: str) -> None:
            if cancel is not None and cancel():
                raise Cancelled(f"{radiograph.path}: segmentation cancelled")
            if progress is not None:
                progress(fraction, text)

        result = self._segment_turned(radiograph, step, started)
        contrast = polarity.bone_contrast(radiograph.pixels, result.labels)
        if contrast >= polarity.CLEARLY_INVERTED:
            return replace(result, bone_contrast=contrast)
        bright = self._segment_turned(replace(radiograph, pixels=polarity.inverted(radiograph.pixels)), step, started)
        note = f"bone dark as stored (bone contrast {contrast:+.2f}): segmented inverted"
        return replace(bright, status="warning" if bright.status == "ok" else bright.status,
                       message="; ".join(filter(None, (note, bright.message))), bone_contrast=contrast)

    def _segment_turned(self, radiograph: Radiograph, step: Callable[[float, str], None],
                        started: float) -> SegmentationResult:
        """`segment` with the turn found by `turns_to_upright`, the grey values as stored."""
        turns, why = self.turns_to_upright(radiograph)
        if not turns:
            return self._segment_upright(radiograph, step, started)
        result = self._segment_upright(turned(radiograph, turns), step, started)  # labels turned back below
        if result.status != "error" or says_which_way_up(radiograph.patient_orientation):
            return _turned_back(result, turns, why)
        as_stored = self._segment_upright(radiograph, step, started)  # the check doubted this way up: never "ok"
        return replace(as_stored, status="warning" if as_stored.status == "ok" else as_stored.status,
                       message="; ".join(filter(None, (as_stored.message, f"segmented as stored: {why}, but turned "
                                                       f"upright it gave {result.message}"))))

    def turns_to_upright(self, radiograph: Radiograph) -> tuple[int, str]:
        """(quarter turns, numpy.rot90's k, that make the radiograph upright for the network; why), (0, "") when it
        is taken as stored: from PatientOrientation when the tag says which way up it is, else from the upright
        check when that is sure (QC's second look asks the same for a user's label map)."""
        tag = radiograph.patient_orientation
        turns = upright_turns(tag)
        if turns:
            return turns, "PatientOrientation " + "\\".join(tag) + ": feet not at the bottom"
        if self.upright is not None and not says_which_way_up(tag):
            guess = self.upright.guess(radiograph.pixels)
            if guess.turns and guess.probability >= TURN_IF_SURE:
                return ((len(TURN_NAMES) - guess.turns) % len(TURN_NAMES),
                        f"no PatientOrientation, and the upright check sees the image {TURN_NAMES[guess.turns]}, "
                        f"p {guess.probability:.2f}")
        return 0, ""

    def _segment_upright(self, radiograph: Radiograph, step: Callable[[float, str], None],
                         started: float) -> SegmentationResult:
        """`segment` of a radiograph taken as upright (feet at the bottom)."""
        import torch

        step(0.0, "resampling to the model's working grid")
        full_shape = radiograph.pixels.shape
        shape, assumed = working_shape(full_shape, radiograph.spacing, self.working_spacing, self.default_long_side)
        step(0.2, "running the network")
        channels = self._channels(radiograph, shape)
        scaled = False
        if assumed and self.working_spacing is not None and view_wider_than_assumed(
                channel_argmax(channels) > 0, float(np.max(self.working_spacing))):
            step(0.3, "no vertebral bodies at the assumed field of view: looking at it as a wider one")
            wider_shape = (max(8, round(shape[0] * WIDER_VIEW)), max(8, round(shape[1] * WIDER_VIEW)))
            wider = self._channels(radiograph, wider_shape)
            if self._body_scale(wider) is not None:
                shape, channels, scaled = wider_shape, wider, True
        for _ in range(MAX_RESCALES if self.working_spacing is not None else 0):
            factor = self._body_scale(channels)
            beyond = RESCALE_BEYOND if assumed or scaled else SPACING_DISAGREES
            if factor is None or abs(np.log(factor)) <= np.log1p(beyond):
                break
            shape, scaled = (max(8, round(shape[0] * factor)), max(8, round(shape[1] * factor))), True
            step(0.45, "running the network again at the scale the vertebral bodies imply")
            channels = self._channels(radiograph, shape)
        step(0.7, "mapping labels back to full size")
        probabilities = torch.softmax(channels, 0).numpy()
        if self.count_by_bodies:
            levels, assignment = count_levels(probabilities, self.classes)
            labels, context, status, message, parted = self._full_size(channels, levels, full_shape, True)
            if parted and assignment is not None and not assignment.parted:  # joined only at full resolution
                assignment = assignment.with_parted(parted)
        if not self.count_by_bodies or status == "error":  # the network's own level for every pixel
            step(0.85, "labelling with the network's own levels")
            levels = self.value_of_channel[channel_argmax(channels)]
            retry = self._full_size(channels, levels, full_shape, by_pieces=False)
            if not self.count_by_bodies or retry[2] != "error":
                (labels, context, status, message, _), assignment = retry, pixel_assignment(probabilities)
        status, message = flag_doubtful(status, message, assignment)
        if (assumed or scaled) and self.working_spacing is not None:
            mm_per_pixel = float(np.max(self.working_spacing)) * shape[0] / full_shape[0]
            if not assumed:
                note = (f"pixel spacing {radiograph.spacing[0]:.3f} mm ({radiograph.spacing_source}) disagrees with "
                        f"the size of the vertebral bodies: segmented at {mm_per_pixel:.3f} mm per pixel")
            else:
                note = (f"pixel spacing unknown: took {mm_per_pixel:.3f} mm per pixel, " + (
                    "from the size of the vertebral bodies" if scaled else
                    f"the long side taken as {max(shape) * np.max(self.working_spacing):.0f} mm"))
            message = f"{message}; {note}" if message else note
        step(1.0, "done")
        return SegmentationResult(labels, status, message, assumed, time.perf_counter() - started,
                                  context if len(self.classes) > len(VERTEBRAE) else None, assignment, shape)

    def _channels(self, radiograph: Radiograph, shape: tuple[int, int]):
        """The network's logits for the radiograph resampled to a working grid of `shape`, as background, then
        `self.classes`."""
        return self.ordered_channels(self.predict_logits(to_working_image(radiograph, shape, self.window)))

    def _body_scale(self, channels) -> float | None:
        """`body_scale` of the network's foreground in working-grid `channels`."""
        return body_scale(channel_argmax(channels) > 0, float(np.max(self.working_spacing)))

    def ordered_channels(self, logits):
        """Logits reordered as background, then `self.classes` (an imported model may number its labels otherwise)."""
        import torch

        return torch.stack([logits[0]] + [logits[c] for c in self.channel_of_class])

    def _full_size(self, channels, levels: np.ndarray, full_shape: tuple[int, int], by_pieces: bool):
        """(L1..L5 labels, T12/S1 context labels, status, message, pieces parted) at full size from working-grid
        `levels` (label values), post-processed inside their box.

        by_pieces=False: the argmax of the interpolated logits; True: foreground pieces take `levels` by majority.
        """
        labels, context = np.zeros(full_shape, np.uint8), np.zeros(full_shape, np.uint8)
        box = _box(levels, full_shape)
        if box is None:
            return labels, context, "error", "no vertebra found", 0
        inside, parted = self.value_of_channel[self._labels_in_box(channels, full_shape, box)], 0
        if by_pieces:
            inside, parted = levels_at_full_size(inside > 0, levels, box, full_shape)
        rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
        if len(self.classes) > len(VERTEBRAE):
            lumbar = np.where(inside <= len(VERTEBRAE), inside, 0).astype(np.uint8)
            context[rows, cols] = _largest_components(inside - lumbar, CONTEXT_LABELS.values())
            inside = lumbar
        labels[rows, cols], status, message = postprocess_labels(inside)
        return labels, context, status, message, parted

    def _labels_in_box(self, channels, full_shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
        """Argmax channel of the reordered logits bilinearly interpolated to full-size pixel centres in `box`."""
        import torch
        import torch.nn.functional as F

        (H, W), (R0, R1, C0, C1) = full_shape, box
        # align_corners=False sampling: full-size pixel centre y maps to normalised (y + 0.5) / H * 2 - 1
        ys = (torch.arange(R0, R1, dtype=torch.float32) + 0.5) / H * 2 - 1
        xs = (torch.arange(C0, C1, dtype=torch.float32) + 0.5) / W * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        sampled = F.grid_sample(channels[None].float().cpu(), grid, mode="bilinear",
                                padding_mode="border", align_corners=False)
        return channel_argmax(sampled[0])


def channel_argmax(scores) -> np.ndarray:
    """Per pixel, the index of the largest of (channels, h, w) scores (a torch tensor), as uint8; the first on
    ties, as argmax. Why not torch's argmax over the first dimension: on the CPU it strides across memory and took
    six times as long on a full-size box (0.56 s against 0.09 s for 8 x 2200 x 1400)."""
    import torch

    best, index = scores[0].clone(), torch.zeros(scores.shape[1:], dtype=torch.uint8)
    for channel in range(1, scores.shape[0]):
        index[scores[channel] > best] = channel
        best = torch.maximum(best, scores[channel])
    return index.numpy()


def _turned_back(result: SegmentationResult, turns: int, why: str) -> SegmentationResult:
    """A result on an image turned by `turns` quarter turns, its labels turned back to the image as stored and
    its message saying so (a turned image is one to look at)."""
    turn = {1: "90 degrees anticlockwise", 2: "180 degrees", 3: "90 degrees clockwise"}[turns]
    note = f"turned {turn} for the network ({why})"
    return replace(result, labels=np.ascontiguousarray(np.rot90(result.labels, -turns)),
                   context=None if result.context is None else np.ascontiguousarray(np.rot90(result.context, -turns)),
                   message=f"{result.message}; {note}" if result.message else note, turns=turns,
                   status="warning" if result.status == "ok" else result.status)


def turned(radiograph: Radiograph, turns: int) -> Radiograph:
    """The radiograph turned by `turns` quarter turns (numpy.rot90), its spacing following; upright, so untagged."""
    spacing = radiograph.spacing[::-1] if radiograph.spacing is not None and turns % 2 else radiograph.spacing
    return replace(radiograph, pixels=np.ascontiguousarray(np.rot90(radiograph.pixels, turns)), spacing=spacing,
                   patient_orientation=None)


def piece_areas(foreground: np.ndarray) -> np.ndarray:
    """Pixel counts of the foreground's connected pieces, largest first."""
    from scipy import ndimage

    pieces, count = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    return np.sort(np.bincount(pieces.ravel())[1:])[::-1] if count else np.zeros(0, int)


def body_scale(foreground: np.ndarray, working_spacing_mm: float) -> float | None:
    """Factor by which a working grid should grow for the vertebral bodies in it (the connected pieces of the
    network's foreground, context classes included) to take a typical lumbar body's size; None when fewer than
    three are found. Why pieces, not levels: off its scale the network may name one body with several levels. Why
    the median of the five largest: a piece of two bodies joined across a disc, or a half-missed one, moves it
    little."""
    areas = piece_areas(foreground)[:len(VERTEBRAE)]
    areas = areas[areas >= MIN_BODY_SHARE * areas[0]] if len(areas) else areas
    if len(areas) < MIN_BODIES_FOR_SCALE:
        return None
    return TYPICAL_BODY_MM / (float(np.sqrt(np.median(areas))) * working_spacing_mm)


def view_wider_than_assumed(foreground: np.ndarray, working_spacing_mm: float) -> bool:
    """Too few bodies to measure, and even the largest piece small: the bodies are too small for the network to
    find, so the view is wider than assumed. (Fewer pieces, one of them several bodies large, are bodies joined
    across discs, at about the right scale: the rescale deals with them.)"""
    areas = piece_areas(foreground)
    typical = (TYPICAL_BODY_MM / working_spacing_mm) ** 2
    return body_scale(foreground, working_spacing_mm) is None and (
        len(areas) == 0 or areas[0] < WIDER_IF_LARGEST_UNDER * typical)


def _box(levels: np.ndarray, full_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Full-size (row0, row1, col0, col1) around the labelled vertebrae of the working grid, with a margin."""
    found = np.argwhere(levels)
    if len(found) == 0:
        return None
    (h, w), (H, W) = levels.shape, full_shape
    r0, c0 = np.maximum(found.min(axis=0) - BOX_MARGIN_PX, 0)
    r1, c1 = np.minimum(found.max(axis=0) + BOX_MARGIN_PX + 1, (h, w))
    return (int(np.floor(r0 * H / h)), min(H, int(np.ceil(r1 * H / h))),
            int(np.floor(c0 * W / w)), min(W, int(np.ceil(c1 * W / w))))


# ---------------------------------------------------------------------------------------------- benchmark


def benchmark(segmenter: Segmenter, shape: tuple[int, int] = (3000, 2400), repeats: int = 3,
              seed: int = 9001) -> dict:
    """Seconds to segment a radiograph of `shape` (a phantom stretched to it), best and mean of `repeats`."""
    from ..phantoms.generator import generate_phantom

    phantom = generate_phantom(seed)
    source = phantom.pixels.astype(np.float32)
    pixels = resample_image(source, shape)
    spacing = phantom.truth["spacing"]
    spacing = (spacing[0] * source.shape[0] / shape[0], spacing[1] * source.shape[1] / shape[1])
    radiograph = Radiograph(pixels, spacing, "benchmark", "benchmark", "benchmark")
    segmenter.segment(radiograph)  # warm-up: first call pays for lazy initialisation
    times = [segmenter.segment(radiograph).seconds for _ in range(repeats)]
    return {"shape": list(shape), "best_s": min(times), "mean_s": float(np.mean(times)), "repeats": repeats,
            "device": str(segmenter.device)}


# ---------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="label L1-L5 vertebrae on radiographs (nnU-Net 2D)",
        description="Write <stem>_labels.png (0 background, 1..5 = L1..L5) per radiograph into --out.")
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="radiographs (DICOM, PNG, JPEG, TIFF, NRRD, NIfTI), folders or CSV lists with a "
                             "`file` column")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--model", default=None, help="segmenter package name or path (default: newest installed)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--mirror", action="store_true", help="average over mirrored inputs (slower, smoother)")
    parser.add_argument("--no-upright-check", action="store_true",
                        help="take images without PatientOrientation as upright (no check for one stored turned)")
    parser.add_argument("--benchmark", action="store_true", help="time one 3000x2400 radiograph instead")
    parser.set_defaults(func=_segment_command)


def _segment_command(args) -> int:
    import json

    from ..io.cohort import collect, output_names
    from ..io.labelmaps import write_label_png
    from ..io.radiograph import read_radiograph

    segmenter = Segmenter.from_package(args.model, args.device, args.mirror,
                                       upright=None if args.no_upright_check else "auto")
    if args.benchmark:
        print(json.dumps(benchmark(segmenter), indent=2))
        return 0
    if not args.paths or not args.out:
        raise AACScoreError("give radiograph PATHs and --out DIR (or --benchmark)")
    items = collect(args.paths)
    names = output_names(items)
    failures = 0
    for item in items:
        path = item.image
        try:
            result = segmenter.segment(read_radiograph(path))
        except AACScoreError as error:
            failures += 1
            print(f"{path}: error: {error}")
            continue
        write_label_png(Path(args.out) / f"{names[path]}_labels.png", result.labels)
        print(f"{path}: {result.status} ({result.seconds:.2f} s){': ' + result.message if result.message else ''}")
        failures += result.status == "error"
    return 1 if failures else 0
