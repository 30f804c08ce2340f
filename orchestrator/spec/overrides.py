"""The raw sweep spec before validation: reading the YAML and applying `--set` overrides.

A dotted path names one key in nested mappings: `optim.lr` is cfg["optim"]["lr"]. Two
places in a sweep spec are mappings whose own keys contain dots (`grid` and
`search.space`, keyed by dotted paths into `train`), so a path that enters one of them
takes the whole rest as a single key: `grid.model.num_registers` is
spec["grid"]["model.num_registers"].

Paths are checked against the pydantic schema rather than the raw YAML, so that
`--set train.optim.weight_decay=0.1` works when the YAML does not mention the key, and
`--set train.optim.lrr=0.1` fails naming the key.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, Union

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.spec.errors import SpecError

# ----------------------------------------------------------------------------- schema walk


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation can hold (through Optional/Union/Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _mapping_value_type(annotation: Any) -> Any | None:
    """V for an annotation dict[str, V] (through Optional), else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _mapping_value_type(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        found = [_mapping_value_type(a) for a in typing.get_args(annotation)]
        return next((f for f in found if f is not None), None)
    if origin is dict:
        return typing.get_args(annotation)[1]
    return None


def unknown_key_problem(known: Sequence[str], name: str | None = None, parent: str = "") -> str:
    """'unknown key; did you mean 'lr'? (known: ...)', or with a name: ''lrr' is not a key of train.optim; ...'."""
    head = "unknown key" if name is None else f"{name!r} is not a key of {parent or 'the spec'}"
    close = difflib.get_close_matches(name or "", known, n=1) if name else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{head}{hint} (known: {', '.join(known)})"


def _tag_of(model: type[BaseModel]) -> Any:
    """The Literal value of a model's 'type' field (a discriminated union's tag), if it has one."""
    field = model.model_fields.get("type")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _walk_loc(loc: Sequence[Any], schema: type[BaseModel]) -> tuple[str, list[type[BaseModel]]]:
    """(dotted path as the user wrote it, models that the location can hold) for a pydantic loc.

    Discriminator tags that pydantic puts in locations (search.space.x.loguniform.low) are
    dropped, keys of grid/search.space stay whole, list indices show as [i].
    """
    shown: list[str] = []
    models: list[type[BaseModel]] = [schema]
    entry_models: list[type[BaseModel]] | None = None  # set when the next part is a mapping key
    for part in loc:
        if isinstance(part, int):
            shown[-1:] = [f"{shown[-1] if shown else ''}[{part}]"]
            models = []
            continue
        if entry_models is not None:
            shown.append(part)
            models, entry_models = entry_models, None
            continue
        tagged = [m for m in models if _tag_of(m) == part]
        if tagged and len(models) > 1:
            models = tagged
            continue
        shown.append(part)
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            models = []
            continue
        value_type = _mapping_value_type(field.annotation)
        if value_type is not None:
            entry_models, models = _models_in(value_type), []
        else:
            models = _models_in(field.annotation)
    return ".".join(shown), models


def first_problem(err: ValidationError, schema: type[BaseModel]) -> tuple[str, str]:
    """(key path, problem) of the first error of a pydantic ValidationError, worded for a user."""
    first = err.errors(include_url=False)[0]
    loc, kind, msg = first["loc"], first["type"], first["msg"]
    where, _ = _walk_loc(loc, schema)
    ctx = first.get("ctx") or {}
    if kind == "extra_forbidden":
        _, parents = _walk_loc(loc[:-1], schema)
        known = [name for m in parents for name in m.model_fields]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return where, f"unknown key{hint} (known: {', '.join(known)})" if known else "unknown key"
    if kind == "union_tag_invalid":
        return f"{where}.type", f"must be one of {ctx.get('expected_tags', '')} (got {ctx.get('tag')!r})"
    if kind == "union_tag_not_found":
        return where, "missing 'type' (uniform, loguniform, int or choice)"
    if kind == "missing":
        return where, "missing required key"
    if kind == "list_type" and len(loc) == 2 and loc[0] == "grid":
        return where, "an axis is a list of values; a single value belongs in train"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return where, msg


def schema_path_problem(schema: type[BaseModel], path: str, root: str = "train") -> str | None:
    """Why `path` does not name a field (at any depth) of `schema`, or None when it does."""
    node = schema
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            return unknown_key_problem(list(fields), part, ".".join([root, *parts[:i]]))
        if i == len(parts) - 1:
            return None
        models = _models_in(fields[part].annotation)
        if len(models) != 1:
            return f"{'.'.join(parts[: i + 1])} holds a value, not a mapping"
        node = models[0]
    return None


# ----------------------------------------------------------------------------- --set


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, YAML-parsed value)."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set {text}", "expected key=value, e.g. --set train.steps=50")
    try:
        return key, yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"--set {key}", f"cannot parse the value as YAML: {problem}", raw_value) from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], schema: type[BaseModel]) -> dict[str, Any]:
    """A copy of the raw spec with each 'key=value' applied; key is a dotted path into the whole spec.

    For `grid` and `search.space`, the rest of the path after the mapping's name is one key
    (`grid.model.num_registers`); `search.space.optim.lr.low` sets one field of an existing
    entry. A null value for a grid or search-space entry removes it.
    """
    result = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        _apply_one(result, schema, key, value)
    return result


def _apply_one(raw: dict[str, Any], schema: type[BaseModel], key: str, value: Any) -> None:
    parts = key.split(".")
    node, model = raw, schema
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            parent = ".".join(parts[:i]) or "the spec"
            raise SpecError(f"--set {key}", unknown_key_problem(list(model.model_fields), part, parent))
        annotation = model.model_fields[part].annotation
        rest = ".".join(parts[i + 1 :])
        if not rest:
            node[part] = value
            return
        mapping_value = _mapping_value_type(annotation)
        if mapping_value is not None:  # grid / search.space: the rest is one dotted key
            entries = node.get(part)
            if not isinstance(entries, dict):
                entries = node[part] = {}
            _set_mapping_entry(entries, rest, value, _models_in(mapping_value))
            return
        models = _models_in(annotation)
        if len(models) != 1:
            raise SpecError(f"--set {key}", f"{'.'.join(parts[: i + 1])} holds a value, not a mapping")
        child = node.get(part)
        if not isinstance(child, dict):  # absent or null (e.g. `scheduler: null`): start a block
            child = node[part] = {}
        node, model = child, models[0]


def _set_mapping_entry(entries: dict[str, Any], rest: str, value: Any, entry_models: list[type[BaseModel]]) -> None:
    head, _, field = rest.rpartition(".")
    entry_fields = {name for m in entry_models for name in m.model_fields}
    if head in entries and field in entry_fields and isinstance(entries[head], dict):
        entries[head][field] = value  # search.space.optim.lr.low=1e-5
    elif value is None:
        entries.pop(rest, None)
    else:
        entries[rest] = value


# ----------------------------------------------------------------------------- reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        except TypeError:  # unhashable key: let construct_mapping report it
            break
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    """The raw mapping in a spec file; SpecError (without the file name) for anything else."""
    if not path.exists():
        raise SpecError("", "no such file")
    if path.is_dir():
        raise SpecError("", "is a directory, not a YAML file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        start = getattr(err, "context_mark", None)
        if start is not None and getattr(err, "context", None) and start.line != getattr(mark, "line", None):
            problem += f" ({err.context} started at line {start.line + 1})"  # type: ignore[attr-defined]
        raise SpecError(where, f"invalid YAML: {problem}") from None
    except UnicodeDecodeError as err:
        raise SpecError("", f"not a text file: {err.reason}") from None
    if data is None:
        raise SpecError("", "empty file; a spec needs at least 'name' and 'train'")
    if not isinstance(data, dict):
        raise SpecError("", f"the top level must be a mapping of keys (name, train, grid, ...), not a {type(data).__name__}", data)
    return data
