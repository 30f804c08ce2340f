"""Captions of the generated 'shapes' images, read off each image's own parameters.

A caption names what is rendered: the object's size, colour, shape kind and position, and the
background's colour, e.g. "a large red ring in the top left on a blue background". Colours are
named by the nearest entry of a small palette to the colour actually drawn (the object colour
clamped to [0, 1], as the renderer clamps it), so the words agree with the pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Plain colour words and their RGB in [0, 1]: few enough that each is a clear region of colour space.
PALETTE: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "grey": (0.5, 0.5, 0.5),
    "red": (0.85, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (0.95, 0.9, 0.1),
    "green": (0.1, 0.7, 0.2),
    "cyan": (0.1, 0.8, 0.85),
    "blue": (0.1, 0.25, 0.9),
    "purple": (0.55, 0.2, 0.75),
    "pink": (1.0, 0.55, 0.75),
    "brown": (0.5, 0.3, 0.1),
}
COLOUR_NAMES = tuple(PALETTE)
_PALETTE_RGB = torch.tensor(list(PALETTE.values()))
SIZE_WORDS = ("small", "medium", "large")  # thirds of the object-area range
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "centre", "right")


def colour_names(rgb: torch.Tensor) -> list[str]:
    """Nearest palette name of each colour in rgb [n, 3] (values in [0, 1])."""
    distances = torch.cdist(rgb.float().cpu(), _PALETTE_RGB)
    return [COLOUR_NAMES[i] for i in distances.argmin(dim=1).tolist()]


def position_phrase(row: int, col: int) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the centre', ... for a 3 x 3 cell."""
    vertical, horizontal = _ROWS[row], _COLS[col]
    if vertical == "middle":
        return "in the centre" if horizontal == "centre" else f"on the {horizontal}"
    return f"at the {vertical}" if horizontal == "centre" else f"in the {vertical} {horizontal}"


def describe(
    shapes: Sequence[str], area: torch.Tensor, area_range: tuple[float, float], cx: torch.Tensor, cy: torch.Tensor,
    colour: torch.Tensor, background: torch.Tensor,
) -> list[str]:
    """One caption per object: its shape name, area (thirds of area_range), centre (x, y in [0, 1],
    y down), drawn colour and background colour (rgb [n, 3]). shapes.py passes its parameter columns."""
    low, high = area_range
    size = ((area.cpu() - low) / (high - low) * 3).floor().clamp(0, 2).long().tolist()
    # Columns and rows in thirds of the image; y grows downwards (row 0 is the top).
    col = (cx.cpu() * 3).floor().clamp(0, 2).long().tolist()
    row = (cy.cpu() * 3).floor().clamp(0, 2).long().tolist()
    return [
        f"a {SIZE_WORDS[s]} {c} {shape} {position_phrase(r, x)} on a {b} background"
        for s, c, shape, r, x, b in zip(size, colour_names(colour), shapes, row, col, colour_names(background))
    ]
