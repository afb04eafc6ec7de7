"""Frozen config dataclasses from YAML recipes plus command-line overrides.

A recipe is a flat YAML mapping whose keys are the dataclass's fields. Unknown keys and wrong types
are rejected with the offending key named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from recsys.errors import RecsysError


def _coerce(cls, name: str, value, source: str):
    hint = typing.get_type_hints(cls)[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if t is int and float(value) != int(value):
                continue
            return t(value)
        if t is str and isinstance(value, str):
            return value
        if isinstance(value, str) and t in (int, float, bool):  # from the command line
            try:
                return {"true": True, "false": False}[value.lower()] if t is bool else t(value)
            except (ValueError, KeyError):
                continue
    raise RecsysError(f"{source}: '{name}' = {value!r} is not a valid {hint}")


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Build ``cls`` from a YAML recipe (optional) updated by ``overrides`` (``None`` values ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise RecsysError(f"{path}: recipe not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RecsysError(f"{path}: a recipe is a mapping of field: value")
        unknown = sorted(set(loaded) - fields)
        if unknown:
            raise RecsysError(f"{path}: unknown key(s) {unknown}; valid: {sorted(fields)}")
        values.update({k: _coerce(cls, k, v, str(path)) for k, v in loaded.items()})
    for k, v in (overrides or {}).items():
        if v is not None:
            if k not in fields:
                raise RecsysError(f"unknown option {k!r}; valid: {sorted(fields)}")
            values[k] = _coerce(cls, k, v, "command line")
    try:
        return cls(**values)
    except TypeError as e:
        raise RecsysError(f"{cls.__name__}: {e}") from None
