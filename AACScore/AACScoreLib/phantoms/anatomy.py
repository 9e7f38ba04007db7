"""Anatomy of the synthetic lateral lumbar radiographs: where each structure lies, in millimetres.

Points here are (y, x) in mm in a canonical frame: y points to the feet and x points anteriorly. The phantom
generator maps them onto the image with one similarity transform (scale, rotation, mirror), so length ratios,
and with them the Kauppila calcified fractions, are the same in millimetres and in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.special import erfc
from skimage.draw import ellipse as skimage_ellipse
from PIL import Image, ImageDraw

CORNER_NAMES: tuple[str, ...] = ("superior_anterior", "superior_posterior", "inferior_posterior", "inferior_anterior")
DRAWN_VERTEBRAE: tuple[str, ...] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
BOUNDARY_NAMES: tuple[str, ...] = ("T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5")  # Kauppila segment boundaries
_HEIGHT_MM = dict(T10=21.5, T11=23.0, T12=24.5, L1=26.0, L2=27.0, L3=27.5, L4=27.5, L5=26.5, S1=24.0)
_AP_MM = dict(T10=29.0, T11=31.0, T12=33.0, L1=35.0, L2=37.0, L3=38.5, L4=39.5, L5=40.0, S1=38.0)
_WALL_STEP_MM = 0.25  # sampling of the aortic wall polylines


@dataclass
class Body:
    """One vertebral body: a (slightly wedged) quadrilateral in its own frame (t down the spine, n anterior)."""

    name: str
    corners: np.ndarray  # (4, 2) in CORNER_NAMES order
    tangent: np.ndarray  # unit, pointing to the feet
    normal: np.ndarray  # unit, pointing anteriorly
    height: float
    ap: float
    style: dict = field(default_factory=dict)  # per-body overrides of the look (fractures, sclerosis, double endplates)

    @property
    def center(self) -> np.ndarray:
        return self.corners.mean(axis=0)

    def local(self, u: float, v: float) -> np.ndarray:
        """Point at u mm below and v mm anterior of the body centre."""
        return self.center + u * self.tangent + v * self.normal


@dataclass
class Anatomy:
    """Everything the renderer draws, in canonical millimetres."""

    bodies: dict[str, Body]
    disc_heights: dict[str, float]  # "T12/L1" ... (distance between endplate mid-points)
    aorta_posterior: np.ndarray  # (N, 2) wall polylines from the thorax down to the bifurcation
    aorta_anterior: np.ndarray
    aorta_diameter: float
    iliacs: list[tuple[np.ndarray, float]]  # (centreline, diameter) below the bifurcation
    sacrum: np.ndarray  # polygon of the sacrum below S1
    posterior_elements: list[np.ndarray] = field(default_factory=list)  # polygons of pedicles and pillars
    spinous_processes: list[np.ndarray] = field(default_factory=list)
    spinous_tips: np.ndarray | None = None  # (k, 2): the back's skin follows them
    ribs: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (centreline, width)
    iliac_crests: list[np.ndarray] = field(default_factory=list)  # crest polylines, posterior to anterior
    lung_dome: np.ndarray | None = None  # polyline; above it lies lung (air)
    gas: list[tuple[np.ndarray, float, float, float]] = field(default_factory=list)  # centre, ry, rx, angle
    osteophytes: list[np.ndarray] = field(default_factory=list)  # triangles
    sacrum_density: float = 0.7
    dense: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (polygon, density): metal, cement, bone


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def endplate_mid(body: Body, which: str) -> np.ndarray:
    c = dict(zip(CORNER_NAMES, body.corners))
    return (c[f"{which}_anterior"] + c[f"{which}_posterior"]) / 2.0


def build_anatomy(rng: np.random.Generator, alt: bool = False) -> Anatomy:
    """Draw a random spine with lordosis, its discs, the aorta in front of it and the surrounding bones and gas."""
    scale = rng.uniform(0.88, 1.12)
    names = DRAWN_VERTEBRAE
    heights = {n: _HEIGHT_MM[n] * scale * rng.normal(1.0, 0.035) for n in names}
    aps = {n: _AP_MM[n] * scale * rng.normal(1.0, 0.035) for n in names}
    # Disc heights grow linearly down the spine (T12/L1 = 2*(L1/L2) - (L2/L3) holds exactly, as geometry assumes).
    h0 = rng.uniform(5.0, 8.0) * scale
    dh = rng.uniform(0.35, 1.3) * scale
    discs = {f"{a}/{b}": h0 + dh * (k - 2) for k, (a, b) in enumerate(zip(names[:-1], names[1:]))}
    if alt:  # degenerate lower discs: the geometry measures these directly, only T12/L1 is extrapolated
        for key in ("L3/L4", "L4/L5", "L5/S1"):
            discs[key] *= rng.uniform(0.7, 1.15)
    wedge = {n: rng.uniform(-1.5, 0.0) * scale for n in ("T10", "T11", "T12")}
    wedge.update({n: rng.uniform(0.0, 1.8) * scale for n in ("L1", "L2", "L3", "L4")})
    wedge["L5"] = rng.uniform(2.0, 5.0) * scale

    bodies = lay_out_spine(rng, names, heights, aps, discs, wedge)
    sacrum = sacrum_outline(bodies["S1"], rng)

    anatomy = Anatomy(bodies, discs, *aorta(bodies, rng), sacrum=sacrum)
    posterior_elements(anatomy, rng, scale)
    _surroundings(anatomy, rng, scale, alt)
    return anatomy


def lay_out_spine(rng: np.random.Generator, names: Sequence[str], heights: dict[str, float], aps: dict[str, float],
                  discs: dict[str, float], wedge: dict[str, float], junction_deg: tuple[float, float] = (8.0, 24.0),
                  lordosis_deg: tuple[float, float] = (38.0, 66.0), power: tuple[float, float] = (1.0, 1.8)
                  ) -> dict[str, Body]:
    """Bodies `names` (ending with S1, T12 among them) stacked along a curved arc with their discs between them.

    The tangent angle (towards anterior, from the inferior direction) follows a kyphotic segment above the
    thoraco-lumbar junction (around T12), then a lordosis whose curvature grows towards the sacrum; S1 is tilted
    further by the sacral slope and narrows downwards.
    """
    names = tuple(names)
    arc_ends = np.cumsum([heights[n] + (discs.get(f"{n}/{m}", 0.0)) for n, m in zip(names, names[1:] + ("",))])
    s_junction = arc_ends[names.index("T12")] - heights["T12"] / 2
    s_sacrum = arc_ends[-2]  # S1 superior endplate
    phi_junction = np.radians(rng.uniform(*junction_deg))
    lordosis = np.radians(rng.uniform(*lordosis_deg))
    exponent = rng.uniform(*power)

    def phi(s: float) -> float:
        if s < s_junction:
            return phi_junction - np.radians(6.0) * (s_junction - s) / s_junction
        return phi_junction - lordosis * ((s - s_junction) / (s_sacrum - s_junction)) ** exponent

    def frame(angle: float) -> tuple[np.ndarray, np.ndarray]:
        t = np.array([np.cos(angle), np.sin(angle)])
        return t, np.array([-t[1], t[0]])

    bodies: dict[str, Body] = {}
    superior_mid = np.zeros(2)
    s = 0.0
    for i, name in enumerate(names[:-1]):
        h, ap, w = heights[name], aps[name], wedge[name]
        t, n = frame(phi(s + h / 2) + np.radians(rng.normal(0.0, 1.5)))
        center = superior_mid + t * h / 2
        ha, hp = h + w / 2, h - w / 2
        corners = np.array([center + n * ap / 2 - t * ha / 2, center - n * ap / 2 - t * hp / 2,
                            center - n * ap / 2 + t * hp / 2, center + n * ap / 2 + t * ha / 2])
        bodies[name] = Body(name, corners, t, n, h, ap)
        disc = discs[f"{name}/{names[i + 1]}"]
        s += h
        d, _ = frame(phi(s + disc / 2))
        superior_mid = endplate_mid(bodies[name], "inferior") + d * disc
        s += disc
    t, n = frame(phi(s_sacrum) - np.radians(rng.uniform(2.0, 8.0)))
    h, ap = heights["S1"], aps["S1"]
    sa, sp = superior_mid + n * ap / 2, superior_mid - n * ap / 2
    corners = np.array([sa, sp, sp + t * h * 0.95 + n * 1.5, sa + t * h - n * ap * 0.12])
    bodies["S1"] = Body("S1", corners, t, n, h, ap)
    return bodies


def disc_boundaries(corners: dict[str, dict[str, np.ndarray]],
                    pairs: Sequence[tuple[str, str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The five Kauppila boundaries T12/L1..L4/L5 (or the discs between other `pairs` of bodies): disc mid-points
    and unit disc mid-plane directions.

    Disc mid-point = mean of the upper body's inferior endplate mid-point and the lower body's superior one;
    mid-plane direction = normalised mean of the two endplate directions, each from posterior to anterior corner.
    """
    points, directions = [], []
    for upper, lower in pairs or [b.split("/") for b in BOUNDARY_NAMES]:
        u, l_ = corners[upper], corners[lower]
        mid_u = (u["inferior_anterior"] + u["inferior_posterior"]) / 2
        mid_l = (l_["superior_anterior"] + l_["superior_posterior"]) / 2
        points.append((mid_u + mid_l) / 2)
        d = unit(u["inferior_anterior"] - u["inferior_posterior"])
        d = d + unit(l_["superior_anterior"] - l_["superior_posterior"])
        directions.append(unit(d))
    return np.array(points), np.array(directions)


def sacrum_outline(s1: Body, rng: np.random.Generator) -> np.ndarray:
    """Polygon of S2..coccyx: a curved, tapering band continuing S1 posteriorly-inferiorly."""
    c = dict(zip(CORNER_NAMES, s1.corners))
    length = rng.uniform(70.0, 100.0)
    bend = np.radians(rng.uniform(20.0, 40.0))
    k = np.linspace(0.0, 1.0, 12)
    angles = np.arctan2(s1.tangent[1], s1.tangent[0]) - bend * k
    steps = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (length / (len(k) - 1))
    axis_start = (c["inferior_anterior"] + c["inferior_posterior"]) / 2
    axis = axis_start + np.vstack([[0, 0], np.cumsum(steps[:-1], axis=0)])
    normals = np.stack([-np.sin(angles), np.cos(angles)], axis=1)
    half = np.linalg.norm(c["inferior_anterior"] - c["inferior_posterior"]) / 2 * (1.0 - 0.8 * k)
    return rounded(np.vstack([axis + normals * half[:, None], (axis - normals * half[:, None])[::-1]]), 2)


def rounded(poly: np.ndarray, iterations: int = 3, cut: float = 0.15) -> np.ndarray:
    """Corner cutting (Chaikin-like): a closed polygon with rounded corners and straight sides kept."""
    for _ in range(iterations):
        nxt = np.roll(poly, -1, axis=0)
        poly = np.stack([(1 - cut) * poly + cut * nxt, cut * poly + (1 - cut) * nxt], axis=1).reshape(-1, 2)
    return poly


def smooth_curve(points: np.ndarray, step: float) -> np.ndarray:
    """Smooth curve through `points`, resampled every `step` mm."""
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    curve = CubicSpline(chord, points, bc_type="natural")
    return curve(np.arange(0.0, chord[-1], step))


def curve_normals(curve: np.ndarray) -> np.ndarray:
    """Unit normals of a polyline rotated +90 degrees from its direction (anterior for a curve running down)."""
    d = unit(np.gradient(curve, axis=0))
    return np.stack([-d[:, 1], d[:, 0]], axis=1)


def aorta(bodies: dict[str, Body], rng: np.random.Generator,
          levels: Sequence[str] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"),
          gap_mm: tuple[float, float] = (2.5, 6.0), diameter_mm: tuple[float, float] = (15.0, 23.0),
          offsets: dict[str, float] | None = None, min_diameter_mm: float = 0.0):
    """Aortic walls roughly parallel to the anterior vertebral line (plus per-level `offsets`, mm, for a tortuous
    course), kept inside the Kauppila band where the diameter allows, down to a few mm below L4/L5."""
    mean_ap = np.mean([bodies[n].ap for n in ("L1", "L2", "L3", "L4", "L5")])
    gap = rng.uniform(*gap_mm)
    diameter = rng.uniform(*diameter_mm)
    widest = max(gap + (offsets or {}).get(n, 0.0) for n in levels)
    diameter = max(min(diameter, 0.75 * mean_ap - widest - 3.5), min_diameter_mm)
    front = []
    for name in levels:
        b = bodies[name]
        c = dict(zip(CORNER_NAMES, b.corners))
        mid = (c["superior_anterior"] + c["inferior_anterior"]) / 2
        normal = unit(np.array([c["superior_anterior"][1] - c["inferior_anterior"][1],
                                c["inferior_anterior"][0] - c["superior_anterior"][0]]))
        extra = np.clip(rng.normal(0.0, 0.6), -1.0, 1.0) + (offsets or {}).get(name, 0.0)
        if name == "L5":  # the bifurcation moves forward over the promontory
            extra += rng.uniform(2.0, 6.0)
        front.append(mid + normal * (gap + extra))
        if name == "L5":
            front.append(c["inferior_anterior"] + normal * (gap + extra + 2.0))
    posterior = smooth_curve(np.array(front), _WALL_STEP_MM)
    # End the aorta a few mm below the L4/L5 boundary line (the disc mid-plane): the iliac bifurcation.
    points, directions = disc_boundaries({n: dict(zip(CORNER_NAMES, b.corners)) for n, b in bodies.items()})
    disc_mid, plane = points[-1], directions[-1]
    down = np.array([-plane[1], plane[0]])
    down = down if down @ bodies["L4"].tangent > 0 else -down
    below = (posterior - disc_mid) @ down
    end = int(np.argmax(below > rng.uniform(4.0, 10.0)))
    posterior = posterior[: end if end > 0 else len(posterior)]
    taper = np.linspace(1.0, rng.uniform(0.85, 0.97), len(posterior))
    anterior = posterior + curve_normals(posterior) * (diameter * taper)[:, None]
    # Common iliac arteries: two narrower tubes continuing forwards and down, overlapping in a lateral view.
    iliacs = []
    start = (posterior[-1] + anterior[-1]) / 2
    direction = unit(posterior[-1] - posterior[-20])
    for side in (-1.0, 1.0):
        angle = np.radians(rng.uniform(8.0, 25.0)) + side * np.radians(rng.uniform(0.0, 6.0))
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        d = rot @ direction
        length = rng.uniform(45.0, 75.0)
        k = np.linspace(0.0, 1.0, 20)[:, None]
        bend = np.array([-d[1], d[0]]) * rng.uniform(-8.0, 8.0)
        iliacs.append((start + d * length * k + bend * k**2, diameter * rng.uniform(0.5, 0.62)))
    return posterior, anterior, diameter, iliacs


def posterior_elements(anatomy: Anatomy, rng: np.random.Generator, scale: float,
                       names: Sequence[str] = DRAWN_VERTEBRAE) -> None:
    """Pedicles and articular pillars (dense, value 1) and the thinner spinous processes (value about 0.4).

    Adjacent pillars leave an oblique lucent gap between them: the facet joint.
    """
    polys, spines, tips = [], [], []
    canal = rng.uniform(14.0, 19.0) * scale
    for i, name in enumerate(names[:-1]):
        b = anatomy.bodies[name]
        h, back = b.height, -b.ap / 2
        above = anatomy.disc_heights.get(f"{names[i - 1]}/{name}", 6.0) if i else 6.0
        below = anatomy.disc_heights[f"{name}/{names[i + 1]}"]
        p_top, p_bot = -0.42 * h + rng.uniform(-1, 1), 0.02 * h + rng.uniform(-1, 2)
        ped = [(p_top, back + 2.0), (p_top + 1.5, back - canal + 1), (p_bot - 1.0, back - canal + 1),
               (p_bot, back + 2.0)]
        depth = rng.uniform(11.0, 15.0) * scale
        front, rear = back - canal + 2, back - canal - depth
        slope = rng.uniform(3.0, 7.0)  # facet joints run obliquely, lower at the back
        top, bottom = -0.5 * h - above / 2 + 1.3 - slope / 2, 0.5 * h + below / 2 - 1.3 - slope / 2
        pillar = [(top, front), (top + slope, rear), (bottom + slope, rear), (bottom, front)]
        length = rng.uniform(22.0, 32.0) * scale
        droop = rng.uniform(0.0, 8.0)
        root = rear + 3
        spine = [(-0.25 * h, root), (-0.28 * h + droop, root - length), (0.3 * h + droop, root - length - 1),
                 (0.35 * h, root)]
        polys += [rounded(np.array([b.local(u, v) for u, v in outline])) for outline in (ped, pillar)]
        spines.append(rounded(np.array([b.local(u, v) for u, v in spine])))
        tips.append(b.local(0.05 * h + droop, root - length - 1))
    anatomy.posterior_elements = polys
    anatomy.spinous_processes = spines
    anatomy.spinous_tips = np.array(tips)


def _surroundings(anatomy: Anatomy, rng: np.random.Generator, scale: float, alt: bool) -> None:
    """Lower ribs, iliac crests, lung bases, bowel gas and anterior osteophytes."""
    b = anatomy.bodies
    ribs = []
    for name in ("T11", "T12", "T12", "T11")[: rng.integers(2, 5)]:
        start = b[name].local(rng.uniform(-8, 8), -b[name].ap / 2 - rng.uniform(10, 25))
        angle = np.radians(rng.uniform(18.0, 48.0))
        length = rng.uniform(80.0, 170.0) * scale
        d = np.array([np.sin(angle), np.cos(angle)])
        sag = np.array([-d[1], d[0]]) * rng.uniform(-30.0, 5.0)
        k = np.linspace(0.0, 1.0, 24)[:, None]
        ribs.append((start + d * length * k + sag * 4 * k * (1 - k), rng.uniform(7.0, 11.0) * scale))
    anatomy.ribs = ribs
    l4, l5 = b["L4"], b["L5"]
    crests = []
    base = np.array([l4.local(rng.uniform(-0.2, 0.45) * l4.height, 0.0)[0], 0.0])
    for offset in (0.0, rng.uniform(3.0, 12.0)):
        post = l5.local(rng.uniform(-5, 10), -l5.ap / 2 - rng.uniform(55, 75))
        top = np.array([base[0] - offset * 0.5 + rng.uniform(-4, 4), l4.local(0, 0)[1] - rng.uniform(0, 25)])
        ant = l5.local(rng.uniform(15, 35), l5.ap / 2 + rng.uniform(60, 110))
        crests.append(smooth_curve(np.array([post + [offset, 0], top + [offset, 0], ant + [offset, 0]]), 2.0))
    anatomy.iliac_crests = crests
    if rng.random() < 0.75:
        t11 = b["T11"]
        low = t11.local(rng.uniform(5, 30), -t11.ap / 2 - 60)
        high = b["T10"].local(-rng.uniform(15, 45), t11.ap / 2 + 60)
        dome = [low + [0, -80], low, (low + high) / 2 + [-10, 0], high, high + [-30, 60]]
        anatomy.lung_dome = smooth_curve(np.array(dome), 2.0)
    gas = []
    n_gas = rng.integers(2, 14) if not alt else rng.integers(0, 20)
    for _ in range(n_gas):
        level = b[str(rng.choice(["L1", "L2", "L3", "L4", "L5", "S1"]))]
        center = level.local(rng.uniform(-25, 30), level.ap / 2 + rng.uniform(5.0, 160.0))
        gas.append((center, rng.uniform(5.0, 30.0), rng.uniform(5.0, 30.0), rng.uniform(0, np.pi)))
    anatomy.gas = gas
    osteophytes = []
    chance = 0.25 if not alt else 0.5
    for name in ("L1", "L2", "L3", "L4", "L5"):
        for which, sign in (("superior", -1.0), ("inferior", 1.0)):
            if rng.random() < chance:
                body = b[name]
                c = dict(zip(CORNER_NAMES, body.corners))
                corner = c[f"{which}_anterior"]
                size = rng.uniform(1.0, 3.0)
                tip = corner + body.normal * size + body.tangent * sign * size * rng.uniform(0.3, 1.0)
                osteophytes.append(np.array([corner - body.normal * 2.0, corner - body.tangent * sign * 2.5, tip]))
    anatomy.osteophytes = osteophytes


# ----------------------------------------------------------------------------------------------------------------
# Drawing: an attenuation map (line integrals, arbitrary units) on the image grid. Smooth structures are drawn on a
# coarse grid and upsampled once; vertebral bodies, plaques and osteophytes are drawn at full resolution in small
# boxes around them, so a 3000 x 2400 image costs about a second.


@dataclass
class Placement:
    """Similarity transform from canonical mm (y, x) to image pixels (row, col), plus the coarse grid factor."""

    matrix: np.ndarray  # (2, 2)
    origin: np.ndarray  # (2,)
    spacing: float  # mm per pixel
    shape: tuple[int, int]
    factor: int  # coarse grid: one coarse pixel = factor x factor image pixels

    def px(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=float) @ self.matrix.T + self.origin

    def coarse(self, points: np.ndarray) -> np.ndarray:
        return (self.px(points) - (self.factor - 1) / 2.0) / self.factor

    @property
    def coarse_shape(self) -> tuple[int, int]:
        return (-(-self.shape[0] // self.factor), -(-self.shape[1] // self.factor))

    def coarse_mm_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (y, x) in mm of every coarse pixel centre."""
        rows, cols = self.coarse_shape
        r = np.arange(rows, dtype=np.float32) * self.factor + (self.factor - 1) / 2.0 - self.origin[0]
        c = np.arange(cols, dtype=np.float32) * self.factor + (self.factor - 1) / 2.0 - self.origin[1]
        inv = np.linalg.inv(self.matrix).astype(np.float32)
        y = inv[0, 0] * r[:, None] + inv[0, 1] * c[None, :]
        x = inv[1, 0] * r[:, None] + inv[1, 1] * c[None, :]
        return y, x


def upsample(coarse: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling by an integer factor, pixel centres aligned (separable gathers, no per-pixel Python)."""
    if factor == 1:
        return coarse[: shape[0], : shape[1]].astype(np.float32, copy=False)

    def axis_weights(n_out: int, n_in: int):
        pos = (np.arange(n_out, dtype=np.float32) - (factor - 1) / 2.0) / factor
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = np.clip(pos - np.floor(pos), 0.0, 1.0).astype(np.float32)
        w[pos < 0] = 0.0
        return i0, i1, w

    r0, r1, wr = axis_weights(shape[0], coarse.shape[0])
    c0, c1, wc = axis_weights(shape[1], coarse.shape[1])
    rows = coarse[r0] * (1.0 - wr)[:, None] + coarse[r1] * wr[:, None]
    out = rows[:, c0]
    out *= 1.0 - wc
    out += rows[:, c1] * wc
    return out


def fill_polygon(layer: np.ndarray, poly_rc: np.ndarray, value: float = 1.0) -> None:
    """Fill a polygon (row, col vertices) into a coarse layer with max-compositing (Pillow's scanline filler)."""
    lo = np.maximum(np.floor(poly_rc.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(poly_rc.max(axis=0)).astype(int) + 1, layer.shape)
    if np.any(hi <= lo):
        return
    canvas = Image.new("L", (int(hi[1] - lo[1]), int(hi[0] - lo[0])), 0)
    ImageDraw.Draw(canvas).polygon([(c - lo[1], r - lo[0]) for r, c in poly_rc], fill=255)
    region = layer[lo[0]:hi[0], lo[1]:hi[1]]
    np.maximum(region, np.asarray(canvas, dtype=np.float32) * (value / 255.0), out=region)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a subsampled copy (smooth results, a fraction of the time)."""
    k = int(sigma // 3)
    if k < 2:
        return ndimage.gaussian_filter(image, sigma)
    rows, cols = (-(-n // k) for n in image.shape)
    padded = np.pad(image, ((0, rows * k - image.shape[0]), (0, cols * k - image.shape[1])), mode="edge")
    small = padded.reshape(rows, k, cols, k).mean(axis=(1, 3))
    return upsample(ndimage.gaussian_filter(small, np.sqrt(max(sigma**2 - k**2 / 4.0, 1.0)) / k), k, image.shape)


def band_polygon(centreline: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Outline of a band of given width (mm, scalar or per point) around a polyline."""
    normals = curve_normals(centreline)
    half = np.broadcast_to(np.asarray(width, dtype=float) / 2.0, (len(centreline),))[:, None]
    return np.vstack([centreline + normals * half, (centreline - normals * half)[::-1]])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    k = max(1, int(min(np.atleast_1d(sigma)) // 3))
    small = tuple(-(-n // k) for n in shape)
    field_ = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), np.asarray(sigma) / k)
    field_ = upsample(field_, k, shape) if k > 1 else field_
    return field_ / max(float(field_.std()), 1e-6)


def _rim(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Interior band along the edge of a (soft) mask: cortical bone seen tangentially is brighter."""
    return 2.0 * mask * np.clip(1.0 - blur(mask, sigma), 0.0, 1.0)


def render_coarse(anatomy: Anatomy, place: Placement, look: dict, rng: np.random.Generator) -> np.ndarray:
    """Soft tissue, lungs, gas, aorta, posterior elements, ribs, pelvis and sacrum on the coarse grid."""
    shape = place.coarse_shape
    mm = place.spacing * place.factor  # mm per coarse pixel
    y, x = place.coarse_mm_grid()
    b = anatomy.bodies
    # Soft tissue: path length through an elliptic trunk section whose back follows the spinous processes.
    tips = anatomy.spinous_tips
    fit = np.polyfit(tips[:, 0], tips[:, 1], 2)  # a smooth lordotic back, no kinks between processes
    back = np.polyval(fit, np.clip(y, tips[:, 0].min() - 40.0, tips[:, 0].max() + 40.0)) - look["back_fat_mm"]
    ant_line = np.array([body.local(0, body.ap / 2) for body in b.values()])
    front = np.interp(y, ant_line[:, 0], ant_line[:, 1]) + look["belly_mm"]
    crest_y = float(np.min(anatomy.iliac_crests[0][:, 0]))
    width = 1.0 + look["hip_widening"] / (1.0 + np.exp(-(y - crest_y - 20.0) / 15.0))
    centre, half = (front + back) / 2.0, (front - back) / 2.0
    inside = np.clip(1.0 - ((x - centre) / half) ** 2, 0.0, 1.0)
    att = look["soft"] * width * np.sqrt(inside)
    att *= 1.0 + look["soft_mottle"] * smooth_noise(rng, shape, 10.0 / mm)
    # Lung bases above the diaphragm (air, dark) and bowel gas (dark blobs with mottled content).
    if anatomy.lung_dome is not None:
        dome = place.coarse(anatomy.lung_dome)
        up = place.coarse(anatomy.lung_dome + np.array([-400.0, 0.0]))
        lung = np.zeros(shape, np.float32)
        fill_polygon(lung, np.vstack([dome, up[::-1]]))
        att -= look["lung"] * blur(lung, 4.0 / mm) * np.sqrt(inside)
    # Bowel gas: loops of colon (ellipses) filled with irregular gas pockets and bubbly stool.
    gas = np.zeros(shape, np.float32)
    for centre_mm, ry, rx, angle in anatomy.gas:
        c = place.coarse(centre_mm[None])[0]
        rr, cc = skimage_ellipse(c[0], c[1], ry / mm, rx / mm, shape, rotation=angle)
        gas[rr, cc] = np.maximum(gas[rr, cc], rng.uniform(0.3, 1.0))
    if gas.any():
        loops = blur(gas, 4.0 / mm)
        pockets = np.clip(1.5 * smooth_noise(rng, shape, 5.0 / mm) + look["gas_fill"], 0.0, 1.0)
        bubbles = np.clip(smooth_noise(rng, shape, 1.0 / mm) - 0.8, 0.0, 1.0)
        att -= look["gas"] * loops * (pockets + look["stool"] * bubbles)
    # Aorta (blood is barely denser than soft tissue) and the iliac arteries.
    vessels = np.zeros(shape, np.float32)
    fill_polygon(vessels, place.coarse(np.vstack([anatomy.aorta_posterior, anatomy.aorta_anterior[::-1]])))
    for line, diameter in anatomy.iliacs:
        fill_polygon(vessels, place.coarse(band_polygon(line, diameter)))
    att += look["blood"] * blur(vessels, 1.0 / mm)
    # Bones drawn on the coarse grid, each class with its own density and cortical rim.
    bone = np.zeros(shape, np.float32)
    for poly in anatomy.posterior_elements:
        fill_polygon(bone, place.coarse(poly))
    for poly in anatomy.spinous_processes:
        fill_polygon(bone, place.coarse(poly), 0.4)
    fill_polygon(bone, place.coarse(anatomy.sacrum), anatomy.sacrum_density)
    bone = blur(bone, 0.7 / mm)
    grain = 1.0 + 0.12 * smooth_noise(rng, shape, max(0.6, 0.35 / mm))
    att += look["posterior"] * (bone * grain + 0.5 * _rim(bone, 1.2 / mm))
    ribs = np.zeros(shape, np.float32)
    for line, w in anatomy.ribs:  # fading forwards, where the rib thins towards its cartilage
        outline = band_polygon(line, w * np.linspace(1.0, 0.75, len(line)))
        n = len(line)
        for k, value in zip(range(0, n - 1, n // 4), (1.0, 0.85, 0.7, 0.55)):
            piece = np.vstack([outline[k:k + n // 4 + 1], outline[2 * n - k - n // 4 - 1: 2 * n - k]])
            fill_polygon(ribs, place.coarse(piece), value)
    ribs = blur(ribs, 0.7 / mm)
    att += look["rib"] * (0.35 * ribs + 0.9 * _rim(ribs, 1.5 / mm))
    pelvis = np.zeros(shape, np.float32)
    for crest in anatomy.iliac_crests:
        wing = np.zeros(shape, np.float32)
        depth = np.array([rng.uniform(70.0, 110.0), 0.0])
        lower = smooth_curve(np.array([crest[-1], crest[-1] + depth + [0.0, -25.0], crest[len(crest) // 2] + depth * 1.3,
                                  crest[0] + depth + [0.0, 20.0], crest[0]]), 2.0)
        fill_polygon(wing, place.coarse(np.vstack([crest, lower])))
        wing = blur(wing, 1.0 / mm)
        pelvis += 0.3 * wing + 0.8 * _rim(wing, 2.5 / mm)
    att += look["pelvis"] * pelvis * (1.0 + 0.15 * smooth_noise(rng, shape, 3.0 / mm))
    # Heel effect (anode side darker) and correlated detector noise.
    ramp = (np.arange(shape[0], dtype=np.float32) / shape[0] - 0.5)[:, None] * np.cos(look["heel_angle"])
    ramp = ramp + (np.arange(shape[1], dtype=np.float32) / shape[1] - 0.5)[None, :] * np.sin(look["heel_angle"])
    att += look["heel"] * ramp
    att += look["correlated_noise"] * smooth_noise(rng, shape, 1.0)
    return att.astype(np.float32)


def _convex_sdf(rows: np.ndarray, cols: np.ndarray, poly: np.ndarray):
    """Signed distance (px, negative inside) to a convex polygon, either orientation; also per edge the signed
    distance to its line (outwards positive) and the position along it (0..1)."""
    area = np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    sign = 1.0 if area > 0 else -1.0
    line_d, params = [], []
    outside = None
    for a, c in zip(poly, np.roll(poly, -1, axis=0)):
        edge = c - a
        length = float(np.hypot(*edge))
        d = edge / length
        normal = -sign * np.array([-d[1], d[0]])  # outward
        dr, dc = rows - a[0], cols - a[1]
        e = dr * normal[0] + dc * normal[1]
        u = (dr * d[0] + dc * d[1]) / length
        line_d.append(e)
        params.append(u)
        uc = np.clip(u, 0.0, 1.0) * length
        dist = np.hypot(dr - uc * d[0], dc - uc * d[1])
        outside = dist if outside is None else np.minimum(outside, dist)
    inner = np.max(np.stack(line_d), axis=0)
    return np.where(inner > 0, outside, inner), line_d, params


def _inset(poly: np.ndarray, r: float) -> np.ndarray:
    """Convex polygon with every side moved inwards by r (the skeleton of a polygon with corner radius r)."""
    area = np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    sign = 1.0 if area > 0 else -1.0
    lines = []
    for a, c in zip(poly, np.roll(poly, -1, axis=0)):
        d = unit(c - a)
        inward = sign * np.array([-d[1], d[0]])
        lines.append((a + inward * r, d))
    out = []
    for i, (p2, d2) in enumerate(lines):
        p1, d1 = lines[i - 1]
        t = np.linalg.solve(np.array([d1, -d2]).T, p2 - p1)[0]
        out.append(p1 + t * d1)
    return np.array(out, dtype=float)


def _box(points: np.ndarray, pad: float, shape: tuple[int, int]):
    lo = np.maximum(np.floor(points.min(axis=0) - pad).astype(int), 0)
    hi = np.minimum(np.ceil(points.max(axis=0) + pad).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    rows = np.arange(lo[0], hi[0], dtype=np.float32)[:, None]
    cols = np.arange(lo[1], hi[1], dtype=np.float32)[None, :]
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1])), rows, cols


def draw_bodies(att: np.ndarray, labels: np.ndarray, anatomy: Anatomy, place: Placement, look: dict,
                rng: np.random.Generator, label_of: dict[str, int], context_of: dict[str, int] | None = None) -> None:
    """Vertebral bodies at full resolution: rounded quadrilaterals with cortical rim, endplates and trabeculae.

    The label map receives exactly the drawn shape (signed distance < 0 at the pixel centre); `context_of`
    bodies (T12, S1) are labelled last, on pixels no `label_of` body took, so L1..L5 never depend on them.
    """
    context = []
    sp = place.spacing
    radius = look["corner_radius_mm"] / sp
    tex_factor = max(1, int(round(0.25 / sp)))
    for name, body in anatomy.bodies.items():
        body_look = {**look, **body.style} if body.style else look
        corners = place.px(body.corners)
        # Shrink by the corner radius, then grow back: rounded corners with the same straight sides.
        centre = corners.mean(axis=0)
        shrunk = _inset(corners, radius)
        box = _box(corners, 3.0 / sp + 2, att.shape)
        if box is None:
            continue
        region, rows, cols = box
        sdf, line_d, params = _convex_sdf(rows, cols, shrunk)
        sdf = sdf - radius
        for edge in range(4):  # endplates and walls are slightly concave
            u = np.clip(params[edge], 0.0, 1.0)
            reach = 0.3 * (body.height if edge % 2 == 0 else body.ap) / sp
            near = np.clip(1.0 - np.abs(line_d[edge] - radius) / reach, 0.0, 1.0)
            depth = body_look["endplate_concavity_mm"] if edge % 2 == 0 else body_look["wall_concavity_mm"]
            sdf = sdf + (depth / sp) * 4.0 * u * (1.0 - u) * near
        h, w = rows.shape[0], cols.shape[1]
        small = (-(-h // tex_factor), -(-w // tex_factor))
        patchy = upsample(smooth_noise(rng, small, 3.0 / (sp * tex_factor)), tex_factor, (h, w))
        sdf = sdf + (body_look["outline_mm"] / sp) * patchy  # real cortices are not ruler-straight
        d_mm = sdf * sp
        inside = 0.5 * erfc(d_mm / (np.sqrt(2.0) * body_look["edge_mm"]))
        sig = body_look["trabecular_mm"] / (sp * tex_factor)
        white = rng.standard_normal(small, dtype=np.float32)
        tex = ndimage.gaussian_filter(white, (sig * 1.6, sig)) - ndimage.gaussian_filter(white, 3.0 * sig)
        tex = upsample(tex / max(float(tex.std()), 1e-6), tex_factor, (h, w))
        n_px = unit(place.matrix @ body.normal)
        across = ((rows - centre[0]) * n_px[0] + (cols - centre[1]) * n_px[1]) * (2.0 * sp / body.ap)
        across = np.clip(1.0 - across**2, 0.0, 1.0)
        trabecular = body_look["trabecular"] * (0.75 + 0.25 * np.sqrt(across)) * (
            1.0 + body_look["trabecular_contrast"] * tex + 0.06 * patchy)
        to_endplate = np.minimum(np.abs(line_d[0] - radius), np.abs(line_d[2] - radius)) * sp
        sclerosis = 0.6 + 0.7 * np.exp(-((to_endplate / 1.5) ** 2))  # endplates are denser than the walls
        rim = body_look["cortex"] * sclerosis * np.exp(-(((d_mm + body_look["cortex_mm"]) / body_look["cortex_mm"]) ** 2))
        if body_look["double_endplate_mm"]:  # the far half of each endplate projects a little apart (beam divergence)
            shift = body_look["double_endplate_mm"] / sp
            for edge in (0, 2):
                ghost = (line_d[edge] - radius + shift * (1 if edge == 0 else -1)) * sp
                within = (params[edge] > 0.05) & (params[edge] < 0.95)
                profile = np.exp(-(((ghost + body_look["cortex_mm"]) / body_look["cortex_mm"]) ** 2))
                rim = rim + 0.5 * body_look["cortex"] * within * profile
        att[region] += inside * trabecular + rim
        if name in label_of:
            target = labels[region]
            target[(sdf < 0) & (target == 0)] = label_of[name]
        elif context_of and name in context_of:
            context.append((region, sdf < 0, context_of[name]))
    for triangle in anatomy.osteophytes:
        tri = place.px(triangle)
        box = _box(tri, 2.0 / sp + 2, att.shape)
        if box is None:
            continue
        region, rows, cols = box
        d_mm = _convex_sdf(rows, cols, tri)[0] * sp
        att[region] += look["cortex"] * 0.6 * 0.5 * erfc(d_mm / (np.sqrt(2.0) * look["edge_mm"]))
    for region, inside_mask, value in context:
        target = labels[region]
        target[inside_mask & (target == 0)] = value


def draw_dense(att: np.ndarray, anatomy: Anatomy, place: Placement) -> None:
    """Dense objects (metal implants, cement, fused bone) at full resolution: filled polygons, slightly blurred."""
    for poly_mm, density in anatomy.dense:
        poly = place.px(poly_mm)
        box = _box(poly, 3, att.shape)
        if box is None:
            continue
        region, _, _ = box
        layer = np.zeros(att[region].shape, np.float32)
        fill_polygon(layer, poly - np.array([region[0].start, region[1].start]), 1.0)
        att[region] += density * ndimage.gaussian_filter(layer, 0.7)


def draw_plaque(att: np.ndarray, path_px: np.ndarray, half_width_px: np.ndarray, strength: np.ndarray,
                mask: np.ndarray | None = None) -> None:
    """A thin bright deposit along a polyline, drawn segment by segment in small boxes (flat ends, round joints);
    `mask` (bool, image size) is set wherever the deposit adds density."""
    if len(path_px) < 2:
        return
    box = _box(path_px, float(half_width_px.max()) + 3, att.shape)
    if box is None:
        return
    region, _, _ = box
    local = np.zeros((region[0].stop - region[0].start, region[1].stop - region[1].start), np.float32)
    offset = np.array([region[0].start, region[1].start], dtype=float)
    last = len(path_px) - 2
    for k in range(len(path_px) - 1):
        a, c = path_px[k] - offset, path_px[k + 1] - offset
        hw = max(half_width_px[k], half_width_px[k + 1]) + 1.0
        seg = _box(np.array([a, c]), hw + 1, local.shape)
        if seg is None:
            continue
        sub, rows, cols = seg
        edge = c - a
        length = max(float(np.hypot(*edge)), 1e-6)
        d = edge / length
        dr, dc = rows - a[0], cols - a[1]
        u = dr * d[0] + dc * d[1]
        uc = np.clip(u, 0.0, length)
        dist = np.hypot(dr - uc * d[0], dc - uc * d[1])
        f = uc / length
        half = half_width_px[k] * (1 - f) + half_width_px[k + 1] * f + 0.5
        value = (strength[k] * (1 - f) + strength[k + 1] * f) * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, 1.0))
        if k == 0:
            value = value * (u >= 0)
        if k == last:
            value = value * (u <= length)
        np.maximum(local[sub], value, out=local[sub])
    att[region] += local
    if mask is not None:
        mask[region] |= local > 0
