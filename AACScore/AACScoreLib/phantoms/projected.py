"""Phantom family "projected": a 3D anatomy projected with Beer–Lambert attenuation through a cone beam.

The anatomy is built in millimetres from analytic convex shapes (phantoms/volume.py): vertebral bodies with a
cortical shell, a trabecular core and cupped endplates, pedicles, laminae, articular pillars, spinous and transverse
processes, ribs on the rib-bearing vertebrae, sacrum, coccyx, iliac wings and femoral heads, a tortuous aorta with
calcified plaque on its walls, iliac arteries, the body outline with subcutaneous fat, lungs, liver, kidneys, psoas
and bowel gas. A point source at 1000–1800 mm, slightly rotated about the vertical axis and tilted, projects it:
double endplates, double posterior walls and ribs, and the sacrum seen through the iliac wings come from geometry.
Detector blur, scatter, quantum noise, the log transform and a processing curve then form the image. Each phantom's
plaque has its own habit (lines, patches or punctate specks), density and wall thickness, drawn from a stream of
its own. Some carry metal, from a third stream: pedicle screws and rods, vertebroplasty cement, interbody cage
markers and surgical clips (implants cross the bodies and are far denser than bone; radiographs of the older
people whose aortas calcify often show them).

Numbering follows the usual counting convention: L1 is the first vertebra below the lowest rib-bearing one, counted
down; 4 or 6 lumbar-type vertebrae (a sacralised L5, or an L6) are marked `transitional` in the truth.

Labels are the projected silhouettes of the vertebral bodies (1..5 = L1..L5, 6 = T12 and 7 = S1 when in view).
The truth is what the project's geometry (geometry/spine.py) computes from those labels: plaques are placed along
the projected aortic walls between its segment boundaries, and the calcified fractions are measured there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from .. import kauppila
from ..errors import GeometryError
from ..geometry.spine import ANTERIOR_MARGIN, SpineGeometry, analyze_spine
from ..io.labelmaps import vertebra_labels
from .anatomy import BOUNDARY_NAMES, Placement, blur, smooth_noise, upsample
from .drawn import burn_in_markers, collimate, dicom_settings, display_pixels, drawn_look
from .truth import (DEFAULT_SEVERITY, DEFAULT_SIZE_RANGE, END_MARGIN_MM, FRACTION_RANGES, GAP_MM, Phantom, arc_length,
                    calcified_fractions, phantom_name, place_plaques, target_subscores, wall_segment_spans)
from .volume import Convex, ConeBeam, Projector, ellipsoid, elliptic_prism, intersect, rotation_matrix, tube

FAMILY = "projected"
_CODE = 2  # tells this family's random streams apart from the drawn families' (0 and 1)
_PLAQUE_STREAM = 1  # the plaque's own stream: its look can change without moving anatomy, beam or targets
_IMPLANT_STREAM = 2  # the implants' own stream, for the same reason
_METAL = (0.1, 0.9)  # excess attenuation per mm over soft tissue: titanium to steel at about 60 keV (bone: ~0.05)
HABITS = ("line", "patchy", "punctate")
_HABIT_WEIGHTS = (0.4, 0.3, 0.3)
_SPACING_MM = (0.1, 0.25)
_RENDER_MM = 0.45  # pixel of the grid the smooth anatomy is projected on before upsampling
_MU_SOFT = 0.020  # soft tissue attenuation per mm (about 60 keV); everything else is excess over it
_HEIGHT_MM = dict(T9=20.0, T10=21.5, T11=23.0, T12=24.5, L1=26.0, L2=27.0, L3=27.5, L4=27.5, L5=26.5, L6=26.0)
_AP_MM = dict(T9=27.0, T10=29.0, T11=31.0, T12=33.0, L1=35.0, L2=37.0, L3=38.5, L4=39.5, L5=40.0, L6=40.0)
_WIDTH_MM = dict(T9=32.0, T10=35.0, T11=38.0, T12=41.0, L1=43.0, L2=46.0, L3=49.0, L4=51.0, L5=53.0, L6=53.0)
_TRANSVERSE_MM = dict(T9=16.0, T10=15.0, T11=12.0, T12=10.0, L1=15.0, L2=20.0, L3=28.0, L4=24.0, L5=22.0, L6=24.0)
_SACRAL = ((24.0, 38.0, 52.0), (19.0, 30.0, 42.0), (16.0, 24.0, 33.0), (13.0, 18.0, 26.0), (11.0, 14.0, 20.0))
_STEP_MM = 0.5  # sampling of the aortic centreline


@dataclass
class Vertebra3D:
    """One vertebra: its body (outline = what its label shows), cortical/trabecular terms and posterior elements."""

    name: str
    label: int  # 1..5 = L1..L5, 6 = T12, 7 = S1, 0 unlabelled
    centre: np.ndarray
    frame: np.ndarray  # columns: lateral, inferior (body axis), anterior
    height: float
    ap: float
    width: float
    outline: Convex
    rim: np.ndarray  # points around both endplate rims (the extremes of the body's projection)
    bone: list[tuple[Convex, float]]  # excess attenuation terms except the trabecular core
    core: list[tuple[Convex, float]]  # the trabecular core, which gets texture on the detector grid

    def local(self, w: float, u: float, v: float) -> np.ndarray:
        return self.centre + self.frame @ np.array([w, u, v])


@dataclass
class Anatomy3D:
    vertebrae: list[Vertebra3D]
    terms: list[tuple[Convex, float]]  # everything else, as excess attenuation over soft tissue
    outline: dict  # control points of the skin and the muscle compartment along y
    lumbar_count: int
    mu: dict
    aorta: dict = field(default_factory=dict)  # centre (N, 3), radius (N,), arc (N,)
    iliacs: list[tuple[np.ndarray, float]] = field(default_factory=list)

    def vertebra(self, name: str) -> Vertebra3D:
        return next(v for v in self.vertebrae if v.name == name)


# ------------------------------------------------------------------------------------------------------ anatomy


def _vertebra_names(lumbar_count: int) -> list[tuple[str, str]]:
    """(name, kind) from T9 to the coccyx by the counting convention; kind thoracic/lumbar/sacralised/sacral/coccyx."""
    names = [(f"T{k}", "thoracic") for k in (9, 10, 11, 12)]
    names += [(f"L{k}", "lumbar") for k in range(1, min(lumbar_count, 5) + 1)]
    if lumbar_count == 4:
        names.append(("L5", "sacralised"))
    if lumbar_count == 6:
        names.append(("L6", "lumbar"))
    names += [(f"S{k}", "sacral") for k in range(1, 6)] + [(f"Co{k}", "coccyx") for k in range(1, 4)]
    return names


def _body(centre: np.ndarray, frame: np.ndarray, h_ant: float, h_post: float, ap: float, width: float, mu: dict,
          rng: np.random.Generator, cups: tuple[float, float]) -> tuple[Convex, np.ndarray, list, list]:
    """Outline, rim points, shell terms and core terms of a vertebral body: an elliptic cylinder flattened behind,
    cut by two endplate planes (wedged when h_ant != h_post), with cupped endplates `cups` mm deep."""
    flat = rng.uniform(0.72, 0.9)  # the posterior wall is the ellipse cut flat
    a_v = ap / (1.0 + flat)
    v_c = ap / 2.0 - a_v
    half = max(h_ant, h_post) / 2.0 + 2.0

    def solid(inset: float, endplate: float) -> Convex:
        prism = elliptic_prism(centre + frame @ [0.0, 0.0, v_c], frame, [width / 2 - inset, half, a_v - inset])
        shape = Convex(prism.quadrics, [], prism.bounds)
        for sign in (-1.0, 1.0):
            # plane through (u = sign*h_ant/2, v = ap/2) and (u = sign*h_post/2, v = -ap/2); outward normal ~ sign*u
            normal = np.array([0.0, sign * ap, -(h_ant - h_post) / 2.0])
            point = np.array([0.0, sign * (h_ant / 2.0 - endplate), ap / 2.0])
            shape = shape.cut(frame @ normal, centre + frame @ point)
        return shape.cut(frame @ [0.0, 0.0, -1.0], centre + frame @ [0.0, 0.0, -ap / 2.0 + inset])

    cortex, endplate = mu["cortex_mm"], mu["endplate_mm"]
    outer, inner = solid(0.0, 0.0), solid(cortex, endplate)
    shell, core = [(outer, mu["cortical"])], [(inner, mu["trabecular"] - mu["cortical"])]
    for sign, depth in zip((-1.0, 1.0), cups):
        if depth <= 0:
            continue
        h = (h_ant + h_post) / 4.0
        radius = 6.0 + depth
        cup_centre = centre + frame @ [0.0, sign * (h + radius - depth), v_c * 0.5]
        semi = np.array([0.36 * width, radius, 0.34 * ap])
        cup = ellipsoid(cup_centre, frame, semi)
        grown = ellipsoid(cup_centre, frame, semi + endplate)
        shell.append((intersect(outer, cup), mu["disc"] - mu["cortical"]))
        core.append((intersect(inner, grown), -(mu["trabecular"] - mu["cortical"])))
    angle = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)
    v = np.maximum(v_c + a_v * np.sin(angle), -ap / 2)
    u = (h_ant * (v + ap / 2) + h_post * (ap / 2 - v)) / (2 * ap)  # endplate planes, linear from back to front
    rim = np.vstack([np.column_stack([width / 2 * np.cos(angle), sign * u, v]) for sign in (-1.0, 1.0)])
    return outer, centre + rim @ frame.T, shell, core


def _posterior_elements(v: Vertebra3D, kind: str, mu: dict, rng: np.random.Generator) -> list[tuple[Convex, float]]:
    """Pedicles, articular pillars, laminae, spinous and transverse processes in the vertebra's frame."""
    h, ap, w = v.height, v.ap, v.width
    thoracic = kind == "thoracic"
    weight = mu["posterior"]
    pedicle_w, pedicle_u, pedicle_len = 0.33 * w, -0.15 * h, rng.uniform(0.3, 0.4) * ap
    back = -ap / 2.0 - pedicle_len
    up = v.frame[:, 1]
    terms = []
    for side in (-1.0, 1.0):
        pedicle = v.local(side * pedicle_w, pedicle_u, -ap / 2 + 3), v.local(side * pedicle_w, pedicle_u, back)
        terms.append((tube(*pedicle, (0.28 * h, rng.uniform(3.5, 5.5)), up), weight))
        terms.append((ellipsoid(v.local(side * pedicle_w * 0.95, pedicle_u + 0.12 * h, back - 4.0), v.frame,
                                [rng.uniform(3.0, 5.0), 0.7 * h, rng.uniform(4.0, 6.0)]), weight * 0.7))
        lamina = v.local(side * pedicle_w, pedicle_u + 0.15 * h, back - 2), v.local(0.0, pedicle_u + 0.25 * h, back - 12)
        terms.append((tube(*lamina, (0.33 * h, rng.uniform(2.5, 3.5)), up), weight))
        length = _TRANSVERSE_MM.get(v.name, 20.0) * rng.uniform(0.8, 1.2)
        thick = 1.6 if kind == "sacralised" or v.name in ("L5", "L6") else 1.0
        aim = v.local(side * (w / 2 + length), pedicle_u + 2.0, -ap / 2 - pedicle_len * (1.2 if thoracic else 0.5) - 5)
        terms.append((tube(v.local(side * pedicle_w, pedicle_u, -ap / 2 - pedicle_len * 0.5), aim,
                           (rng.uniform(4.0, 5.5) * thick, rng.uniform(3.0, 4.0) * thick), up), weight))
    angle = np.radians(rng.uniform(35.0, 55.0) if thoracic else rng.uniform(5.0, 25.0))
    length = rng.uniform(35.0, 45.0) if thoracic else rng.uniform(26.0, 36.0)
    start = np.array([0.0, pedicle_u + 0.2 * h, back - 10.0])
    end = start + length * np.array([0.0, np.sin(angle), -np.cos(angle)])
    terms.append((tube(v.local(*start), v.local(*end), ((0.2 if thoracic else 0.3) * h, rng.uniform(2.5, 3.5)), up),
                  weight))
    return terms


def _spine(rng: np.random.Generator, scale: float, lumbar_count: int, mu: dict) -> list[Vertebra3D]:
    """Vertebrae T9..coccyx along a kyphotic-lordotic-sacral curve, each slightly rotated on its own."""
    names = _vertebra_names(lumbar_count)
    lumbar_index = [n for n, k in names if k in ("lumbar", "sacralised")]
    dims = {}
    for name, kind in names:
        if kind in ("sacral", "coccyx"):
            continue
        key = name if name in _HEIGHT_MM else "L5"
        dims[name] = [_HEIGHT_MM[key], _AP_MM[key], _WIDTH_MM[key]]
    for k in range(5):
        dims[f"S{k + 1}"] = list(_SACRAL[k])
    for k in range(3):
        dims[f"Co{k + 1}"] = [9.0 - 1.5 * k, 12.0 - 2.0 * k, 14.0 - 2.5 * k]
    for name in dims:
        dims[name] = [d * scale * rng.normal(1.0, 0.035) for d in dims[name]]
    if lumbar_count == 4:
        dims["L5"][0] *= 0.85
    h0, dh = rng.uniform(5.5, 8.5) * scale, rng.uniform(0.4, 1.2) * scale
    movable = [n for n, k in names if k in ("thoracic", "lumbar", "sacralised")]
    discs = {n: h0 + dh * (k - 3) for k, n in enumerate(movable)}  # disc below vertebra n
    for n in lumbar_index[-3:]:
        discs[n] *= rng.uniform(0.6, 1.15)  # degenerate lower discs
    if lumbar_count == 4:
        discs["L5"] = rng.uniform(1.5, 3.5)  # rudimentary disc of a sacralised L5
    for k in range(1, 6):
        discs[f"S{k}"] = rng.uniform(1.0, 2.5) if k < 5 else rng.uniform(2.0, 4.0)
    for k in range(1, 4):
        discs[f"Co{k}"] = rng.uniform(1.5, 3.0)

    wedge = {n: rng.uniform(-1.5, 0.0) * scale for n, k in names if k == "thoracic"}
    wedge.update({n: rng.uniform(0.0, 1.8) * scale for n in lumbar_index})
    wedge[lumbar_index[-1]] = rng.uniform(2.0, 5.0) * scale
    cups = {n: (rng.uniform(0.3, 1.8), rng.uniform(0.3, 1.8)) for n in movable}
    if rng.random() < 0.15:  # an osteoporotic fracture: wedge, biconcave or crush
        name = str(rng.choice([n for n in movable if n not in ("T9", "T10")][:7]))
        kind = rng.choice(["wedge", "biconcave", "crush"])
        if kind == "wedge":  # the anterior wall loses `loss` of the height, the posterior keeps it
            loss = rng.uniform(0.15, 0.35)
            wedge[name] = -dims[name][0] * loss
            dims[name][0] *= 1.0 - loss / 2
        elif kind == "biconcave":
            cups[name] = (rng.uniform(2.5, 4.5), rng.uniform(2.5, 4.5))
        else:
            dims[name][0] *= rng.uniform(0.75, 0.88)

    s_lengths = np.cumsum([dims[n][0] + discs.get(n, 0.0) for n, _ in names])
    s_junction = s_lengths[3] - dims["T12"][0] / 2
    s_sacrum = s_lengths[3 + len(lumbar_index) - 1]
    phi_junction = np.radians(rng.uniform(8.0, 24.0))
    lordosis = np.radians(rng.uniform(38.0, 66.0))
    power = rng.uniform(1.0, 1.8)
    sacral_curve = np.radians(rng.uniform(50.0, 90.0)) / (s_lengths[-1] - s_sacrum)
    slope = np.radians(rng.uniform(2.0, 8.0))

    def phi(s: float) -> float:
        if s < s_junction:
            return phi_junction - np.radians(6.0) * (s_junction - s) / s_junction
        if s <= s_sacrum:
            return phi_junction - lordosis * ((s - s_junction) / (s_sacrum - s_junction)) ** power
        return phi_junction - lordosis - slope + sacral_curve * (s - s_sacrum)

    scoliosis = rng.normal(0.0, 1.0) * np.radians(rng.uniform(0.0, 3.0))
    vertebrae = []
    superior_mid, s = np.zeros(3), 0.0
    for i, (name, kind) in enumerate(names):
        h, ap, width = dims[name]
        angle = phi(s + h / 2) + np.radians(rng.normal(0.0, 1.2))
        down = np.array([0.0, np.cos(angle), np.sin(angle)])
        anterior = np.array([0.0, -np.sin(angle), np.cos(angle)])
        frame = np.column_stack([[1.0, 0.0, 0.0], down, anterior])
        axial = scoliosis * np.sin(np.pi * i / 6.0) + np.radians(rng.normal(0.0, 1.0))
        coronal = np.radians(rng.normal(0.0, 1.0))
        frame = rotation_matrix(down, axial) @ rotation_matrix(anterior, coronal) @ frame
        centre = superior_mid + down * h / 2
        label = kauppila.CONTEXT_LABELS.get(name, int(name[1]) if name in kauppila.VERTEBRAE else 0)
        w = wedge.get(name, 0.0)
        if kind == "coccyx":
            outline = ellipsoid(centre, frame, [width / 2, h / 2, ap / 2])
            rim, bone, core = outline.bounds, [(outline, mu["trabecular"] * 1.2)], []
        else:
            body_cups = cups.get(name, (0.0, 0.0)) if kind != "sacral" else (0.0, 0.0)
            outline, rim, bone, core = _body(centre, frame, h + w / 2, h - w / 2, ap, width, mu, rng, body_cups)
        v = Vertebra3D(name, label, centre, frame, h, ap, width, outline, rim, bone, core)
        if kind in ("thoracic", "lumbar", "sacralised"):
            v.bone += _posterior_elements(v, kind, mu, rng)
        vertebrae.append(v)
        s += h
        gap = discs.get(name, 0.0)
        angle = phi(s + gap / 2)
        superior_mid = centre + down * h / 2 + np.array([0.0, np.cos(angle), np.sin(angle)]) * gap
        s += gap
        if kind == "sacral" and gap > 0 and name != "S5":  # fused sacral segments: bone bridges the old discs
            bridge_centre = centre + down * (h / 2 + gap / 2)
            vertebrae[-1].bone.append((elliptic_prism(bridge_centre, frame, [width * 0.4, gap / 2 + 0.5, ap * 0.38]),
                                       mu["trabecular"] * 0.8))
    return vertebrae


def _ribs(vertebrae: list[Vertebra3D], mu: dict, rng: np.random.Generator, torso_radius: float) -> list:
    """Ribs of T9..T12: head at the body, then posterolaterally to the angle and around the torso (of AP radius
    `torso_radius`), sloping down."""
    lengths = dict(T9=(250.0, 320.0), T10=(220.0, 300.0), T11=(120.0, 210.0), T12=(25.0, 140.0))
    terms = []
    for v in vertebrae:
        if v.name not in lengths:
            continue
        for side in (-1.0, 1.0):
            length = rng.uniform(*lengths[v.name])
            head = v.local(side * (v.width / 2 - 2.0), -0.45 * v.height, -v.ap / 2 + 6.0)
            corner = v.local(side * (v.width / 2 + rng.uniform(22.0, 32.0)), -0.3 * v.height, -v.ap / 2 - 22.0)
            theta1 = np.radians(rng.uniform(22.0, 35.0))
            rx = abs(corner[0]) / np.sin(theta1) * rng.uniform(0.9, 1.1)
            rz = torso_radius * rng.uniform(0.85, 1.1)
            zc = corner[2] + rz * np.cos(theta1)
            points = [head, corner]
            theta, walked = theta1, np.linalg.norm(corner - head)
            drop = rng.uniform(0.2, 0.4)
            while walked < length:
                theta += np.radians(12.0)
                nxt = np.array([side * rx * np.sin(theta), 0.0, zc - rz * np.cos(theta)])
                step = np.linalg.norm(nxt[[0, 2]] - points[-1][[0, 2]])
                nxt[1] = points[-1][1] + drop * step
                points.append(nxt)
                walked += step
            radii = np.array([rng.uniform(4.0, 6.0), rng.uniform(2.5, 3.5)])
            for a, b in zip(points[:-1], points[1:]):
                terms.append((tube(a, b, radii, (0.0, 1.0, 0.0)), mu["cortical"] * 0.85))
                terms.append((tube(a, b, radii - 1.0, (0.0, 1.0, 0.0)), (mu["trabecular"] - mu["cortical"]) * 0.85))
    return terms


def _pelvis(vertebrae: list[Vertebra3D], mu: dict, rng: np.random.Generator, crest_y: float) -> list:
    """Sacral alae and posterior plate, iliac wings (ellipsoidal shells cut to a lateral cap: their rims, seen
    edge-on, draw the crests), femoral heads."""
    terms = []
    s1, s2 = (next(v for v in vertebrae if v.name == n) for n in ("S1", "S2"))
    for v in vertebrae:
        if v.name.startswith("S"):
            plate = ellipsoid(v.local(0.0, 0.0, -v.ap / 2 - 16.0), v.frame, [0.55 * v.width, 0.6 * v.height, 5.0])
            terms.append((plate, mu["posterior"] * 0.8))
    for v, size in ((s1, 1.0), (s2, 0.8)):
        for side in (-1.0, 1.0):
            terms.append((ellipsoid(v.local(side * (v.width / 2 + 14.0 * size), 0.15 * v.height, -0.08 * v.ap), v.frame,
                                    [24.0 * size, 0.75 * v.height, 0.42 * v.ap]), mu["trabecular"] * 0.9))
    for side in (-1.0, 1.0):
        semi = np.array([rng.uniform(80.0, 110.0), rng.uniform(70.0, 90.0), rng.uniform(85.0, 105.0)])
        centre = np.array([side * rng.uniform(10.0, 35.0), crest_y + semi[1], s1.centre[2] + rng.uniform(15.0, 40.0)])
        frame = rotation_matrix([0.0, 1.0, 0.0], side * np.radians(rng.uniform(15.0, 35.0)))
        thickness = rng.uniform(3.0, 7.0)
        outer, inner = ellipsoid(centre, frame, semi), ellipsoid(centre, frame, semi - thickness)
        normal = -side * frame[:, 0]
        cut = centre + side * frame[:, 0] * semi[0] * rng.uniform(0.3, 0.5)
        low = np.array([0.0, 1.0, 0.0]), centre + np.array([0.0, rng.uniform(0.2, 0.5) * semi[1], 0.0])
        for shape, weight in ((outer, mu["cortical"] * 0.8), (inner, -mu["cortical"] * 0.8)):
            terms.append((shape.cut(normal, cut).cut(*low), weight))
        head = np.array([side * rng.uniform(75.0, 95.0), crest_y + rng.uniform(130.0, 160.0),
                         s1.centre[2] + rng.uniform(50.0, 80.0)])
        radius = rng.uniform(21.0, 26.0)
        terms.append((ellipsoid(head, np.eye(3), [radius] * 3), mu["cortical"] * 0.8))
        terms.append((ellipsoid(head, np.eye(3), [radius - 2.5] * 3), (mu["trabecular"] - mu["cortical"]) * 0.8))
        terms.append((ellipsoid(head + [0.0, -8.0, 0.0], np.eye(3), [radius + 12.0, radius + 8.0, radius + 12.0])
                      .cut([0.0, 1.0, 0.0], head), mu["trabecular"] * 0.6))
    return terms


def _soft_tissue(vertebrae: list[Vertebra3D], rng: np.random.Generator, mu: dict, right_side: float) -> tuple:
    """Body outline (skin and muscle compartment along y), lungs, liver, kidneys, psoas and bowel gas."""
    spine = [v for v in vertebrae if not v.name.startswith("Co")]
    ys = np.array([v.centre[1] for v in spine])
    back = np.array([v.centre[2] - v.ap / 2 - 55.0 for v in spine]) - rng.uniform(15.0, 55.0)
    along = (ys - ys[0]) / (ys[-1] - ys[0])
    belly = rng.uniform(80.0, 220.0) + rng.uniform(-25.0, 25.0) * np.sin(np.pi * along + rng.uniform(0, np.pi))
    depth = np.array([v.centre[2] + v.ap / 2 for v in spine]) + belly - back
    hips = 1.0 / (1.0 + np.exp(-(ys - ys[-7]) / 25.0))  # the outline widens smoothly below the waist
    half_width = rng.uniform(120.0, 185.0) + rng.uniform(10.0, 40.0) * hips
    fat_side, fat_front, fat_back = rng.uniform(8.0, 40.0), rng.uniform(10.0, 60.0), rng.uniform(5.0, 25.0)
    outline = dict(y=ys, skin=(half_width, back, back + depth),
                   muscle=(half_width - fat_side, back + fat_back, back + depth - fat_front))
    terms = []
    top, lumbar = vertebrae[0], [v for v in vertebrae if v.name in kauppila.VERTEBRAE]
    front = float(np.mean(back + depth))
    lowest = "T12" if rng.random() < 0.5 else "L1"  # where the lung bases reach down behind the spine
    y_low = next(v for v in vertebrae if v.name == lowest).centre[1]
    for side in (-1.0, 1.0):
        semi = np.array([rng.uniform(55.0, 75.0), 160.0, rng.uniform(60.0, 85.0)])
        frame = rotation_matrix([1.0, 0.0, 0.0], np.radians(rng.uniform(10.0, 30.0)))
        centre = np.array([side * rng.uniform(55.0, 85.0), y_low + rng.uniform(-15.0, 15.0) - semi[1],
                           top.centre[2] - top.ap / 2 + rng.uniform(-10.0, 40.0)])
        terms.append((ellipsoid(centre, frame, semi), -0.75 * _MU_SOFT))
        kidney = lumbar[rng.integers(0, 2)].centre + np.array([side * rng.uniform(45.0, 65.0), 0.0,
                                                               rng.uniform(-15.0, 5.0)])
        k_frame = rotation_matrix([0.0, 0.0, 1.0], side * np.radians(rng.uniform(5.0, 20.0)))
        k_semi = np.array([25.0, 55.0, 30.0]) * rng.uniform(0.85, 1.15)
        terms.append((ellipsoid(kidney, k_frame, k_semi * 1.45), mu["fat"]))
        terms.append((ellipsoid(kidney, k_frame, k_semi), 0.0008 - mu["fat"]))
        start = lumbar[0].centre + np.array([side * 22.0, -10.0, -8.0])
        end = lumbar[-1].centre + np.array([side * rng.uniform(40.0, 55.0), 40.0, rng.uniform(5.0, 20.0)])
        radii = (rng.uniform(18.0, 26.0), rng.uniform(14.0, 22.0))
        terms.append((tube(start, end, (radii[0] + 4.0, radii[1] + 4.0)), mu["fat"] * 0.7))
        terms.append((tube(start, end, radii), 0.0006 - mu["fat"] * 0.7))
    liver = lumbar[0].centre + np.array([right_side * rng.uniform(40.0, 80.0), -rng.uniform(30.0, 70.0),
                                         rng.uniform(40.0, 80.0)])
    terms.append((ellipsoid(liver, np.eye(3), [90.0, rng.uniform(60.0, 90.0), 75.0]), 0.0008))
    gas = []
    count = int(rng.integers(4, 36))
    for k in range(count):
        y = rng.uniform(lumbar[0].centre[1] - 30.0, lumbar[-1].centre[1] + 60.0)
        near_spine = rng.random() < 0.25  # loops in front of the spine overlap the aortic band
        z0 = lumbar[2].centre[2] + lumbar[2].ap / 2
        z = z0 + (rng.uniform(10.0, 45.0) if near_spine else rng.uniform(20.0, max(30.0, front - z0 - 25.0)))
        x = rng.uniform(-0.7, 0.7) * float(half_width.mean())
        size = rng.uniform(4.0, 18.0 if rng.random() < 0.8 else 28.0) * np.array([1.0, rng.uniform(0.4, 1.2),
                                                                               rng.uniform(0.5, 1.3)])
        frame = rotation_matrix(rng.normal(size=3), rng.uniform(0, np.pi))
        gas.append((ellipsoid([x, y, z], frame, size), -_MU_SOFT))
    if rng.random() < 0.6:  # stool: a cluster of small bubbles
        centre = np.array([rng.uniform(-80.0, 80.0), lumbar[-1].centre[1] + rng.uniform(-40.0, 40.0),
                           lumbar[-1].centre[2] + rng.uniform(40.0, 100.0)])
        for _ in range(int(rng.integers(10, 40))):
            gas.append((ellipsoid(centre + rng.normal(0.0, 18.0, 3), np.eye(3), rng.uniform(1.5, 5.0, 3)),
                        -_MU_SOFT * 0.8))
    return outline, terms + gas


def _aorta(vertebrae: list[Vertebra3D], rng: np.random.Generator, max_gap: float) -> tuple[dict, list]:
    """Centreline of a tortuous aorta in front of the spine down past L4/L5 (the bifurcation), and the iliacs."""
    lumbar = [v for v in vertebrae if v.name in kauppila.VERTEBRAE]
    mean_ap = float(np.mean([v.ap for v in lumbar]))
    diameter = rng.uniform(15.0, 25.0)
    diameter = min(diameter, ANTERIOR_MARGIN * mean_ap - 6.0)
    tortuosity = rng.uniform(0.0, 6.0)
    room = max(0.0, min(25.0, ANTERIOR_MARGIN * mean_ap - diameter - 3.0 - tortuosity, max_gap))
    gap = rng.uniform(1.5, 1.5 + room)
    x_offset = rng.uniform(-20.0, 5.0)
    names = [v.name for v in vertebrae]
    l4, l5 = vertebrae[names.index("L4")], vertebrae[names.index("L5")]
    points = []
    for v in vertebrae[:names.index("L5") + 2]:
        anterior = v.frame[:, 2]
        points.append(v.centre + anterior * (v.ap / 2 + gap + diameter / 2) + np.array([x_offset, 0.0, 0.0]))
    points.insert(0, 2 * points[0] - points[1])
    points = np.array(points)
    knots = arc_length(points)
    spline = CubicSpline(knots, points, axis=0)
    fine = spline(np.arange(0.0, knots[-1], 1.0))
    arc = arc_length(fine)
    centre = np.stack([np.interp(np.arange(0.0, arc[-1], _STEP_MM), arc, fine[:, k]) for k in range(3)], axis=1)
    s = np.arange(len(centre)) * _STEP_MM
    wobble = [ndimage.gaussian_filter1d(rng.standard_normal(len(s)), 40.0 / _STEP_MM, mode="nearest") for _ in "xz"]
    wobble = [w / max(np.abs(w).max(), 1e-6) for w in wobble]
    centre[:, 0] += tortuosity * 1.5 * wobble[0]
    centre[:, 2] += tortuosity * (0.5 + 0.5 * wobble[1])
    # the bifurcation lies 6-18 mm below the L4/L5 disc (along L4's axis)
    disc = (l4.local(0, l4.height / 2, 0) + l5.local(0, -l5.height / 2, 0)) / 2
    below = (centre - disc) @ l4.frame[:, 1]
    end = int(np.argmax(below > rng.uniform(6.0, 18.0)))
    centre, s = centre[:end], s[:end]
    radius = diameter / 2 * np.linspace(1.0, rng.uniform(0.85, 0.97), len(s))
    iliacs = []
    direction = (centre[-1] - centre[-10]) / np.linalg.norm(centre[-1] - centre[-10])
    for side in (-1.0, 1.0):
        d = direction + np.array([side * rng.uniform(0.3, 0.6), 0.0, rng.uniform(0.1, 0.4)])
        d /= np.linalg.norm(d)
        length = rng.uniform(50.0, 80.0)
        k = np.arange(0.0, length, _STEP_MM)[:, None]
        iliacs.append((centre[-1] + d * k, float(radius[-1] * rng.uniform(0.55, 0.65))))
    return dict(centre=centre, radius=radius, arc=s, diameter=diameter), iliacs


def build_anatomy_3d(rng: np.random.Generator) -> Anatomy3D:
    scale = rng.uniform(0.88, 1.12)
    lumbar_count = int(rng.choice([4, 5, 6], p=[0.08, 0.8, 0.12]))
    cortical = rng.uniform(0.055, 0.08)  # effective energies of 45-60 keV; trabecular density from osteoporotic up
    mu = dict(cortical=cortical - _MU_SOFT, trabecular=rng.uniform(0.026, 0.038) - _MU_SOFT,
              posterior=(cortical - _MU_SOFT) * rng.uniform(0.45, 0.7), disc=0.0008, fat=-0.002,
              cortex_mm=rng.uniform(0.6, 1.3), endplate_mm=rng.uniform(0.6, 1.2))
    vertebrae = _spine(rng, scale, lumbar_count, mu)
    names = [v.name for v in vertebrae]
    right_side = 1.0 if rng.random() < 0.5 else -1.0
    outline, soft = _soft_tissue(vertebrae, rng, mu, right_side)
    _, back, front = outline["muscle"]
    terms = _ribs(vertebrae, mu, rng, float(np.mean(front - back)) * 0.4)
    l5 = vertebrae[names.index("L5")]
    crest_y = l5.centre[1] + rng.uniform(-0.9, 0.4) * l5.height
    terms += _pelvis(vertebrae, mu, rng, crest_y)
    if lumbar_count == 4:  # the sacralised L5's transverse processes merge with the alae
        for side in (-1.0, 1.0):
            terms.append((ellipsoid(l5.local(side * (l5.width / 2 + 14.0), 0.2 * l5.height, -0.1 * l5.ap), l5.frame,
                                    [22.0, 0.6 * l5.height, 0.35 * l5.ap]), mu["trabecular"]))
    for v in vertebrae[3:names.index("S1")]:  # osteophytes at some anterior endplate corners
        for sign in (-1.0, 1.0):
            if rng.random() < 0.12:
                size = rng.uniform(1.5, 4.0)
                terms.append((ellipsoid(v.local(0.0, sign * (v.height / 2 + size * 0.3), v.ap / 2 + size * 0.4),
                                        v.frame, [v.width * 0.3, size * 0.6, size]), mu["cortical"] * 0.7))
    return Anatomy3D(vertebrae, terms + soft, outline, lumbar_count, mu)


# ------------------------------------------------------------------------------------------------------ implants


def implants(rng: np.random.Generator, anatomy: Anatomy3D) -> tuple[list[tuple[Convex, float]], list[str]]:
    """Metal and cement as excess attenuation terms, and what was placed ('screws L3-L5', 'cement L2', ...).

    Posterior fixation (a pedicle screw on each side of 2-4 adjacent levels, rods joining the heads), cement in a
    body, the marker pins of an interbody cage, and surgical clips in front of the spine, each by chance. Why:
    metal crossing the bodies is common in lumbar radiographs of older people, and a segmenter trained on bare
    spines fails on it; the truth (labels, plaque) is unchanged, as the label map outlines bone."""
    lumbar = [v for v in anatomy.vertebrae if 1 <= v.label <= len(kauppila.VERTEBRAE)]
    terms, placed = [], []

    def metal() -> float:
        """One implant's material."""
        return float(rng.uniform(*_METAL))

    if rng.random() < 0.15:
        first = int(rng.integers(0, len(lumbar) - 1))
        fixed = lumbar[first:first + int(rng.integers(2, 5))]
        density, heads = metal(), {-1.0: [], 1.0: []}
        for v in fixed:
            for side in (-1.0, 1.0):
                entry = v.local(side * 0.36 * v.width, -0.1 * v.height, -v.ap / 2 - rng.uniform(22.0, 30.0))
                tip = v.local(side * 0.1 * v.width, rng.uniform(-0.1, 0.1) * v.height, v.ap * rng.uniform(0.15, 0.35))
                radius = rng.uniform(2.75, 3.5)
                terms.append((tube(entry, tip, (radius, radius), v.frame[:, 1]), density))
                terms.append((ellipsoid(entry, v.frame, [5.0, 6.0, 5.0]), density))
                heads[side].append(entry)
        for ends in heads.values():
            for a, b in zip(ends[:-1], ends[1:]):
                terms.append((tube(a, b, (2.75, 2.75)), density))
        placed.append(f"screws {fixed[0].name}-{fixed[-1].name}")
    if rng.random() < 0.05:
        v = lumbar[int(rng.integers(0, len(lumbar)))]
        density = float(rng.uniform(0.04, 0.12))  # PMMA with barium: denser than trabecular bone, far below metal
        for _ in range(int(rng.integers(1, 4))):
            centre = v.local(*(rng.uniform(-0.2, 0.2, 3) * [v.width, v.height, v.ap]))
            terms.append((ellipsoid(centre, v.frame, rng.uniform(0.15, 0.3, 3) * [v.width, v.height, v.ap]), density))
        placed.append(f"cement {v.name}")
    if rng.random() < 0.05:
        k = int(rng.integers(0, len(lumbar) - 1))
        upper, lower = lumbar[k], lumbar[k + 1]
        centre = (upper.local(0.0, upper.height / 2, 0.0) + lower.local(0.0, -lower.height / 2, 0.0)) / 2
        for depth in (-0.3, 0.0, 0.3):
            pin = centre + upper.frame[:, 2] * depth * upper.ap
            pin_ends = (pin - upper.frame[:, 1] * 2.0, pin + upper.frame[:, 1] * 2.0)
            terms.append((tube(*pin_ends, (0.6, 0.6)), 1.0))  # tantalum: the cage itself (PEEK) barely shows
        placed.append(f"cage {upper.name}/{lower.name}")
    if rng.random() < 0.1:
        for _ in range(int(rng.integers(1, 7))):
            v = lumbar[int(rng.integers(0, len(lumbar)))]
            centre = v.local(rng.uniform(-60.0, 60.0), rng.uniform(-0.5, 0.5) * v.height, v.ap / 2 + rng.uniform(5, 150))
            direction = rng.normal(size=3)
            direction *= rng.uniform(3.0, 4.5) / np.linalg.norm(direction)
            radius = rng.uniform(0.5, 0.8)
            terms.append((tube(centre - direction, centre + direction, (radius, radius)), metal()))
        placed.append("clips")
    return terms, placed


# ------------------------------------------------------------------------------------------------------ the beam


def _beam_geometry(rng: np.random.Generator, anatomy: Anatomy3D) -> dict:
    """Source distance, object-detector distance, source side, obliquities, roll and facing."""
    half_width = float(np.interp(anatomy.vertebra("L3").centre[1], anatomy.outline["y"], anatomy.outline["skin"][0]))
    return dict(sid=rng.uniform(1000.0, 1800.0), oid=half_width + rng.uniform(20.0, 80.0),
                side=1.0 if rng.random() < 0.5 else -1.0,
                rotation=np.radians(np.clip(rng.normal(0.0, 3.0), -8.0, 8.0)),
                tilt=np.radians(np.clip(rng.normal(0.0, 2.0), -6.0, 6.0)),
                roll=np.radians(np.clip(rng.normal(0.0, 5.0), -12.0, 12.0)),
                facing=1.0 if rng.random() < 0.5 else -1.0,
                target=np.array([0.0, rng.uniform(-40.0, 40.0), rng.uniform(-20.0, 20.0)]),
                top=rng.random(2), bottom=rng.random(3), cols=rng.random(2), spacing=rng.uniform(*_SPACING_MM),
                back=rng.uniform(20.0, 70.0, 5))  # how much of the posterior elements the columns must show


def _make_beam(g: dict, isocentre: np.ndarray) -> ConeBeam:
    beam = rotation_matrix([0.0, 1.0, 0.0], g["rotation"]) @ rotation_matrix([0.0, 0.0, 1.0], g["tilt"]) @ \
        np.array([g["side"], 0.0, 0.0])
    down = np.array([0.0, 1.0, 0.0]) - beam[1] * beam
    down = rotation_matrix(beam, g["roll"]) @ (down / np.linalg.norm(down))
    across = np.cross(beam, down)
    if across[2] * g["facing"] < 0:  # facing +1: anterior towards increasing columns
        across = -across
    sod = g["sid"] - g["oid"]
    return ConeBeam(isocentre - beam * sod, isocentre, down, across, 1.0, np.zeros(2), (1, 1))


def _frame_detector(g: dict, beam: ConeBeam, anatomy: Anatomy3D, size_range: tuple[int, int]) -> ConeBeam:
    """Rows, columns, spacing and position of the detector window: top edge from T9 to just above L1, bottom edge
    from just below L5 (sacrum out of view, a quarter of the images) to the coccyx; L1..L5 and the aortic band in."""
    def extent(name: str) -> np.ndarray:
        return beam.project(anatomy.vertebra(name).rim)

    def span(name: str, which: int) -> tuple[float, float]:
        rc = extent(name)
        return float(rc[:, which].min()), float(rc[:, which].max())

    # the top edge stays above L1 and above where the aorta crosses the T12/L1 disc (the first segment's top)
    t12, l1 = anatomy.vertebra("T12"), anatomy.vertebra("L1")
    disc = (t12.local(0.0, t12.height / 2, 0.0) + l1.local(0.0, -l1.height / 2, 0.0)) / 2
    centre = anatomy.aorta["centre"]
    crossing = centre[np.argmin(np.abs((centre - disc) @ l1.frame[:, 1]))]
    radius = anatomy.aorta["radius"][0]
    aorta_top = beam.project(crossing + radius * np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]))[:, 0].min()
    first_free = min(extent("L1")[:, 0].min() - 2.0, aorta_top - 4.0)
    top_edge = _top_edge(g)
    if top_edge != "T12/L1":
        low, high = span(top_edge, 0)
        top = low + (high - low) * g["top"][1]
    else:
        top = span("T12", 0)[1] + (first_free - span("T12", 0)[1]) * g["top"][1]
    top = min(top, first_free)
    l5_bottom = extent("L5")[:, 0].max() + 1.5
    if not _sacrum_in_view(g):
        bottom = l5_bottom + 3.0 * g["bottom"][1]
    else:
        low, high = span("S1", 0)[1], extent("Co3")[:, 0].max()
        bottom = max(low + (high - low) * g["bottom"][1] ** 1.5, l5_bottom)
    rows = int(np.clip(round((bottom - top) / g["spacing"]), *size_range))
    spacing = (bottom - top) / rows
    lumbar = [anatomy.vertebra(n) for n in kauppila.VERTEBRAE]
    mean_ap = np.mean([v.ap for v in lumbar])
    needed = [extent(v.name) for v in lumbar]
    needed += [beam.project(v.local(0.0, 0.0, -v.ap / 2 - rng_back)[None]) for v, rng_back in
               zip(lumbar, g["back"])]
    needed += [beam.project(v.local(0.0, 0.0, v.ap / 2 + ANTERIOR_MARGIN * mean_ap + 8.0)[None]) for v in lumbar]
    needed = np.vstack(needed)[:, 1]
    cols = int(np.clip(round(rows * (0.72 + 0.28 * g["cols"][0])), *size_range))
    cols = max(cols, min(size_range[1], int(np.ceil((needed.max() - needed.min() + 10.0) / spacing))))
    width = cols * spacing
    lo, hi = needed.max() + 5.0 - width, needed.min() - 5.0
    left = lo + (hi - lo) * g["cols"][1] if hi > lo else (needed.max() + needed.min() - width) / 2
    centre_px = np.array([-top / spacing - 0.5, -left / spacing - 0.5])
    return ConeBeam(beam.source, beam.isocentre, beam.rows_axis, beam.cols_axis, spacing, centre_px, (rows, cols))


def _top_edge(g: dict) -> str:
    """Where the image's top edge lies: in T9, T10, T11, T12 or the T12/L1 disc."""
    choice = int(np.searchsorted(np.cumsum([0.2, 0.2, 0.2, 0.25]), g["top"][0], side="right"))
    return ("T9", "T10", "T11", "T12", "T12/L1")[choice]


def _sacrum_in_view(g: dict) -> bool:
    """A quarter of the images end between L5 and the top of the sacrum."""
    return bool(g["bottom"][0] >= 0.25)


def _detector(g: dict, anatomy: Anatomy3D, size_range: tuple[int, int]) -> ConeBeam:
    """The cone beam framed on the anatomy, its central ray moved to the middle of the framed detector."""
    target = anatomy.vertebra("L3").centre + g["target"]
    framed = _frame_detector(g, _make_beam(g, target), anatomy, size_range)
    middle = (np.array(framed.shape) / 2.0 - framed.centre_px) * framed.spacing
    target = target + middle[0] * framed.rows_axis + middle[1] * framed.cols_axis
    return _frame_detector(g, _make_beam(g, target), anatomy, size_range)


# ------------------------------------------------------------------------------------------------ labels, walls


def project_labels(beam: ConeBeam, anatomy: Anatomy3D) -> np.ndarray:
    """Each labelled body's projected silhouette; where two overlap, the longer path through bone wins."""
    projector = Projector(beam, 1)
    labels = np.zeros(beam.shape, np.uint8)
    best = np.zeros(beam.shape, np.float32)
    for v in anatomy.vertebrae:
        if not v.label:
            continue
        hit = projector.chord(v.outline)
        if hit is None:
            continue
        (r0, r1, c0, c1), length = hit
        region, lengths = labels[r0:r1, c0:c1], best[r0:r1, c0:c1]
        wins = length > lengths
        region[wins] = v.label
        lengths[wins] = length[wins]
    return labels


def _wall_directions(beam: ConeBeam, centre: np.ndarray) -> np.ndarray:
    """Unit vectors from the centreline to the anterior silhouette edge of the tube: across both the tube and the
    ray, pointing anteriorly."""
    tangent = np.gradient(centre, axis=0)
    rays = centre - beam.source
    w = np.cross(rays, tangent)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return w * np.sign(w[:, 2:3])


def projected_walls(beam: ConeBeam, aorta: dict) -> dict[str, np.ndarray]:
    """The aorta's anterior and posterior walls as drawn on the image (the tube's silhouette edges), (N, 2) px."""
    w = _wall_directions(beam, aorta["centre"])
    r = aorta["radius"][:, None]
    return {"A": beam.project(aorta["centre"] + r * w), "P": beam.project(aorta["centre"] - r * w)}


def _walls_in_view(geometry: SpineGeometry, walls: dict[str, np.ndarray], shape: tuple[int, int]) -> bool:
    """Whether both walls lie inside the image between the first and the last boundary line."""
    for wall in walls.values():
        spans = wall_segment_spans(wall, geometry.boundaries, geometry.boundary_directions)
        arc = arc_length(wall)
        inside = wall[(arc >= spans[0][0] - 1.0) & (arc <= spans[-1][1] + 1.0)]
        if np.any(inside < 1.0) or np.any(inside > np.array(shape) - 2.0):
            return False
    return True


def _band_clearance(geometry: SpineGeometry, walls: dict[str, np.ndarray]) -> float:
    """Smallest distance (px) by which both walls stay inside the Kauppila bands of L1..L4."""
    width = ANTERIOR_MARGIN * geometry.mean_ap_length_px
    clearance = np.inf
    for wall in walls.values():
        spans = wall_segment_spans(wall, geometry.boundaries, geometry.boundary_directions)
        arc = arc_length(wall)
        for segment, (top, bottom) in zip(geometry.segments, spans):
            inner = segment.polygon[0]
            along = segment.polygon[3] - inner
            normal = np.array([-along[1], along[0]]) / np.linalg.norm(along)
            normal = normal if (segment.polygon[1] - inner) @ normal > 0 else -normal
            depth = (wall[(arc >= top) & (arc <= bottom)] - inner) @ normal
            clearance = min(clearance, float(depth.min()), float(width - depth.max()))
    return clearance


# ------------------------------------------------------------------------------------------------------ plaques


def plaque_habit(rng: np.random.Generator) -> dict:
    """How one phantom's calcification looks, so that the scorer meets more than one kind of plaque: its habit
    (continuous lines, patches, or many small punctate specks), a density factor from faint to dense on the wall's
    attenuation and a wall thickness (mm) from thin to thick."""
    return dict(habit=str(rng.choice(HABITS, p=_HABIT_WEIGHTS)),
                density=float(np.exp(rng.uniform(np.log(0.3), np.log(1.6)))),
                thick_mm=float(np.exp(rng.uniform(np.log(1.0), np.log(4.0)))))


def _segment_plaques(rng: np.random.Generator, span: tuple[float, float], subscore: int,
                     habit: str) -> list[tuple[float, float]]:
    """Plaque intervals (mm) of one wall segment in the phantom's habit; the union still realises `subscore`."""
    if habit == "line" or subscore == 0:
        return place_plaques(rng, span, subscore)
    if habit == "patchy":
        return place_plaques(rng, span, subscore, int(rng.integers(2, 7)))
    # punctate: specks of about 1-4 mm, as many as the calcified length needs (3 to 12, fewer when they cannot fit)
    covered = np.mean(FRACTION_RANGES[subscore]) * (span[1] - span[0])
    count = int(np.clip(round(covered / rng.uniform(1.0, 4.0)), 3, 12))
    return place_plaques(rng, span, subscore, count, GAP_MM * rng.uniform(1.0, 2.0))


def _deposits(rng: np.random.Generator, targets: dict[str, int], walls: dict[str, np.ndarray], spacing: float,
              geometry: SpineGeometry, aorta: dict, iliacs: list, habit: str) -> list[dict]:
    """Scored plaques realising the targets on the projected walls (placed in mm along them, as the generator does),
    mapped back to the aorta's centreline; plus unscored ones above T12/L1 and on the iliac arteries (several
    small ones where the habit is not a line)."""
    deposits = []
    burden = sum(targets.values()) / 24.0
    for wall_name, wall in walls.items():
        arc = arc_length(wall) * spacing
        spans = wall_segment_spans(wall, geometry.boundaries, geometry.boundary_directions) * spacing
        pieces = []
        for level, span in zip(kauppila.SCORED_LEVELS, spans):
            pieces += [(level, a, b) for a, b in _segment_plaques(rng, tuple(span), targets[f"{level}{wall_name}"],
                                                                  habit)]
        if rng.random() < 0.15 + 0.6 * burden:  # calcification above the scored aorta (not counted)
            top = spans[0][0] - END_MARGIN_MM - rng.uniform(1.0, 10.0)
            for _ in range(1 if habit == "line" else int(rng.integers(1, 5))):
                length = rng.uniform(2.0, 12.0) if habit == "line" else rng.uniform(1.0, 5.0)
                if top - length <= 0:
                    break
                pieces.append((None, top - length, top))
                top -= length + rng.uniform(GAP_MM, 8.0)
        for level, start, end in pieces:
            s0, s1 = np.interp([start, end], arc, aorta["arc"])
            deposits.append(dict(wall=wall_name, level=level, start_px=start / spacing, end_px=end / spacing,
                                 centre=aorta["centre"], radius=aorta["radius"], s=(s0, s1)))
    for i, (line, radius) in enumerate(iliacs):
        if rng.random() < 0.1 + 0.6 * burden:
            s = arc_length(line)
            for _ in range(1 if habit == "line" else int(rng.integers(1, 4))):
                start = rng.uniform(5.0, s[-1] * 0.6)
                length = rng.uniform(3.0, 20.0) if habit == "line" else rng.uniform(1.0, 5.0)
                deposits.append(dict(wall=f"iliac{i}{'A' if rng.random() < 0.5 else 'P'}", level=None, centre=line,
                                     radius=np.full(len(line), radius), s=(start, min(s[-1], start + length))))
    return deposits


def _plaque_terms(beam: ConeBeam, deposit: dict, rng: np.random.Generator, look: dict,
                  habit: dict) -> list[tuple[Convex, float]]:
    """A deposit as short pieces of a tube wall sector: radially from the wall inwards by its thickness, around the
    wall's silhouette direction by +-alpha, so that it lines the wall drawn on the image. The pieces end on planes
    through the source and the wall's silhouette direction: each end then projects onto one line across the wall,
    so the plaque covers exactly its interval of the drawn wall however oblique the rays. Thickness, angle and
    density vary along it (patchy or smooth) but never vanish, so the whole interval reads as calcified. `habit`
    (plaque_habit) scales the density and sets the thickness of the phantom's plaque."""
    centre, radius = deposit["centre"], deposit["radius"]
    s_all = np.arange(len(centre)) * _STEP_MM  # centrelines are sampled every _STEP_MM of this parameter
    s0, s1 = deposit["s"]
    n = max(1, int(np.ceil((s1 - s0) / 2.5)))
    sign = -1.0 if deposit["wall"].endswith("P") else 1.0

    def at(s: float) -> np.ndarray:
        return np.array([np.interp(s, s_all, centre[:, j]) for j in range(3)])

    ends = []  # (point on the axis, unit normal of the end plane pointing down the deposit)
    for s in np.linspace(s0, s1, n + 1):
        point = at(s)
        tangent = at(s + 0.25) - at(s - 0.25)
        normal = np.cross(point - beam.source, np.cross(tangent, point - beam.source))  # along the tangent
        ends.append((point, normal / np.linalg.norm(normal), s))
    patchy = rng.random() < look["patchy"]
    thick = float(np.clip(habit["thick_mm"] * rng.uniform(0.8, 1.25), 1.0, 5.0))
    alpha = np.radians(rng.uniform(25.0, 70.0))
    density = rng.uniform(0.02, 0.08) * habit["density"]
    terms = []
    for (p0, n0, a), (p1, n1, b) in zip(ends[:-1], ends[1:]):
        r = float(np.interp(0.5 * (a + b), s_all, radius))
        axis = (p1 - p0) / np.linalg.norm(p1 - p0)
        w = np.cross((p0 + p1) / 2 - beam.source, axis)
        w = sign * w / np.linalg.norm(w) * (1.0 if w[2] >= 0 else -1.0)
        e2 = np.cross(axis, w)
        vary = rng.uniform(0.4, 1.6) if patchy else rng.uniform(0.85, 1.15)
        t = float(np.clip(thick * vary, 0.4, 0.8 * r))
        half = float(np.clip(alpha * (rng.uniform(0.6, 1.3) if patchy else 1.0), np.radians(20.0), np.radians(80.0)))
        weight = density * (rng.uniform(0.5, 1.3) if patchy else rng.uniform(0.9, 1.1))
        planes = [(-np.sin(half) * w + np.cos(half) * e2, p0), (-np.sin(half) * w - np.cos(half) * e2, p0),
                  (-n0, p0), (n1, p1)]
        for rad, wt in ((r, weight), (r - t, -weight)):
            shape = tube(p0 - 3.0 * axis, p1 + 3.0 * axis, (rad, rad), w)
            for normal, point in planes:
                shape = shape.cut(normal, point)
            terms.append((shape, wt))
    return terms


# ------------------------------------------------------------------------------------------------------ imaging


def _outline_chord(beam: ConeBeam, dirs: np.ndarray, outline: dict, key: str) -> np.ndarray:
    """Path length through an elliptic cylinder along y whose half-width and front/back vary with y (taken where
    each ray crosses the mid-sagittal plane: the outline changes slowly)."""
    d = dirs.reshape(3, -1)
    o = beam.source
    t_mid = -o[0] / d[0]
    y = o[1] + t_mid * d[1]
    half, back, front = (np.interp(y, outline["y"], values) for values in outline[key])
    zc, hz = (back + front) / 2, (front - back) / 2
    ox, oz = o[0] / half, (o[2] - zc) / hz
    dx, dz = d[0] / half, d[2] / hz
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - 1.0
    disc = np.maximum(b * b - a * c, 0.0)
    return (2.0 * np.sqrt(disc) / a).reshape(dirs.shape[1:]).astype(np.float32)


def _render(beam: ConeBeam, anatomy: Anatomy3D, plaques: list, factor: int, collimation: np.ndarray,
            rng: np.random.Generator):
    """Line integrals of attenuation: smooth anatomy (and the collimator's) on the coarse grid, upsampled;
    trabecular texture and plaque on the detector grid. `plaques` are (counted, term) pairs. Returns the line
    integrals, the mask of counted plaque (on the L1..L4 walls) and the coarse mask of the body."""
    coarse = Projector(beam, factor, keep_rays=True)
    outline = anatomy.outline
    fat = _MU_SOFT + anatomy.mu["fat"]
    skin = _outline_chord(beam, coarse.dirs, outline, "skin")
    integral = fat * skin + collimation
    integral += (_MU_SOFT - fat) * _outline_chord(beam, coarse.dirs, outline, "muscle")
    terms = list(anatomy.terms)
    for v in anatomy.vertebrae:
        terms += v.bone
    coarse.accumulate(integral, terms)
    core = np.zeros_like(integral)
    coarse.accumulate(core, [t for v in anatomy.vertebrae for t in v.core])
    integral = upsample(integral, factor, beam.shape)
    # the cores get texture on the detector grid, only over the rows and columns they cover
    rows, cols = np.nonzero(core.any(axis=1))[0], np.nonzero(core.any(axis=0))[0]
    r0, c0 = max(rows.min() - 2, 0), max(cols.min() - 2, 0)
    r1, c1 = min(rows.max() + 3, core.shape[0]), min(cols.max() + 3, core.shape[1])
    window = (slice(r0 * factor, min(r1 * factor, beam.shape[0])), slice(c0 * factor, min(c1 * factor, beam.shape[1])))
    shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    core = upsample(core[r0:r1, c0:c1], factor, shape)
    spacing = beam.spacing
    stretch = rng.uniform(1.0, 2.0)  # vertical trabeculae: the texture runs along the spine
    grain = rng.uniform(0.2, 0.4) / spacing
    texture = smooth_noise(rng, shape, (grain * stretch, grain))
    texture += 0.7 * smooth_noise(rng, shape, rng.uniform(0.8, 1.6) / spacing)
    texture *= np.float32(rng.uniform(0.04, 0.14))
    texture += 1.0
    core *= texture
    integral[window] += core
    del core, texture
    fine = Projector(beam, 1)
    counted = np.zeros(beam.shape, np.float32)
    fine.accumulate(counted, [term for scored, term in plaques if scored])
    integral += counted
    fine.accumulate(integral, [term for scored, term in plaques if not scored])
    return integral, counted > 1e-4, skin > 30.0


def _expose(integral: np.ndarray, beam: ConeBeam, factor: int, spine: np.ndarray, rng: np.random.Generator):
    """Beer–Lambert primary intensity with beam hardening, heel effect, scatter, quantum and electronic noise,
    detector blur and the log transform: the log-domain image (bone high), in place of `integral`.

    Exposure is set by the photons reaching the detector behind the spine (`spine`: a mask of its pixels). Scatter
    follows scatter-kernel superposition: each pixel's primary times its path (in attenuation lengths) spread by a
    broad kernel, scaled to a scatter-to-primary ratio behind the spine; air scatters nothing.
    """
    step = max(1, min(beam.shape) // 300)
    # beam hardening of a polyenergetic spectrum: thick paths attenuate less per mm than thin ones
    hardening = np.float32(rng.uniform(0.0, 0.05))
    integral /= 1.0 + hardening * integral
    reference = float(np.median(integral[::step, ::step][spine[::step, ::step]]))
    photons = float(np.exp(rng.uniform(np.log(40.0), np.log(4000.0))))  # behind the spine, per pixel
    angle = rng.uniform(0.0, 2 * np.pi)
    r = np.linspace(-0.5, 0.5, beam.shape[0], dtype=np.float32)[:, None]
    c = np.linspace(-0.5, 0.5, beam.shape[1], dtype=np.float32)[None, :]
    heel = np.float32(rng.uniform(0.0, 0.3))
    gain = np.float32(photons) * (1.0 + heel * (np.float32(np.cos(angle)) * r + np.float32(np.sin(angle)) * c))
    f = max(factor, 2)
    path = integral[f // 2::f, f // 2::f].copy()  # attenuation lengths, before the intensity replaces them
    integral -= np.float32(reference)
    integral *= -1.0
    np.exp(integral, out=integral)
    integral *= gain
    primary = integral
    small = primary[f // 2::f, f // 2::f]
    scatter = blur(small * path, rng.uniform(30.0, 90.0) / (beam.spacing * f))
    np.maximum(scatter, 0.0, out=scatter)  # the blur rings slightly below zero; scatter is never negative
    ratio = float(np.median((scatter / np.maximum(small, 1e-6))[::max(1, step // f), ::max(1, step // f)][
        spine[f // 2::f, f // 2::f][::max(1, step // f), ::max(1, step // f)]]))
    wanted = np.float32(rng.uniform(0.2, 2.0))
    # scaled to the wanted scatter-to-primary ratio; a ratio near zero (no scatter behind the spine) would blow up
    scatter *= wanted / ratio if ratio > 1e-3 else np.float32(0.0)
    primary += upsample(scatter, f, beam.shape)
    noise = rng.standard_normal(beam.shape, dtype=np.float32)
    noise *= np.sqrt(np.maximum(primary, 0.0) + np.float32(rng.uniform(0.3, 3.0) ** 2))
    primary += noise
    del noise
    blur_px = rng.uniform(0.05, 0.25) / beam.spacing
    if blur_px > 0.3:
        primary = ndimage.gaussian_filter(primary, blur_px, truncate=2.0)
    np.maximum(primary, 0.5, out=primary)
    np.log(primary, out=primary)
    primary *= -1.0
    primary += np.float32(np.log(photons) + reference)
    return primary


# ------------------------------------------------------------------------------------------------------ phantom


def _draw_scene(rng: np.random.Generator, size_range: tuple[int, int], what: str):
    """Anatomy, beam, labels, their geometry and the projected walls, redrawn until the geometry of the labels
    succeeds and the aorta's walls lie inside the Kauppila band and the image; with the count of rejected draws."""
    rejected = dict(geometry=0, aorta=0)
    for _ in range(25):
        anatomy = build_anatomy_3d(rng)
        g = _beam_geometry(rng, anatomy)
        max_gap = 25.0
        anatomy.aorta, anatomy.iliacs = _aorta(anatomy.vertebrae, rng, max_gap)
        beam = _detector(g, anatomy, size_range)
        labels = project_labels(beam, anatomy)
        anterior = np.array([beam.rows_axis @ [0, 0, 1.0], beam.cols_axis @ [0, 0, 1.0]])
        try:
            geometry = analyze_spine(vertebra_labels(labels), (beam.spacing, beam.spacing), anterior=anterior)
        except GeometryError:
            rejected["geometry"] += 1
            continue
        for _ in range(10):  # redraw the aorta, closer to the spine, until both walls lie in the Kauppila band
            walls = projected_walls(beam, anatomy.aorta)
            try:
                if _band_clearance(geometry, walls) > 1.0 / beam.spacing and _walls_in_view(geometry, walls,
                                                                                            beam.shape):
                    return anatomy, g, beam, labels, geometry, walls, rejected
            except ValueError:  # a wall misses a boundary line
                pass
            max_gap *= 0.6
            anatomy.aorta, anatomy.iliacs = _aorta(anatomy.vertebrae, rng, max_gap)
        rejected["aorta"] += 1
    raise RuntimeError(f"no usable projected anatomy for {what} in 25 draws")


def generate_projected(seed: int, index: int = 0, severity: Sequence[float] = DEFAULT_SEVERITY,
                       size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> Phantom:
    """One phantom of the projected family, fully determined by (seed, index, severity, size_range).

    The phantom carries `plaque_mask` (bool, image shape): the detector pixels whose rays cross drawn plaque.
    """
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    rng = np.random.default_rng([seed, index, _CODE])
    targets = target_subscores(seed, index, _CODE, rng, severity)
    anatomy, g, beam, labels, geometry, walls, rejected = _draw_scene(rng, size_range, f"seed {seed} index {index}")

    metal, placed = implants(np.random.default_rng([seed, index, _CODE, _IMPLANT_STREAM]), anatomy)
    anatomy.terms += metal
    look = drawn_look(rng, rng.random() < 0.5)
    # thickness from belly to back spans several times the bone contrast: processing compresses it strongly
    look.update(latitude=rng.uniform(0.05, 0.3), eq_sigma_mm=rng.uniform(6.0, 25.0), detail=rng.uniform(1.2, 2.0))
    plaque_rng = np.random.default_rng([seed, index, _CODE, _PLAQUE_STREAM])
    habit = plaque_habit(plaque_rng)
    deposits = _deposits(plaque_rng, targets, walls, beam.spacing, geometry, anatomy.aorta, anatomy.iliacs,
                         habit["habit"])
    plaques = [(d["level"] is not None, t) for d in deposits for t in _plaque_terms(beam, d, plaque_rng, look, habit)]
    factor = max(1, int(round(_RENDER_MM / beam.spacing)))
    place = Placement(np.eye(2), np.zeros(2), beam.spacing, beam.shape, factor)
    key_px = np.vstack([beam.project(anatomy.vertebra(n).rim) for n in kauppila.VERTEBRAE]
                       + [walls["A"], walls["P"]])
    key_px = key_px[(key_px[:, 0] > 0) & (key_px[:, 0] < beam.shape[0])]
    collimation, shutter, field_ = collimate(rng, place, key_px)
    integral, plaque_mask, body = _render(beam, anatomy, plaques, factor, collimation, rng)
    signal = _expose(integral, beam, factor, (labels > 0) & (labels <= 5), rng)
    # exposure recognition: the processing maps the anatomy's range, direct exposure outside the body goes black
    half = (factor - 1) // 2
    inside = signal[half::factor, half::factor][body[:(beam.shape[0] - half + factor - 1) // factor,
                                                     :(beam.shape[1] - half + factor - 1) // factor]]
    np.maximum(signal, np.percentile(inside, 0.5), out=signal)
    bits = int(rng.choice([12, 14, 15, 16]))
    pixels = display_pixels(signal, beam.spacing, factor, look, rng, bits, shutter, field_)
    del signal
    magnification = g["sid"] / beam.source_distance
    settings = dicom_settings(rng, seed, index, FAMILY, place, dict(facing=g["facing"]), bits)
    settings["magnification"] = round(float(magnification), 4)
    marker_value = int((2**bits - 1) * look["headroom"])
    settings["markers"] = burn_in_markers(rng, pixels, place, key_px, field_, settings["marker_letter"], marker_value)
    truth = _truth(geometry, walls, deposits, targets, anatomy, beam, g, labels, settings)
    truth.update(name=phantom_name(seed, index, FAMILY), seed=seed, index=index, style=FAMILY, family=FAMILY,
                 rejected_draws=rejected, implants=placed, plaque={k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in habit.items()})
    return Phantom(truth["name"], pixels, labels, truth, settings, plaque_mask)


def _truth(geometry: SpineGeometry, walls: dict, deposits: list[dict], targets: dict[str, int], anatomy: Anatomy3D,
           beam: ConeBeam, g: dict, labels: np.ndarray, settings: dict) -> dict:
    """Ground truth in image pixels: the geometry of the true label map and the plaques measured along the walls."""
    fractions, subscores = {}, {}
    for wall_name, wall in walls.items():
        spans = [(d["start_px"], d["end_px"]) for d in deposits if d["wall"] == wall_name]
        measured = calcified_fractions(wall, spans, geometry.boundaries, geometry.boundary_directions)
        for level, fraction in zip(kauppila.SCORED_LEVELS, measured):
            fractions[f"{level}{wall_name}"] = fraction
            subscores[f"{level}{wall_name}"] = kauppila.wall_subscore(min(fraction, 1.0))
    if subscores != targets:
        raise AssertionError(f"drawn subscores {subscores} differ from the targets {targets}")

    def r(x):
        return np.round(np.asarray(x, float), 3).tolist()

    aac24 = kauppila.total_score(subscores)
    present = set(np.unique(labels).tolist())
    t12_height = float(np.linalg.norm(geometry.vertebrae[0].superior_mid - geometry.t12_inferior_border))
    return dict(
        image_shape=list(beam.shape), spacing=[beam.spacing, beam.spacing],
        anterior="right" if geometry.anterior[1] > 0 else "left", anterior_vector=r(geometry.anterior),
        inferior_vector=r(geometry.inferior), rotation_deg=round(float(np.degrees(g["roll"])), 3),
        vertebrae={v.name: {k: r(p) for k, p in v.corners.items()} for v in geometry.vertebrae},
        boundary_names=list(BOUNDARY_NAMES), boundaries=r(geometry.boundaries),
        boundary_directions=r(geometry.boundary_directions), t12_l1_extrapolated=r(geometry.boundaries[0]),
        t12_disc_height_extrapolated_px=round(t12_height, 3), mean_ap_px=round(geometry.mean_ap_length_px, 3),
        segments={s.level: r(s.polygon) for s in geometry.segments},
        aorta={"anterior_wall": r(walls["A"]), "posterior_wall": r(walls["P"]),
               "diameter_mm": round(anatomy.aorta["diameter"], 3)},
        deposits=[dict(wall=d["wall"], level=d["level"], start_px=round(d["start_px"], 3), end_px=round(d["end_px"], 3))
                  for d in deposits if "start_px" in d],
        fractions={k: round(v, 6) for k, v in fractions.items()}, subscores=subscores, aac24=aac24,
        category=kauppila.category(aac24),
        transitional={4: "sacralised L5", 5: "", 6: "L6"}[anatomy.lumbar_count], lumbar_vertebrae=anatomy.lumbar_count,
        context_labels={name: label in present for name, label in kauppila.CONTEXT_LABELS.items()},
        field_of_view=dict(top_edge_in=_top_edge(g), sacrum_in_view=_sacrum_in_view(g)),
        projection=dict(source_image_mm=round(g["sid"], 1), source_object_mm=round(beam.source_distance, 1),
                        magnification=settings["magnification"], source_side="left" if g["side"] > 0 else "right",
                        rotation_deg=round(float(np.degrees(g["rotation"])), 3),
                        tilt_deg=round(float(np.degrees(g["tilt"])), 3)),
        dicom={k: v for k, v in settings.items() if k not in ("uids",)},
    )
