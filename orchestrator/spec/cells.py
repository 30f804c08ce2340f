"""Grid cells that name the same model: a register depth without registers.

`model.register_depth` says where registers enter; with `model.num_registers: 0` there are none,
so every depth is the same model. A grid that crosses both axes (registers [0, 4] x depths
[0, 3, 6, 9], the paper's open question in one spec) would train the no-register baseline once
per depth. Such cells are the depth-0 cell: the depth is set to 0 and the repeats are dropped.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

DEPTH_KEY = "model.register_depth"
REGISTERS_KEY = "model.num_registers"


def canonical_cell(cell: Mapping[str, Any], base_registers: int) -> dict[str, Any]:
    """The cell with a register depth of 0 where it has no registers (the depth means nothing
    there); base_registers: the count of the base train config, for a cell that does not set it."""
    out = dict(cell)
    if out.get(DEPTH_KEY) and int(out.get(REGISTERS_KEY, base_registers)) == 0:
        out[DEPTH_KEY] = 0
    return out


def distinct_cells(cells: Iterable[Mapping[str, Any]], base_registers: int) -> list[dict[str, Any]]:
    """Canonical cells in order, each once."""
    kept: list[dict[str, Any]] = []
    for cell in cells:
        canonical = canonical_cell(cell, base_registers)
        if canonical not in kept:
            kept.append(canonical)
    return kept
