"""Dotted paths into nested mappings: `optim.lr` is cfg["optim"]["lr"].

Used by the spec (grid axes and `--set` keys) and by the trial adapter, which builds each
trial's config by setting its axes' values into the base config.
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec.errors import short_repr


def set_dotted(cfg: dict[str, Any], path: str, value: Any) -> None:
    """cfg[a][b][c] = value for path 'a.b.c', creating missing intermediate mappings."""
    *parents, leaf = path.split(".")
    node = cfg
    for i, key in enumerate(parents):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KeyError(f"{'.'.join(parents[: i + 1])} is not a mapping (it holds {short_repr(child)})")
        node = child
    node[leaf] = value


def get_dotted(cfg: dict[str, Any], path: str) -> Any:
    """cfg[a][b][c] for path 'a.b.c'; KeyError naming the path when it is absent."""
    node: Any = cfg
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node
