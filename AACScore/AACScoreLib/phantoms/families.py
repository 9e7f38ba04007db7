"""The phantom families: name -> how to make one phantom, what it is, and whether it is held out of training.

Families differ in how anatomy is modelled and how the image is formed, so that models meet more than one
generator's look. One family is held out of all training of the shipped models and reported on (README,
"Synthetic phantoms"). A family is one line here: a generate function `(seed, index, severity, size_range) ->
Phantom`, fully determined by its arguments, and a one-line description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .drawn import generate_drawn
from .projected import generate_projected
from .truth import Phantom
from .varied import SITE_SEEDS, generate_site, generate_varied

Generate = Callable[[int, int, Sequence[float], tuple[int, int]], Phantom]


@dataclass(frozen=True)
class Family:
    generate: Generate
    description: str
    held_out: bool = False


FAMILIES: dict[str, Family] = {
    "default": Family(lambda seed, index, severity, size: generate_drawn(seed, "default", index, severity, size),
                      "2D drawn anatomy and detector model"),
    "alt": Family(lambda seed, index, severity, size: generate_drawn(seed, "alt", index, severity, size),
                  "2D drawn, wider ranges of densities, discs, noise and processing"),
    "varied": Family(generate_varied, "2D, other anatomy and image models: transitional vertebrae, fractures, "
                     "sacrum out of view, DXA-like, implants, inverted looks, varied plaque", held_out=True),
    "site": Family(generate_site, f"the varied family with one look per site (seeds // {SITE_SEEDS}): densities, "
                   "processing, detector, DXA or not, inversion shared, as one protocol gives; for fine-tuning tests",
                   held_out=True),
    "projected": Family(generate_projected, "3D anatomy projected through a cone beam with Beer-Lambert attenuation "
                        "(obliquity, double endplates, overlap and transitional anatomy from geometry)"),
}
# The family kept out of all training of the shipped models and reported on (tests and reports only); "site" is
# drawn from it and is kept out too.
HELD_OUT_FAMILY: str | None = next((name for name, family in FAMILIES.items() if family.held_out), None)
