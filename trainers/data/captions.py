"""Captions of the generated 'shapes' images, read off each image's own parameters.

A caption names what is rendered: the object's size, colour, shape kind and position, and the
background's colour, e.g. "a large red ring in the top left on a blue background". Colours are
named by the nearest entry of a small palette to the colour actually drawn (the object colour
clamped to [0, 1], as the renderer clamps it), so the words agree with the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ParameterLayout:
    """Where the shapes generator keeps what a caption names, in its per-image parameter rows
    (trainers/data/shapes.py builds it; passed in so that this module needs nothing from there)."""

    shape_names: tuple[str, ...]
    area_per_r2: tuple[float, ...]  # object area / extent^2, per shape kind
    object_area: tuple[float, float]  # the range objects are drawn in, as a fraction of the image
    cx: int
    cy: int
    extent: int
    fg: slice  # object colour
    bg: slice  # background base colour


def captions(params: torch.Tensor, labels: torch.Tensor, layout: ParameterLayout) -> list[str]:
    """One caption per row of a shapes parameter table (CPU tensors from shapes.draw_parameters)."""
    params, labels = params.cpu(), labels.cpu()
    area_per_r2 = torch.tensor(layout.area_per_r2)[labels]
    area = params[:, layout.extent] ** 2 * area_per_r2  # before edge clipping, as drawn
    low, high = layout.object_area
    size = ((area - low) / (high - low) * 3).floor().clamp(0, 2).long().tolist()
    # Columns and rows in thirds of the image; y grows downwards (row 0 is the top).
    col = (params[:, layout.cx] * 3).floor().clamp(0, 2).long().tolist()
    row = (params[:, layout.cy] * 3).floor().clamp(0, 2).long().tolist()
    colour = colour_names(params[:, layout.fg].clamp(0.0, 1.0))
    background = colour_names(params[:, layout.bg])
    return [
        f"a {SIZE_WORDS[s]} {c} {layout.shape_names[k]} {position_phrase(r, x)} on a {b} background"
        for s, c, k, r, x, b in zip(size, colour, labels.tolist(), row, col, background)
    ]
