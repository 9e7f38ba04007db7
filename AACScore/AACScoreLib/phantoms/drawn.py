"""The drawn 2D families "default" (training) and "alt" (robustness): anatomy drawn as shapes, image formed by a
detector model and processing; and the drawing, processing and DICOM pieces other families reuse.

Each phantom draws a lordotic spine (T10..S1 with discs and posterior elements), ribs, pelvis, bowel gas and the
aorta in front of the spine, places calcified plaques along the aortic walls to realise sampled target subscores,
then measures the truth from what it drew (truth.py). Acquisition and processing vary widely (facing, rotation,
field of view, noise, heel effect, collimation, markers, contrast curves, photometric interpretation, rescale,
spacing tags, compression) so that models trained on them meet unfamiliar images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .. import kauppila
from .anatomy import (CORNER_NAMES, Anatomy, Placement, blur, build_anatomy, curve_normals, disc_boundaries,
                      draw_bodies, draw_plaque, render_coarse, upsample)
from .truth import (DEFAULT_SEVERITY, DEFAULT_SIZE_RANGE, END_MARGIN_MM, Phantom, arc_length, band_clearance,
                    measure_truth, phantom_name, place_plaques, target_subscores, wall_segment_spans)

COLLIMATOR = 30.0  # attenuation added outside the collimated field (unexposed detector)
LABEL_VALUES: dict[str, int] = {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}
CONTEXT_VALUES: dict[str, int] = {"T12": 6, "S1": 7}  # kauppila.CONTEXT_LABELS
_STYLE_CODE = {"default": 0, "alt": 1}
_FIELD_OF_VIEW_MM = (300.0, 450.0)  # field of view along the rows


def drawn_look(rng: np.random.Generator, alt: bool) -> dict:
    """Densities, textures, noise and processing of one phantom; "alt" uses other ranges and curve families."""
    u = rng.uniform
    look = dict(
        soft=u(2.2, 3.2), soft_mottle=u(0.008, 0.025), back_fat_mm=u(15, 50), belly_mm=u(110, 230),
        hip_widening=u(0.1, 0.35), lung=u(0.8, 1.6), gas=u(0.2, 0.6), gas_fill=u(-0.5, 0.5), stool=u(0.0, 0.6),
        blood=u(0.02, 0.06),
        posterior=u(0.35, 0.6), rib=u(0.15, 0.3), pelvis=u(0.2, 0.4), heel=u(0.05, 0.3),
        heel_angle=rng.choice([0.0, np.pi]) + u(-0.3, 0.3), correlated_noise=u(0.003, 0.012),
        corner_radius_mm=u(1.0, 2.2), endplate_concavity_mm=u(0.0, 0.6), edge_mm=u(0.12, 0.3),
        trabecular_mm=u(0.25, 0.45), trabecular=u(0.3, 0.6), trabecular_contrast=u(0.05, 0.15),
        cortex=u(0.35, 0.7), cortex_mm=u(0.55, 0.95), plaque=u(0.3, 0.8), plaque_mm=u(0.35, 1.1), patchy=u(0.0, 0.6),
        wall_concavity_mm=u(0.2, 1.0), outline_mm=u(0.0, 0.12),
        noise=u(0.008, 0.03), curve=str(rng.choice(["gamma", "sigmoid"])), curve_param=u(0.0, 1.0),
        latitude=u(0.5, 1.0), detail=u(0.9, 1.5), eq_sigma_mm=u(12, 40), p_low=u(0.2, 2.0), p_high=u(99.3, 99.95),
        headroom=u(0.85, 1.0), double_endplate_mm=u(0.5, 2.0) * (rng.random() < 0.4),
        blur_px=u(0.5, 1.2) * (rng.random() < 0.3), grid_lines=u(0.003, 0.01) * (rng.random() < 0.1),
    )
    if alt:
        look.update(
            soft=u(1.6, 4.0), soft_mottle=u(0.01, 0.05), back_fat_mm=u(8, 80), belly_mm=u(80, 300),
            gas=u(0.1, 0.9), gas_fill=u(-1.0, 1.0), rib=u(0.1, 0.4), pelvis=u(0.1, 0.5), heel=u(0.0, 0.5),
            heel_angle=u(0, 2 * np.pi),
            correlated_noise=u(0.005, 0.03), corner_radius_mm=u(0.6, 3.0), endplate_concavity_mm=u(0.0, 1.0),
            edge_mm=u(0.12, 0.35), trabecular_mm=u(0.4, 0.75), trabecular=u(0.25, 1.0),
            trabecular_contrast=u(0.05, 0.25),
            cortex=u(0.2, 0.9), cortex_mm=u(0.35, 1.1), plaque=u(0.15, 0.9), plaque_mm=u(0.25, 1.4), patchy=u(0.0, 1.0),
            noise=u(0.015, 0.06), curve=str(rng.choice(["exp", "knee", "gamma"])), latitude=u(0.35, 1.0),
            detail=u(0.8, 2.2), eq_sigma_mm=u(5, 60), p_low=u(0.0, 5.0), p_high=u(98.5, 99.99),
            wall_concavity_mm=u(0.0, 1.6), outline_mm=u(0.0, 0.25), double_endplate_mm=u(0.5, 3.0) * (rng.random() < 0.6),
            blur_px=u(0.6, 1.8) * (rng.random() < 0.5), grid_lines=u(0.004, 0.02) * (rng.random() < 0.35),
        )
    return look


def contrast_curve(t: np.ndarray, kind: str, p: float) -> np.ndarray:
    """Contrast curve on [0, 1] (the detector/processing characteristic), monotone increasing."""
    if kind == "gamma":
        return t ** (0.8 + 1.4 * p)
    if kind == "sigmoid":
        gain = 4.0 + 5.0 * p
        s = 1.0 / (1.0 + np.exp(-gain * (t - 0.5 - 0.2 * p)))
        return (s - s[0]) / (s[-1] - s[0])
    if kind == "exp":
        k = -3.0 + 6.0 * p if abs(p - 0.5) > 0.05 else 0.6
        return (1.0 - np.exp(-k * t)) / (1.0 - np.exp(-k))
    toe, shoulder = 0.05 + 0.2 * p, 0.75 + 0.2 * p  # "knee": linear with soft toe and shoulder
    knee = (np.logaddexp(0, (t - toe) * 20) - np.logaddexp(0, (t - shoulder) * 20)) / 20
    return np.clip(knee / (shoulder - toe), 0, 1)


def _acquisition(rng: np.random.Generator, size_range: tuple[int, int], key_mm: np.ndarray, alt: bool) -> dict:
    """Image size, spacing, rotation, facing and position so that the key region lies well inside the image."""
    rows = int(rng.integers(size_range[0], size_range[1] + 1))
    cols = int(np.clip(round(rows * rng.uniform(0.72, 1.0)), size_range[0], size_range[1]))
    spacing = float(np.clip(rows * rng.uniform(0.1, 0.2), *_FIELD_OF_VIEW_MM) / rows)
    angle = float(np.radians(np.clip(rng.normal(0.0, 7.0 if not alt else 9.0), -15.0, 15.0)))
    facing = 1.0 if rng.random() < 0.5 else -1.0  # +1: anterior towards +col (right of the image)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    direction = rot @ np.diag([1.0, facing])
    pts = key_mm @ direction.T
    extent = pts.max(axis=0) - pts.min(axis=0)
    spacing = max(spacing, float(extent[0] / (0.9 * rows)), float(extent[1] / (0.9 * cols)))
    pts_px = pts / spacing
    lo = -pts_px.min(axis=0)
    room = np.array([rows, cols]) - (pts_px.max(axis=0) - pts_px.min(axis=0))
    origin = lo + room * rng.uniform(0.2, 0.8, 2)
    return dict(shape=(rows, cols), spacing=spacing, angle=angle, facing=facing, matrix=direction / spacing,
                origin=origin, key_px=pts_px + origin)


def collimate(rng: np.random.Generator, place: Placement, key_px: np.ndarray):
    """Coarse map of the extra attenuation outside a rectangular collimated field, the shutter processing and the
    field (top, bottom, left, right) in pixels."""
    rows, cols = place.shape
    shutter = str(rng.choice(["white", "black", "none"], p=[0.5, 0.3, 0.2]))
    field_ = np.zeros(place.coarse_shape, np.float32)
    if shutter == "none":
        return field_, shutter, (0.0, float(rows), 0.0, float(cols))
    margin = 20.0 / place.spacing
    lo, hi = key_px.min(axis=0) - margin, key_px.max(axis=0) + margin
    insets = [rng.uniform(0.0, 0.12) * n if rng.random() < 0.7 else 0.0 for n in (rows, rows, cols, cols)]
    top, bottom = min(insets[0], max(lo[0], 0)), rows - min(insets[1], max(rows - hi[0], 0))
    left, right = min(insets[2], max(lo[1], 0)), cols - min(insets[3], max(cols - hi[1], 0))
    f = place.factor
    r = np.arange(place.coarse_shape[0]) * f + (f - 1) / 2
    c = np.arange(place.coarse_shape[1]) * f + (f - 1) / 2
    soft = 1.0 / (place.spacing * f)  # penumbra about 1 mm

    def step(x):
        return 1.0 / (1.0 + np.exp(-np.clip(x * soft, -30, 30)))

    inside = (step(r - top) * step(bottom - r))[:, None] * (step(c - left) * step(right - c))[None, :]
    return (COLLIMATOR * (1.0 - inside)).astype(np.float32), shutter, (top, bottom, left, right)


def plaque_path(wall: np.ndarray, arc: np.ndarray, lumen: np.ndarray, start: float, end: float,
                rng: np.random.Generator, look: dict, patchy: bool | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre line (mm), half widths (mm) and strengths of one plaque from arc `start` to `end` on a wall.

    Linear plaques are smooth bright lines; patchy ones vary more in width and density, but never fade out,
    so that the whole interval reads as calcified.
    """
    s = np.append(np.arange(start, end, 0.6), end)
    points = np.stack([np.interp(s, arc, wall[:, 0]), np.interp(s, arc, wall[:, 1])], axis=1)
    normals = np.stack([np.interp(s, arc, lumen[:, 0]), np.interp(s, arc, lumen[:, 1])], axis=1)
    if patchy is None:
        patchy = rng.random() < look["patchy"]

    def wobble(size: int) -> np.ndarray:
        return ndimage.uniform_filter1d(rng.standard_normal(len(s)), size, mode="nearest") * np.sqrt(size) / 1.5

    spread = 0.5 if patchy else 0.3
    half = np.maximum(look["plaque_mm"] * np.clip(0.75 + spread * wobble(3 if patchy else 5), 0.35, 1.6), 0.15)
    density = np.clip(0.75 + spread * wobble(3 if patchy else 5), 0.35 if patchy else 0.5, 1.0)
    strength = look["plaque"] * rng.uniform(0.6, 1.2) * density
    return points + normals * half[:, None], half, strength


def drawn_deposits(rng: np.random.Generator, anatomy: Anatomy, targets: dict[str, int], boundaries: np.ndarray,
              directions: np.ndarray) -> list[dict]:
    """Scored plaques realising the targets, plus unscored ones above T12/L1 and on the iliac arteries."""
    deposits = []
    walls = {"A": anatomy.aorta_anterior, "P": anatomy.aorta_posterior}
    burden = sum(targets.values()) / 24.0
    for wall_name, wall in walls.items():
        spans = wall_segment_spans(wall, boundaries, directions)
        for level, span in zip(kauppila.SCORED_LEVELS, spans):
            for start, end in place_plaques(rng, tuple(span), targets[f"{level}{wall_name}"]):
                deposits.append(dict(wall=wall_name, level=level, start_mm=start, end_mm=end))
        if rng.random() < 0.15 + 0.6 * burden:  # calcification above the scored aorta (not counted)
            top = spans[0][0] - END_MARGIN_MM - rng.uniform(0.5, 10.0)
            length = rng.uniform(2.0, 12.0)
            if top - length > 0:
                deposits.append(dict(wall=wall_name, level=None, start_mm=top - length, end_mm=top))
    for i, (line, diameter) in enumerate(anatomy.iliacs):
        if rng.random() < 0.1 + 0.6 * burden:
            side = 1.0 if rng.random() < 0.5 else -1.0
            wall = line + curve_normals(line) * side * diameter / 2
            arc = arc_length(wall)
            start = rng.uniform(0.0, arc[-1] * 0.6)
            deposits.append(dict(wall=f"iliac{i}{'A' if side > 0 else 'P'}", level=None, start_mm=start,
                                 end_mm=min(arc[-1], start + rng.uniform(3.0, 20.0)), polyline_mm=wall))
    return deposits


def burn_in_markers(rng: np.random.Generator, pixels: np.ndarray, place: Placement, key_px: np.ndarray,
             field_: tuple[float, float, float, float], letter: str, value: int) -> list[str]:
    """Burned-in annotations inside the exposed field, away from the key region: a lead letter, a ruler, text."""
    from PIL import Image, ImageDraw, ImageFont

    top, bottom, left, right = (int(v) for v in field_)
    rows, cols = bottom - top, right - left
    lo, hi = key_px.min(axis=0), key_px.max(axis=0)
    drawn = []
    items = []
    if rng.random() < 0.85:
        items.append(("letter", letter))
    if rng.random() < 0.4:
        items.append(("ruler", ""))
    if rng.random() < 0.5:
        items.append(("text", str(rng.choice(["LAT", "LATERAL", "L-SPINE LAT", "STANDING", "LUMBAR", "ERECT"]))))
    for kind, text in items:
        size_mm = rng.uniform(8.0, 16.0)
        px = max(int(size_mm / place.spacing), 8)
        canvas = Image.new("L", (px * max(len(text), 1) + px // 2, px + px // 2) if kind != "ruler" else
                           (px // 2, int(100 / place.spacing)), 0)
        draw = ImageDraw.Draw(canvas)
        if kind == "ruler":
            h = canvas.size[1]
            draw.line([(1, 0), (1, h)], fill=255, width=max(1, px // 12))
            for k, y in enumerate(range(0, h, max(1, int(10 / place.spacing)))):
                draw.line([(1, y), (px // 4 if k % 5 else px // 2 - 1, y)], fill=255, width=max(1, px // 12))
        else:
            font = ImageFont.load_default(size=px)
            if kind == "letter":
                draw.rectangle([0, 0, canvas.size[0] - 1, canvas.size[1] - 1], fill=90)
            draw.text((px // 4, 0), text, fill=255, font=font)
        stamp = np.asarray(canvas, dtype=np.float32) / 255.0
        h, w = stamp.shape
        for _ in range(20):
            r0 = top + int(rng.integers(0, max(1, rows - h)))
            c0 = left + int(rng.integers(0, max(1, cols - w)))
            if r0 + h <= bottom and c0 + w <= right and (r0 + h < lo[0] or r0 > hi[0] or c0 + w < lo[1] or c0 > hi[1]):
                region = pixels[r0:r0 + h, c0:c0 + w]
                region[...] = np.maximum(region, (stamp * value).astype(pixels.dtype))
                drawn.append(kind)
                break
    return drawn


def _exposed_sample(shape: tuple[int, int], spacing: float, field_: tuple[float, float, float, float]):
    """Subsampling step and the mask of sampled pixels inside the collimated field (penumbra excluded)."""
    step = max(1, min(shape) // 400)
    top, bottom, left, right = field_
    penumbra = 3.0 / spacing
    r = np.arange(0, shape[0], step)
    c = np.arange(0, shape[1], step)
    exposed = (((r > top + penumbra) & (r < bottom - penumbra))[:, None]
               & ((c > left + penumbra) & (c < right - penumbra))[None, :])
    return step, exposed


def process(att: np.ndarray, place: Placement, look: dict, rng: np.random.Generator, bits: int,
            shutter: str, field_: tuple[float, float, float, float]) -> np.ndarray:
    """Quantum noise, then the display processing: uint16 display pixels."""
    if look["blur_px"]:  # detector and focal spot blur
        att = ndimage.gaussian_filter(att, look["blur_px"], truncate=2.0)
    step, exposed = _exposed_sample(att.shape, place.spacing, field_)
    ref = float(np.median(att[::step, ::step][exposed]))
    sigma = np.exp(np.minimum((att - ref) * 0.5, 3.0))
    sigma *= look["noise"]
    noise = rng.random(att.shape, dtype=np.float32)
    noise += rng.random(att.shape, dtype=np.float32)
    noise -= 1.0
    noise *= np.float32(np.sqrt(6.0))
    signal = att + sigma * noise
    del sigma, noise
    return display_pixels(signal, place.spacing, place.factor, look, rng, bits, shutter, field_)


def display_pixels(signal: np.ndarray, spacing: float, factor: int, look: dict, rng: np.random.Generator, bits: int,
                   shutter: str, field_: tuple[float, float, float, float]) -> np.ndarray:
    """Normalisation, grid lines, multi-scale equalisation, optional unsharp masking and histogram equalisation,
    and a contrast curve of a log-domain image (bone high), in place: uint16 display pixels. `factor` is the
    coarse grid on which the equalisation runs."""
    step, exposed = _exposed_sample(signal.shape, spacing, field_)
    top, bottom, left, right = field_
    lo, hi = np.percentile(signal[::step, ::step][exposed], [0.5, 99.5])
    signal -= lo
    signal *= 1.0 / max(hi - lo, 1e-6)
    if look["grid_lines"]:  # a stationary anti-scatter grid leaves fine stripes
        period = rng.uniform(2.2, 4.0)
        stripes = (look["grid_lines"] * np.sin(2 * np.pi * np.arange(signal.shape[1]) / period)).astype(np.float32)
        signal += stripes[None, :]
    f = factor
    coarse = np.clip(signal[(f - 1) // 2::f, (f - 1) // 2::f], -0.2, 1.2)
    mean = upsample(blur(coarse, look["eq_sigma_mm"] / (spacing * f)), f, signal.shape)
    # Multi-scale processing: y = latitude * (mean - 0.5) + 0.5 + detail * (signal - mean), in place.
    signal -= mean
    signal *= look["detail"]
    mean -= 0.5
    mean *= look["latitude"]
    signal += mean
    signal += 0.5
    del mean
    if look.get("unsharp"):  # unsharp masking: edge halos of vendor processing
        sigma_px = look["unsharp_mm"] / spacing
        signal += look["unsharp"] * (signal - blur(signal, sigma_px))
    if look.get("equalise"):  # histogram equalisation blended in: flat, high-contrast "auto" looks
        levels = np.linspace(0.0, 1.0, 257)
        quantiles = np.quantile(signal[::step, ::step][exposed], levels)
        signal = (1.0 - look["equalise"]) * signal + look["equalise"] * np.interp(signal, quantiles, levels).astype(
            np.float32)
    lo, hi = np.percentile(signal[::step, ::step][exposed], [look["p_low"], look["p_high"]])
    signal -= lo
    signal *= 1.0 / max(hi - lo, 1e-6)
    levels = 16384
    lut = contrast_curve(np.linspace(0.0, 1.0, levels), look["curve"], look["curve_param"])
    lut = np.round(lut * (2**bits - 1) * look["headroom"]).astype(np.uint16)
    np.clip(signal, 0.0, 1.0, out=signal)
    signal *= levels - 1
    pixels = lut[signal.astype(np.uint16)]
    if shutter == "black":  # processing blanks everything outside the field, penumbra included
        penumbra = 2.0 / spacing
        r = np.arange(signal.shape[0])
        c = np.arange(signal.shape[1])
        pixels[(r < top + penumbra) | (r > bottom - penumbra), :] = 0
        pixels[:, (c < left + penumbra) | (c > right - penumbra)] = 0
    return pixels


def form_image(anatomy, acq: dict, look: dict, rng: np.random.Generator):
    """(placement, attenuation, label map, shutter, field) of a drawn anatomy under an acquisition: rendered
    coarse, collimated, upsampled, the vertebral bodies drawn and context labels cleared outside the field."""
    factor = max(1, int(round(0.45 / acq["spacing"])))
    place = Placement(acq["matrix"], acq["origin"], acq["spacing"], acq["shape"], factor)
    coarse = render_coarse(anatomy, place, look, rng)
    collimation, shutter, field_ = collimate(rng, place, acq["key_px"])
    att = upsample(coarse + collimation, factor, place.shape)
    label_map = np.zeros(place.shape, np.uint8)
    draw_bodies(att, label_map, anatomy, place, look, rng, LABEL_VALUES, CONTEXT_VALUES)
    clear_context_outside(label_map, field_)
    return place, att, label_map, shutter, field_


def generate_drawn(seed: int, style: str, index: int, severity: Sequence[float] = DEFAULT_SEVERITY,
                   size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> Phantom:
    """One phantom of the "default" or "alt" family, fully determined by its arguments."""
    alt = style == "alt"
    rng = np.random.default_rng([seed, index, _STYLE_CODE[style]])
    targets = target_subscores(seed, index, _STYLE_CODE[style], rng, severity)

    for _ in range(20):  # redraw the rare anatomy whose aorta leaves the Kauppila band
        anatomy = build_anatomy(rng, alt)
        corners_mm = {n: dict(zip(CORNER_NAMES, b.corners)) for n, b in anatomy.bodies.items()}
        bounds_mm, dirs_mm = disc_boundaries(corners_mm)
        if band_clearance(anatomy, bounds_mm, dirs_mm) > 1.0:
            break
    else:
        raise RuntimeError(f"no phantom anatomy with the aorta inside the Kauppila band for seed {seed} index {index}")
    deposits = drawn_deposits(rng, anatomy, targets, bounds_mm, dirs_mm)
    look = drawn_look(rng, alt)

    mean_ap = float(np.mean([anatomy.bodies[n].ap for n in kauppila.VERTEBRAE]))
    key = [anatomy.bodies[n].corners for n in ("T12", "L1", "L2", "L3", "L4", "L5", "S1")]
    key += [anatomy.aorta_anterior, anatomy.spinous_tips[2:]]
    key += [anatomy.bodies[n].corners + anatomy.bodies[n].normal * 0.75 * mean_ap for n in kauppila.VERTEBRAE]
    acq = _acquisition(rng, size_range, np.vstack(key), alt)
    place, att, label_map, shutter, field_ = form_image(anatomy, acq, look, rng)
    plaque_mask = draw_deposits(att, anatomy, place, look, rng, deposits)

    bits = int(rng.choice([12, 14, 15, 16]))
    pixels = process(att, place, look, rng, bits, shutter, field_)
    del att
    settings = dicom_settings(rng, seed, index, style, place, acq, bits)
    marker_value = int((2**bits - 1) * look["headroom"])
    settings["markers"] = burn_in_markers(rng, pixels, place, acq["key_px"], field_, settings["marker_letter"],
                                          marker_value)
    truth = measure_truth(anatomy, place, acq, deposits, targets, settings)
    truth.update(name=phantom_name(seed, index, style), seed=seed, index=index, style=style)
    return Phantom(truth["name"], pixels, label_map, truth, settings, plaque_mask)


def draw_deposits(att: np.ndarray, anatomy: Anatomy, place: Placement, look: dict, rng: np.random.Generator,
                  deposits: list[dict]) -> np.ndarray:
    """Draw every deposit onto `att`, record its drawn polyline (px) in the deposit, and return the mask of the
    plaque that counts (deposits with a level, on the L1..L4 walls)."""
    walls = {"A": anatomy.aorta_anterior, "P": anatomy.aorta_posterior}
    lumen = {"A": -curve_normals(walls["A"]), "P": curve_normals(walls["P"])}
    counted = np.zeros(att.shape, bool)
    for dep in deposits:
        wall = dep.get("polyline_mm", walls.get(dep["wall"]))
        inward = lumen.get(dep["wall"], np.zeros_like(wall))
        own = {**look, "plaque_mm": dep["half_mm"]} if "half_mm" in dep else look  # per-deposit thickness
        path, half, strength = plaque_path(wall, arc_length(wall), inward, dep["start_mm"], dep["end_mm"], rng,
                                           own, dep.get("patchy"))
        draw_plaque(att, place.px(path), half / place.spacing, strength * dep.get("density", 1.0),
                    counted if dep["level"] else None)
        dep["polyline"] = place.px(path)
    return counted


def clear_context_outside(label_map: np.ndarray, field_: tuple[float, float, float, float]) -> None:
    """Context classes (T12, S1) exist only where the collimated field shows them; L1..L5 are always in it."""
    top, bottom, left, right = (int(round(v)) for v in field_)
    outside = np.ones(label_map.shape, bool)
    outside[max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = False
    label_map[outside & (label_map > max(LABEL_VALUES.values()))] = 0


# ------------------------------------------------------------------------------------------------------- DICOM


def dicom_settings(rng: np.random.Generator, seed: int, index: int, style: str, place: Placement, acq: dict,
                    bits: int) -> dict:
    from pydicom.uid import (JPEG2000Lossless, JPEGLSLossless, RLELossless, ExplicitVRLittleEndian,
                             generate_uid)

    name = phantom_name(seed, index, style)
    syntaxes = [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]
    syntax = syntaxes[int(rng.choice(4, p=[0.4, 0.25, 0.25, 0.1]))]
    spacing_tags = str(rng.choice(["PixelSpacing", "ImagerPixelSpacing+EMF", "both"], p=[0.4, 0.35, 0.25]))
    rescale = None
    if rng.random() < 0.35:
        rescale = (float(rng.choice([0.25, 0.5, 1.0, 2.0])), float(rng.choice([0.0, -1024.0, 100.0, 1000.0])))
    view = str(rng.choice(["LL", "RL"]))
    orientation = None
    if rng.random() < 0.6:
        orientation = ["A" if acq["facing"] > 0 else "P", "F"]
    return dict(
        transfer_syntax=str(syntax), transfer_syntax_name=syntax.name,
        photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2", bits_stored=bits,
        rescale=rescale, spacing_tags=spacing_tags, magnification=round(float(rng.uniform(1.05, 1.25)), 4),
        patient_orientation=orientation, view_position=view, marker_letter=view[0],
        window=bool(rng.random() < 0.7), kvp=round(float(rng.uniform(75, 100)), 1),
        study_date=f"20{rng.integers(15, 26):02d}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        uids={k: generate_uid(entropy_srcs=[name, k]) for k in ("study", "series", "sop", "frame")},
    )
