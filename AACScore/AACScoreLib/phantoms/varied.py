"""The "varied" family: other anatomy models and other image formation than the drawn families, held out of
all training of the shipped models so that it measures how they meet a generator they have not seen.

Anatomy: T8 down to the coccyx with per-body height, width and wedging, compression fractures (wedge, crush,
biconcave), endplate concavity and sclerosis, osteophytes, narrow degenerated discs, scoliotic rotation (double
endplates), ribs on T10..T12 that may be short, faint or absent from view, the sacrum drawn four ways, transitional
lumbosacral anatomy, a tortuous aorta 0-25 mm in front of the spine, high or low iliac crests, bowel gas over the
aorta, implants and clips. Calcification: continuous lines, patchy and punctate deposits, faint to dense, 1-5 mm
thick, plus deposits above L1, below L4/L5 and on the iliac arteries that do not count. Image: field of view with
its top anywhere from T9 to L1 and its bottom from just below L5 to the coccyx (the sacrum out of view in about a
quarter), DXA-like low resolution images, 0.08-0.25 mm per pixel radiographs, rotation to +-20 degrees, both
facings, collimation, grids, burned-in text, unsharp masking, equalisation, contrast curves and inverted looks.

Numbering (the truth follows it): L1 is the first vertebra below the lowest rib-bearing one, L1..L5 counted
downwards. A sixth lumbar-type vertebra is "L6" (unlabelled, 0 in the label map); a sacralised L5 (four free
lumbar-type vertebrae, the fifth fused with the sacrum) counts as L5. Both are marked in truth["transitional"].

The "site" family is this one with the look drawn once per site instead of once per image (`generate_site`): a
site's cohort looks alike, which is what fine-tuning on a group's own cases meets; it is held out too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import kauppila
from .anatomy import (CORNER_NAMES, Anatomy, Body, Placement, aorta, curve_normals, disc_boundaries, draw_dense,
                      endplate_mid, lay_out_spine, posterior_elements, rounded, sacrum_outline, smooth_curve, unit)
from .drawn import (CONTEXT_VALUES, LABEL_VALUES, burn_in_markers, dicom_settings, draw_deposits, drawn_look,
                    form_image, process)
from .truth import (END_MARGIN_MM, FRACTION_RANGES, GAP_MM, Phantom, arc_length, band_clearance, lay_out_pieces,
                    measure_truth, phantom_name, target_subscores, wall_segment_spans)

FAMILY = "varied"
_FAMILY_CODE = 2  # seeds the family's random stream apart from default (0) and alt (1)
SITE_FAMILY = "site"
SITE_SEEDS = 100  # seeds s*100 .. s*100+99 are one site's images, so a training seed and the next test seed share it
_SITE_CODE = 7  # seeds a site's look apart from any image's stream
THORACIC: tuple[str, ...] = ("T8", "T9", "T10", "T11", "T12")
_HEIGHT_MM = dict(T8=19.5, T9=20.5, T10=21.5, T11=23.0, T12=24.5, L1=26.0, L2=27.0, L3=27.5, L4=27.5, L5=26.5,
                  L6=26.0, S1=24.0)
_AP_MM = dict(T8=27.0, T9=28.0, T10=29.0, T11=31.0, T12=33.0, L1=35.0, L2=37.0, L3=38.5, L4=39.5, L5=40.0, L6=40.0,
              S1=38.0)
TRANSITIONAL: dict[str, float] = {"": 0.84, "L6": 0.08, "sacralised L5": 0.08}  # about 18 % in people
SACRUM_STYLES: tuple[str, ...] = ("block", "fused", "segmented", "through iliac wings")
SACRUM_OUT_SHARE = 0.3  # fields meant to end between L5 and the sacrum (a few keep a sliver of S1)
TOP_AT_L1_SHARE = 0.15  # images whose top edge lies just above L1
DXA_SHARE = 0.15
INVERTED_SHARE = 0.15  # bone dark in the stored display values (besides MONOCHROME1 files)


def generate_varied(seed: int, index: int, severity: Sequence[float], size_range: tuple[int, int],
                    site: int | None = None) -> Phantom:
    """One phantom of the varied family, fully determined by its arguments. With `site`, the phantom is of the
    "site" family instead: the same anatomy and plaque, and the look every image of that site shares."""
    rng = np.random.default_rng([seed, index, _FAMILY_CODE])

    def look_rng(part: int) -> np.random.Generator:  # a site draws each part of its look from a stream of its own
        return rng if site is None else np.random.default_rng([site, _FAMILY_CODE, _SITE_CODE, part])

    family = FAMILY if site is None else SITE_FAMILY
    targets = target_subscores(seed, index, _FAMILY_CODE, rng, severity)
    for _ in range(30):  # redraw the rare anatomy whose aorta does not cross the segment boundaries in order
        anatomy, info = build_varied_anatomy(rng)
        bounds_mm, dirs_mm = disc_boundaries({n: dict(zip(CORNER_NAMES, b.corners)) for n, b in anatomy.bodies.items()})
        try:
            spans = {w: wall_segment_spans(wall, bounds_mm, dirs_mm)
                     for w, wall in (("A", anatomy.aorta_anterior), ("P", anatomy.aorta_posterior))}
        except ValueError:
            continue
        break
    else:
        raise RuntimeError(f"no varied anatomy with a usable aorta for seed {seed} index {index}")
    deposits = varied_deposits(rng, anatomy, targets, spans)
    site_look = look_rng(0)
    info["dxa_like"] = bool(site_look.random() < DXA_SHARE)
    look = varied_look(site_look, info)

    acq = varied_acquisition(rng, size_range, anatomy, spans, info)
    place, att, label_map, shutter, field_ = form_image(anatomy, acq, look, rng)
    hidden = _shutter_edges(label_map, anatomy, place, info)
    draw_dense(att, anatomy, place)
    plaque_mask = draw_deposits(att, anatomy, place, look, rng, deposits)
    if hidden is not None:
        plaque_mask &= ~hidden

    site_detector = look_rng(1)
    bits = 8 if info["dxa_like"] else int(site_detector.choice([10, 12, 14, 16]))
    pixels = process(att, place, look, rng, bits, shutter, field_)
    del att
    if hidden is not None:  # a straight shutter edge, blanked black or white by the processing
        pixels[hidden] = 0 if rng.random() < 0.5 else int((2**bits - 1) * look["headroom"])
    info["inverted_look"] = bool(site_detector.random() < INVERTED_SHARE)
    if info["inverted_look"]:
        pixels = (2**bits - 1 - pixels).astype(np.uint16)
    settings = dicom_settings(look_rng(2), seed, index, family, place, acq, bits)
    settings["markers"] = burn_in_markers(rng, pixels, place, acq["key_px"], field_, settings["marker_letter"],
                                          2**bits - 1)
    truth = measure_truth(anatomy, place, acq, deposits, targets, settings)
    s1_area = _polygon_area(place.px(anatomy.bodies["S1"].corners))
    t12_area = _polygon_area(place.px(anatomy.bodies["T12"].corners))
    info.update(t12_in_view_fraction=round(float((label_map == CONTEXT_VALUES["T12"]).sum() / t12_area), 4),
                s1_in_view_fraction=round(float((label_map == CONTEXT_VALUES["S1"]).sum() / s1_area), 4),
                aorta_band_clearance_mm=round(float(band_clearance(anatomy, bounds_mm, dirs_mm)), 2),
                counted_deposits=sum(1 for d in deposits if d["level"]),
                excluded_deposits=sum(1 for d in deposits if not d["level"]))
    info["sacrum_in_view"] = info["s1_in_view_fraction"] > 0
    info["t12_in_view"] = info["t12_in_view_fraction"] > 0
    if site is not None:
        info["site"] = site
    truth.update(name=phantom_name(seed, index, family), seed=seed, index=index, style=family, family=family,
                 transitional=info.pop("transitional"), varied=info)
    return Phantom(truth["name"], pixels, label_map, truth, settings, plaque_mask)


def generate_site(seed: int, index: int, severity: Sequence[float], size_range: tuple[int, int]) -> Phantom:
    """One phantom of the "site" family: varied anatomy, plaque, positioning and field of view per image, and one
    look per site (seed // SITE_SEEDS): densities, processing, detector, DXA-like or not, inversion and DICOM
    encoding, as one site's protocol gives. It measures fine-tuning on a cohort that looks alike."""
    return generate_varied(seed, index, severity, size_range, site=seed // SITE_SEEDS)


def _shutter_edges(label_map: np.ndarray, anatomy: Anatomy, place: Placement, info: dict) -> np.ndarray | None:
    """Pixels beyond straight shutter edges laid along the T12/L1 disc (images starting at L1) or the L5/S1 disc
    (sacrum cut, where S1 still shows above the bottom row); their context labels are cleared. Each edge is moved
    away from the kept vertebra until none of its pixels lies beyond it, so L1..L5 stay whole."""
    b = anatomy.bodies
    edges = []
    if info.get("top_at_l1") and (label_map == CONTEXT_VALUES["T12"]).any():
        edges.append((b["L1"], b["T12"], LABEL_VALUES["L1"]))
    if info.get("sacrum_cut") and (label_map == CONTEXT_VALUES["S1"]).any():
        edges.append((b["L5"], b["S1"], LABEL_VALUES["L5"]))
    if not edges:
        return None
    rows = np.arange(label_map.shape[0], dtype=np.float32)[:, None]
    cols = np.arange(label_map.shape[1], dtype=np.float32)[None, :]
    hidden = np.zeros(label_map.shape, bool)
    for kept, gone, kept_value in edges:  # the disc mid-plane, as the Kauppila boundaries define it
        upper, lower = (gone, kept) if gone is b["T12"] else (kept, gone)
        points, planes = disc_boundaries({"U": dict(zip(CORNER_NAMES, place.px(upper.corners))),
                                          "D": dict(zip(CORNER_NAMES, place.px(lower.corners)))}, [("U", "D")])
        point, plane = points[0], planes[0]
        normal = np.array([-plane[1], plane[0]])
        normal *= 1.0 if normal @ (place.px(gone.center[None])[0] - point) > 0 else -1.0
        distance = (rows - point[0]) * np.float32(normal[0]) + (cols - point[1]) * np.float32(normal[1])
        kept_pixels = distance[label_map == kept_value]
        shift = max(0.0, float(kept_pixels.max()) + 1.0) if kept_pixels.size else 0.0
        hidden |= distance > shift
    label_map[hidden & (label_map > max(LABEL_VALUES.values()))] = 0
    return hidden


def _polygon_area(poly: np.ndarray) -> float:
    return 0.5 * abs(float(np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])))


# ------------------------------------------------------------------------------------------------------ anatomy


def build_varied_anatomy(rng: np.random.Generator) -> tuple[Anatomy, dict]:
    """The spine, sacrum, aorta and surroundings of one varied phantom, and what was chosen (for the truth)."""
    transitional = str(rng.choice(list(TRANSITIONAL), p=list(TRANSITIONAL.values())))
    lumbar = kauppila.VERTEBRAE + (("L6",) if transitional == "L6" else ())
    names = THORACIC + lumbar + ("S1",)
    scale = rng.uniform(0.85, 1.15)
    width = rng.uniform(0.85, 1.15)  # slender or stocky bodies
    heights = {n: _HEIGHT_MM[n] * scale * rng.normal(1.0, 0.06) for n in names}
    aps = {n: _AP_MM[n] * scale * width * rng.normal(1.0, 0.06) for n in names}
    h0, dh = rng.uniform(3.5, 9.0) * scale, rng.uniform(0.2, 1.4) * scale
    discs = {f"{a}/{b}": max(1.0, (h0 + dh * (k - 4)) * rng.normal(1.0, 0.08))
             for k, (a, b) in enumerate(zip(names[:-1], names[1:]))}
    degenerated = [key for key in list(discs)[3:] if rng.random() < 0.2]
    for key in degenerated:  # narrow, degenerated discs
        discs[key] *= rng.uniform(0.2, 0.6)
    wedge = {n: rng.uniform(-2.0, 0.0) * scale for n in THORACIC}
    wedge.update({n: rng.uniform(-0.5, 2.0) * scale for n in lumbar})
    wedge[lumbar[-1]] = rng.uniform(1.5, 6.0) * scale
    fractures = {}
    for name in ("T11", "T12") + lumbar:
        if rng.random() < 0.05:
            kind = str(rng.choice(["wedge", "crush", "biconcave"]))
            fractures[name] = kind
            if kind == "wedge":
                wedge[name] -= rng.uniform(0.2, 0.45) * heights[name]
            elif kind == "crush":
                heights[name] *= rng.uniform(0.55, 0.8)
    if transitional == "sacralised L5":  # L5 low and trapezoid, fused to the sacrum across a vestigial disc
        heights["L5"] *= rng.uniform(0.8, 0.95)
        aps["L5"] *= rng.uniform(1.0, 1.1)
        wedge["L5"] = rng.uniform(4.0, 8.0) * scale
        discs["L5/S1"] = rng.uniform(0.3, 2.0)
    bodies = lay_out_spine(rng, names, heights, aps, discs, wedge, junction_deg=(0.0, 30.0),
                           lordosis_deg=(20.0, 75.0), power=(0.8, 2.0))
    _shape_bodies(rng, bodies, fractures, degenerated)
    sacrum_style = str(rng.choice(SACRUM_STYLES))
    sacrum = sacrum_outline(bodies["S1"], rng)
    tortuosity = rng.uniform(0.0, 17.0) if rng.random() < 0.5 else rng.uniform(0.0, 4.0)
    phase, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.9)
    levels = THORACIC[2:] + kauppila.VERTEBRAE
    offsets = {n: tortuosity * 0.5 * (1.0 + np.sin(phase + k * frequency)) for k, n in enumerate(levels)}
    anatomy = Anatomy(bodies, discs, *aorta(bodies, rng, levels, gap_mm=(0.3, 8.0), diameter_mm=(12.0, 24.0),
                                            offsets=offsets, min_diameter_mm=10.0), sacrum=sacrum)
    posterior_elements(anatomy, rng, scale, names)
    _sacrum_style(rng, anatomy, sacrum_style)
    info = dict(transitional=transitional, sacrum_style=sacrum_style, fractures=fractures,
                degenerated_discs=degenerated, tortuosity_mm=round(float(tortuosity), 2))
    info.update(_surroundings(rng, anatomy, scale, transitional))
    info["implants"] = _implants(rng, anatomy, lumbar)
    return anatomy, info


def _shape_bodies(rng: np.random.Generator, bodies: dict[str, Body], fractures: dict[str, str],
                  degenerated: list[str]) -> None:
    """Per-body looks: biconcave fractures, concave or sclerotic endplates, scoliotic double endplates."""
    scoliosis = rng.uniform(0.5, 4.0) if rng.random() < 0.35 else 0.0
    phase = rng.uniform(0, 2 * np.pi)
    sclerotic = {name for key in degenerated for name in key.split("/")}
    for k, (name, body) in enumerate(bodies.items()):
        style = {"endplate_concavity_mm": rng.uniform(0.0, 1.5), "double_endplate_mm": 0.0}
        if scoliosis:
            style["double_endplate_mm"] = scoliosis * abs(np.sin(phase + 0.5 * k))
        if fractures.get(name) == "biconcave":
            style["endplate_concavity_mm"] = rng.uniform(2.0, 5.0)
        if name in sclerotic:
            style["cortex"] = rng.uniform(0.8, 1.3)
        body.style = style


def _sacrum_style(rng: np.random.Generator, anatomy: Anatomy, style: str) -> None:
    """S1 and the sacrum below it drawn one of four ways; S1 is always the labelled top sacral segment."""
    s1 = anatomy.bodies["S1"]
    if style == "fused":  # S1 merges with the sacrum: faint cortex, dense sacrum
        s1.style.update(cortex=rng.uniform(0.08, 0.25), trabecular=rng.uniform(0.5, 0.8))
        anatomy.sacrum_density = rng.uniform(0.8, 1.0)
    elif style == "segmented":  # S2 and S3 as separate small blocks behind vestigial discs
        anatomy.sacrum_density = rng.uniform(0.25, 0.5)
        upper = s1
        for name, size in (("S2", 0.8), ("S3", 0.62)):
            t = unit(upper.tangent - 0.25 * upper.normal)
            n = np.array([-t[1], t[0]])
            h, ap = upper.height * size, upper.ap * size
            top = endplate_mid(upper, "inferior") + t * rng.uniform(1.0, 3.0)
            corners = np.array([top + n * ap / 2, top - n * ap / 2, top - n * ap / 2 + t * h * 0.9,
                                top + n * ap / 2 + t * h])
            upper = anatomy.bodies[name] = Body(name, corners, t, n, h, ap, {"cortex": rng.uniform(0.2, 0.5)})
    elif style == "through iliac wings":  # faint sacrum behind dense overlapping wings
        s1.style.update(trabecular=rng.uniform(0.15, 0.35), cortex=rng.uniform(0.2, 0.45))
        anatomy.sacrum_density = rng.uniform(0.3, 0.5)


def _surroundings(rng: np.random.Generator, anatomy: Anatomy, scale: float, transitional: str) -> dict:
    """Ribs, iliac crests, lung bases, bowel gas (often over the aorta) and osteophytes; returns what was drawn."""
    b = anatomy.bodies
    ribs = []
    visible = rng.random() > 0.2  # ribs cropped, faint or absent from view in a fifth
    for name in ("T10", "T11", "T12"):
        for _ in range(2 if visible and rng.random() < 0.85 else 0):
            start = b[name].local(rng.uniform(-8, 8), -b[name].ap / 2 - rng.uniform(10, 25))
            angle = np.radians(rng.uniform(15.0, 55.0))
            short = name == "T12" and rng.random() < 0.4  # hypoplastic twelfth rib
            length = (rng.uniform(25.0, 70.0) if short else rng.uniform(80.0, 190.0)) * scale
            d = np.array([np.sin(angle), np.cos(angle)])
            sag = np.array([-d[1], d[0]]) * rng.uniform(-30.0, 5.0)
            k = np.linspace(0.0, 1.0, 24)[:, None]
            ribs.append((start + d * length * k + sag * 4 * k * (1 - k), rng.uniform(6.0, 12.0) * scale))
    anatomy.ribs = ribs
    l4, l5 = b["L4"], b["L5"]
    crest_level = rng.uniform(-1.2, 1.3)  # from the middle of L3 to the L5/S1 disc
    base = l4.local(crest_level * l4.height, 0.0)[0]
    crests = []
    for offset in (0.0, rng.uniform(2.0, 20.0)):
        post = l5.local(rng.uniform(-5, 10), -l5.ap / 2 - rng.uniform(50, 80))
        top = np.array([base - offset * 0.5 + rng.uniform(-4, 4), l4.local(0, 0)[1] - rng.uniform(-10, 30)])
        ant = l5.local(rng.uniform(10, 40), l5.ap / 2 + rng.uniform(40, 120))
        crests.append(smooth_curve(np.array([post + [offset, 0], top + [offset, 0], ant + [offset, 0]]), 2.0))
    anatomy.iliac_crests = crests
    if rng.random() < 0.6:
        t11 = b["T11"]
        low = t11.local(rng.uniform(5, 40), -t11.ap / 2 - 60)
        high = b["T10"].local(-rng.uniform(15, 60), t11.ap / 2 + 60)
        dome = [low + [0, -80], low, (low + high) / 2 + [-10, 0], high, high + [-30, 60]]
        anatomy.lung_dome = smooth_curve(np.array(dome), 2.0)
    gas = []
    over_aorta = rng.random() < 0.5
    for _ in range(int(rng.integers(0, 25))):
        level = b[str(rng.choice(["L1", "L2", "L3", "L4", "L5", "S1"]))]
        ahead = rng.uniform(-5.0, 35.0) if over_aorta and rng.random() < 0.5 else rng.uniform(5.0, 170.0)
        centre = level.local(rng.uniform(-25, 30), level.ap / 2 + ahead)
        gas.append((centre, rng.uniform(4.0, 35.0), rng.uniform(4.0, 35.0), rng.uniform(0, np.pi)))
    anatomy.gas = gas
    osteophytes = []
    chance = rng.uniform(0.0, 0.7)
    for name in kauppila.VERTEBRAE:
        for which, sign in (("superior", -1.0), ("inferior", 1.0)):
            if rng.random() < chance:
                body = b[name]
                corner = dict(zip(CORNER_NAMES, body.corners))[f"{which}_anterior"]
                size = rng.uniform(1.0, 7.0)
                tip = corner + body.normal * size + body.tangent * sign * size * rng.uniform(0.3, 1.2)
                osteophytes.append(np.array([corner - body.normal * 2.0, corner - body.tangent * sign * 2.5, tip]))
    anatomy.osteophytes = osteophytes
    if transitional == "sacralised L5":  # the enlarged transverse process fused with the sacral ala
        l5s1 = (endplate_mid(l5, "inferior") + endplate_mid(b["S1"], "superior")) / 2 - l5.normal * l5.ap * 0.25
        anatomy.dense.append((rounded(l5s1 + np.array([[-14, -12], [-14, 10], [14, 14], [14, -14]]) @
                                      np.array([l5.tangent, l5.normal])), rng.uniform(0.3, 0.6)))
    return dict(ribs=len(ribs), crest_level=round(float(crest_level), 2), gas_over_aorta=over_aorta,
                osteophytes=len(osteophytes))


def _implants(rng: np.random.Generator, anatomy: Anatomy, lumbar: Sequence[str]) -> list[str]:
    """Pedicle screws and rods, cement, an interbody cage and surgical clips (metal is far denser than bone)."""
    b = anatomy.bodies
    drawn = []

    def bar(a: np.ndarray, c: np.ndarray, width: float) -> np.ndarray:
        d = unit(c - a)
        n = np.array([-d[1], d[0]]) * width / 2
        return np.array([a + n, c + n, c - n, a - n])

    if rng.random() < 0.07:  # posterior fixation over 2-4 levels
        first = int(rng.integers(0, len(lumbar) - 1))
        levels = list(lumbar[first:first + int(rng.integers(2, 5))])
        heads = []
        for name in levels:
            body = b[name]
            for side in (0.0, rng.uniform(1.0, 4.0)):
                head = body.local(-0.1 * body.height + side, -body.ap / 2 - rng.uniform(20, 30))
                tip = body.local(rng.uniform(-3, 3) + side, body.ap * rng.uniform(0.2, 0.4))
                anatomy.dense.append((bar(head, tip, rng.uniform(5.0, 7.0)), rng.uniform(4.0, 8.0)))
            heads.append(head)
        for a, c in zip(heads[:-1], heads[1:]):
            anatomy.dense.append((bar(a, c, 5.5), rng.uniform(4.0, 7.0)))
        drawn.append(f"screws {levels[0]}-{levels[-1]}")
    if rng.random() < 0.04:  # vertebroplasty cement
        name = str(rng.choice(lumbar))
        body = b[name]
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        radius = rng.uniform(0.25, 0.4, 12)
        blob = np.array([body.local(np.cos(a) * r * body.height, np.sin(a) * r * body.ap)
                         for a, r in zip(angles, radius)])
        anatomy.dense.append((rounded(blob, 2), rng.uniform(1.5, 3.0)))
        drawn.append(f"cement {name}")
    if rng.random() < 0.04:  # interbody cage: faint frame with dense marker pins
        k = int(rng.integers(0, len(lumbar) - 1))
        upper = b[lumbar[k]]
        centre = (endplate_mid(upper, "inferior") + endplate_mid(b[lumbar[k + 1]], "superior")) / 2
        for v in (-0.3, 0.3):
            pin = centre + upper.normal * v * upper.ap
            anatomy.dense.append((bar(pin - upper.tangent * 2, pin + upper.tangent * 2, 1.5), 6.0))
        drawn.append(f"cage {lumbar[k]}/{lumbar[k + 1]}")
    if rng.random() < 0.12:  # surgical clips anywhere in the abdomen, the aortic band included
        for _ in range(int(rng.integers(1, 7))):
            level = b[str(rng.choice(kauppila.VERTEBRAE))]
            centre = level.local(rng.uniform(-20, 20), level.ap / 2 + rng.uniform(0.0, 150.0))
            angle = rng.uniform(0, np.pi)
            d = np.array([np.cos(angle), np.sin(angle)]) * rng.uniform(3.0, 4.5)
            anatomy.dense.append((bar(centre - d, centre + d, rng.uniform(1.0, 1.6)), rng.uniform(3.0, 6.0)))
        drawn.append("clips")
    return drawn


# ---------------------------------------------------------------------------------------------- calcification


def varied_deposits(rng: np.random.Generator, anatomy: Anatomy, targets: dict[str, int],
                    spans: dict[str, np.ndarray]) -> list[dict]:
    """Scored deposits realising the targets as lines, patches or dots, faint to dense and 1-5 mm thick, plus
    deposits outside L1..L4 (above T12/L1, below L4/L5, on the iliac arteries) that the truth does not count."""
    modes = ("line", "patchy", "punctate")
    weights = rng.dirichlet(np.ones(3))
    density = rng.uniform(0.25, 1.4)  # this patient's plaque: faint or dense
    half_mm = rng.uniform(0.5, 2.5)  # and thin or thick (1-5 mm)
    burden = sum(targets.values()) / 24.0

    def deposit(wall: str, level: str | None, start: float, end: float, mode: str, **extra) -> dict:
        return dict(wall=wall, level=level, start_mm=start, end_mm=end, patchy=mode != "line", kind=mode,
                    density=density * rng.uniform(0.6, 1.3), half_mm=float(np.clip(half_mm * rng.uniform(0.7, 1.3),
                                                                                   0.5, 2.5)), **extra)

    out = []
    for wall, wall_spans in spans.items():
        for level, (top, bottom) in zip(kauppila.SCORED_LEVELS, wall_spans):
            subscore = targets[f"{level}{wall}"]
            if subscore == 0:
                continue
            mode = str(rng.choice(modes, p=weights))
            length = bottom - top
            margin = max(END_MARGIN_MM, 0.05 * length)
            low, high = FRACTION_RANGES[subscore]
            gap = rng.uniform(GAP_MM, 3.0) if mode == "punctate" else GAP_MM
            wanted = {"line": rng.integers(1, 3), "patchy": rng.integers(2, 6), "punctate": rng.integers(3, 13)}[mode]
            fits = int((length - 2 * margin - low * length) // gap) + 1
            pieces = int(max(1, min(wanted, fits)))
            fraction = rng.uniform(low, min(high, (length - 2 * margin - (pieces - 1) * gap) / length))
            for start, end in lay_out_pieces(rng, top, length, margin, fraction * length, pieces, gap):
                out.append(deposit(wall, level, start, end, mode))
    walls = {"A": anatomy.aorta_anterior, "P": anatomy.aorta_posterior}
    for wall, wall_spans in spans.items():
        arc_end = arc_length(walls[wall])[-1]
        if rng.random() < 0.3 + 0.5 * burden:  # above T12/L1
            end = wall_spans[0][0] - END_MARGIN_MM - rng.uniform(0.5, 15.0)
            start = end - rng.uniform(2.0, 20.0)
            if start > 0:
                out.append(deposit(wall, None, start, end, str(rng.choice(modes, p=weights))))
        if rng.random() < 0.3 + 0.5 * burden:  # below L4/L5, over the bifurcation
            start = wall_spans[-1][1] + END_MARGIN_MM + rng.uniform(0.0, 2.0)
            end = min(arc_end, start + rng.uniform(2.0, 10.0))
            if end - start > 1.0:
                out.append(deposit(wall, None, start, end, str(rng.choice(modes, p=weights))))
    for i, (line, diameter) in enumerate(anatomy.iliacs):
        if rng.random() < 0.25 + 0.6 * burden:
            side = 1.0 if rng.random() < 0.5 else -1.0
            wall = line + curve_normals(line) * side * diameter / 2
            arc = arc_length(wall)
            start = rng.uniform(0.0, arc[-1] * 0.6)
            out.append(deposit(f"iliac{i}{'A' if side > 0 else 'P'}", None, start,
                               min(arc[-1], start + rng.uniform(3.0, 30.0)), str(rng.choice(modes, p=weights)),
                               polyline_mm=wall))
    return out


# ------------------------------------------------------------------------------------------------------- image


def varied_look(rng: np.random.Generator, info: dict) -> dict:
    """Densities, textures, noise and processing: the alt family's look, widened, with unsharp masking and
    equalisation; DXA-like images have little soft tissue, no gas contrast, low noise and smooth detail."""
    u = rng.uniform
    look = drawn_look(rng, alt=True)
    look.update(
        soft=u(1.2, 4.5), gas=u(0.1, 1.1), lung=u(0.4, 1.8), rib=u(0.05, 0.45), pelvis=u(0.1, 0.7),
        posterior=u(0.25, 0.8), heel=u(0.0, 0.6), noise=float(np.exp(u(np.log(0.005), np.log(0.08)))),
        trabecular=u(0.2, 1.1), cortex=u(0.15, 1.0), edge_mm=u(0.1, 0.5), corner_radius_mm=u(0.5, 3.5),
        wall_concavity_mm=u(0.0, 1.8), outline_mm=u(0.0, 0.3), plaque=u(0.3, 1.0),
        curve=str(rng.choice(["gamma", "sigmoid", "exp", "knee"])), curve_param=u(0.0, 1.0), latitude=u(0.25, 1.0),
        detail=u(0.6, 3.0), eq_sigma_mm=u(4.0, 80.0), p_low=u(0.0, 6.0), p_high=u(97.5, 99.99),
        blur_px=u(0.4, 2.5) * (rng.random() < 0.5), grid_lines=u(0.003, 0.03) * (rng.random() < 0.3),
        unsharp=u(0.3, 2.0) * (rng.random() < 0.4), unsharp_mm=u(0.8, 6.0), equalise=u(0.3, 1.0) * (rng.random() < 0.25),
    )
    if info["sacrum_style"] == "through iliac wings":
        look["pelvis"] = u(0.6, 1.0)
    if info["dxa_like"]:
        look.update(soft=u(0.2, 0.8), gas=u(0.0, 0.2), lung=u(0.0, 0.3), noise=u(0.002, 0.01), blur_px=u(0.0, 0.8),
                    trabecular_contrast=u(0.0, 0.05), detail=u(0.8, 1.3), latitude=u(0.8, 1.0), unsharp=0.0,
                    grid_lines=0.0, equalise=0.0, heel=u(0.0, 0.1), correlated_noise=u(0.0, 0.005))
    return look


def varied_acquisition(rng: np.random.Generator, size_range: tuple[int, int], anatomy: Anatomy,
                       spans: dict[str, np.ndarray], info: dict) -> dict:
    """Rotation, facing, field of view and spacing. The scored region (L1..L5, the aortic band and the walls
    between T12/L1 and L4/L5) is always in view; the top edge lies anywhere from T9 to L1 and the bottom edge
    from just below L5 to the coccyx (between L5 and the sacrum in SACRUM_OUT_SHARE of images)."""
    dxa = info["dxa_like"]
    b = anatomy.bodies
    info["sacrum_cut"] = bool(rng.random() < SACRUM_OUT_SHARE)
    angles = [rng.uniform(-20.0, 20.0) if rng.random() < 0.5 else float(np.clip(rng.normal(0.0, 7.0), -20.0, 20.0))]
    if info["sacrum_cut"]:  # a horizontal edge can pass between L5 and S1 only at some rotations: look for one
        angles += list(rng.uniform(-20.0, 20.0, 11))
    facing = 1.0 if rng.random() < 0.5 else -1.0

    def frame(degrees: float) -> np.ndarray:
        angle = np.radians(degrees)
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1.0, facing])

    def clearance(degrees: float) -> float:  # rows (mm) between the bottom of L5 and the top of S1
        rotated = frame(degrees)
        return float((b["S1"].corners @ rotated.T)[:, 0].min() - (b["L5"].corners @ rotated.T)[:, 0].max())

    degrees = next((a for a in angles if clearance(a) > 2.0), max(angles, key=clearance))
    angle = float(np.radians(degrees))
    direction = frame(degrees)
    mean_ap = float(np.mean([b[n].ap for n in kauppila.VERTEBRAE]))
    scored = [b[n].corners for n in kauppila.VERTEBRAE]
    scored += [b[n].corners + b[n].normal * 0.75 * mean_ap for n in kauppila.VERTEBRAE]
    for wall, wall_spans in spans.items():
        points = anatomy.aorta_anterior if wall == "A" else anatomy.aorta_posterior
        arc = arc_length(points)
        scored.append(points[(arc >= wall_spans[0][0]) & (arc <= wall_spans[-1][1])])
    scored_rc = np.vstack(scored) @ direction.T
    lo, hi = scored_rc.min(axis=0) - 2.0, scored_rc.max(axis=0) + 2.0

    def rows(points: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(points) @ direction.T)[:, 0]

    highest = rows(b["T11" if dxa else "T9"].center)[0]
    info["top_at_l1"] = bool(rng.random() < TOP_AT_L1_SHARE)
    if info["top_at_l1"]:  # the image starts at L1; an edge along the T12/L1 disc hides T12 (see _shutter_edges)
        top = lo[0] - rng.uniform(0.0, 3.0)
    else:
        top = min(rng.uniform(highest, rows(b["L1"].corners).min() - 2.0), lo[0])
    l5_bottom, s1_top = rows(b["L5"].corners).max() + 1.0, rows(b["S1"].corners).min()
    coccyx = rows(anatomy.sacrum).max()
    if info["sacrum_cut"]:  # where S1 still shows below the bottom row, an edge along the disc hides it
        bottom = rng.uniform(l5_bottom, max(l5_bottom + 0.5, s1_top - 0.5))
    else:
        s1_rows = rows(b["S1"].corners)
        bottom = rng.uniform(s1_rows.min() + 0.4 * np.ptp(s1_rows), (coccyx + 15.0) if not dxa else s1_rows.max())
    bottom = max(bottom, hi[0])
    margin = (5.0, 50.0) if dxa else (10.0, 160.0)
    left, right = lo[1] - rng.uniform(*margin), hi[1] + rng.uniform(*margin)
    height, width = bottom - top, right - left
    spacing = rng.uniform(0.5, 1.0) if dxa else rng.uniform(0.08, 0.25)
    longest = max(height, width)
    spacing = max(spacing, longest / size_range[1])
    if not dxa:
        spacing = min(spacing, longest / size_range[0])
    shape = (min(int(np.ceil(height / spacing)), size_range[1]), min(int(np.ceil(width / spacing)), size_range[1]))
    origin = -np.array([top, left]) / spacing
    info.update(top_mm_above_l1=round(float(rows(b["L1"].corners).min() - top), 1),
                bottom_mm_below_l5=round(float(bottom - l5_bottom + 1.0), 1))
    return dict(shape=shape, spacing=float(spacing), angle=angle, facing=facing, matrix=direction / spacing,
                origin=origin, key_px=(scored_rc - [top, left]) / spacing)
