"""Frozen config dataclasses from YAML recipes plus command-line overrides; where a run keeps its model.

A recipe is a YAML mapping whose keys are the dataclass's fields; a field that is itself a dataclass
(``model:``) is a nested mapping. Overrides use dotted keys (``model.hidden_size``). Unknown keys and
wrong types are rejected with the offending key named.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from recsys.errors import RecsysError


def _coerce(hint, name: str, value, source: str):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if typing.get_origin(t) is tuple:                        # a list in YAML, or "a,b,c" on the command line
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                inner = typing.get_args(t)[0]
                return tuple(_coerce(inner, f"{name}[{i}]", v.strip() if isinstance(v, str) else v, source)
                             for i, v in enumerate(items))
            continue
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
    raise RecsysError(f"{source}: '{name}' = {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def build_config(cls, values: dict, source: str = "config"):
    """Instantiate ``cls`` from a (nested) mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise RecsysError(f"{source}: unknown key(s) {unknown}; valid: {names}")
    kwargs = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise RecsysError(f"{source}: '{key}' must be a mapping of {hints[key].__name__} fields")
            kwargs[key] = build_config(hints[key], value, f"{source}: {key}")
        else:
            kwargs[key] = _coerce(hints[key], key, value, source)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecsysError(f"{source}: {e}") from None


RECIPES = Path(__file__).parent / "configs"
"""The bundled recipes, found by name (``--config sasrec_ml1m``)."""


def find_recipe(path: str | Path) -> Path:
    """A recipe file, or a bundled recipe named without directory or extension (``sasrec_ml1m``)."""
    path = Path(path)
    if path.exists():
        return path
    bundled = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and bundled.exists():
        return bundled
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise RecsysError(f"{path}: recipe not found (neither a file nor a bundled recipe: {names})")


def resolve_model_dir(path: str | Path, holds: str | None = None) -> Path:
    """The model directory of ``path``: a run directory (holding ``model/``) means ``RUN/model``, any other
    path is taken as the model directory itself. With ``holds`` (a file name, e.g. ``config.json``) a
    directory without that file is an error naming both; without, the loader that reads it checks."""
    path = Path(path)
    model = path / "model" if (path / "model").is_dir() else path
    if holds is not None and not (model / holds).exists():
        raise RecsysError(f"{path}: neither a run directory (with model/) nor a model directory (with {holds})")
    return model


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Build ``cls`` from a YAML recipe (optional) updated by ``overrides`` (dotted keys; ``None`` ignored)."""
    values: dict = {}
    source = "command line"
    if path is not None:
        path = find_recipe(path)
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise RecsysError(f"{path}: a recipe is a mapping of field: value")
        source = f"{path}" + (" + command line" if overrides else "")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = values
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build_config(cls, values, source)


def config_fields(module: str, cls: str) -> list[tuple[str, str, object, str]]:
    """(name, type annotation, default, docstring) of each field of dataclass ``cls`` in ``module`` (dotted), read
    from its source without importing it (the command line is built this way, so ``recsys serve`` never imports
    the training stack). Fields that are dataclasses themselves (``model:``) are left out: ``--set model.x=...``."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = []
    body = node.body
    for st, nxt in zip(body, body[1:] + [None]):
        if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)):
            continue
        if isinstance(st.value, ast.Call):                # field(default_factory=...): a nested dataclass
            continue
        try:
            default = ast.literal_eval(st.value) if st.value is not None else dataclasses.MISSING
        except ValueError:
            continue
        doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
            and isinstance(nxt.value.value, str) else ""
        out.append((st.target.id, ast.unparse(st.annotation), default, " ".join(doc.split())))
    return out


def add_config_arguments(parser, specs: list[tuple[str, str]], title: str) -> list[str]:
    """A ``--field-name`` option for every field of the config classes ``specs`` ((module, class) pairs) that
    ``parser`` does not define already, its help the field's docstring; returns their destinations. An option
    not given overrides nothing (the recipe's value, else the default, stands); a given one is checked against the
    field's type by :func:`load_config`, as a recipe's value is."""
    group = parser.add_argument_group(title)
    taken = set(parser._option_string_actions)
    dests: list[str] = []
    for module, cls in specs:
        for name, annotation, default, doc in config_fields(module, cls):
            flag = "--" + name.replace("_", "-")
            if flag in taken:
                continue
            shown = "" if default is dataclasses.MISSING or default is None else f" (default: {default!r})"
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=annotation.upper().replace(" ", ""),
                               help=(doc + shown).replace("%", "%%"))
            taken.add(flag)
            dests.append(name)
    return dests


def given_fields(args, dests: list[str]) -> dict:
    """The config fields given on the command line (their options' destinations in ``args``)."""
    return {d: getattr(args, d) for d in dests if hasattr(args, d)}
