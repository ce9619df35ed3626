"""``--set path=value`` overrides of a (nested, frozen) dataclass configuration, and its JSON form.

    cfg = apply_overrides(get_config("cpu"), ["train.total_steps=100", "pnp.threshold_px=1.0",
                                              "variants=baseline,lc", "objects=(1, 5)"])

A path names a field, through nested dataclasses with dots (``train.learning_rate``,
``pnp.use_mask``). A value is read as a Python literal (``100``, ``1e-3``, ``True``, ``None``,
``(1, 5)``) when it parses as one, else taken as a string; a comma-separated value of a tuple
field becomes a tuple of literals (``variants=baseline,lc``). Lists become tuples (the
configurations are hashable). The new configuration runs its ``__post_init__`` checks, and an
unknown path is a ValueError listing the fields there.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from typing import Any, Sequence

__all__ = ["apply_overrides", "parse_value", "config_to_json"]


def parse_value(text: str, is_tuple: bool = False) -> Any:
    """A literal from ``text`` (else the string); for a tuple field, a comma list or a single
    value becomes a tuple."""
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
        if is_tuple:
            value = tuple(parse_value(p) for p in text.split(",") if p.strip())
    if is_tuple and value is not None and not isinstance(value, (list, tuple)):
        value = (value,)
    return _tuples(value)


def _tuples(v):
    if isinstance(v, (list, tuple)):
        return tuple(_tuples(x) for x in v)
    return v


def _set(cfg, path: Sequence[str], text: str, full: str):
    if not dataclasses.is_dataclass(cfg):
        raise ValueError(f"--set {full}: {'.'.join(path)} is not inside a configuration")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    head, rest = path[0], path[1:]
    if head not in fields:
        raise ValueError(f"--set {full}: {type(cfg).__name__} has no field {head!r}; "
                         f"fields: {', '.join(fields)}")
    current = getattr(cfg, head)
    if rest:
        new = _set(current, rest, text, full)
    else:
        # the annotation says whether a field holds a tuple (also when it is None now)
        is_tuple = isinstance(current, tuple) or "Tuple" in str(fields[head].type) \
            or "Sequence" in str(fields[head].type)
        new = parse_value(text, is_tuple)
    return dataclasses.replace(cfg, **{head: new})


def apply_overrides(cfg, assignments: Sequence[str]):
    """``cfg`` with each ``path=value`` of ``assignments`` applied in order."""
    for a in assignments or ():
        if "=" not in a:
            raise ValueError(f"--set expects path=value, got {a!r}")
        path, text = a.split("=", 1)
        path = path.strip()
        if not path:
            raise ValueError(f"--set expects path=value, got {a!r}")
        cfg = _set(cfg, path.split("."), text, a)
    return cfg


def config_to_json(cfg) -> Any:
    """JSON-ready nested dicts of a dataclass configuration (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_json(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_json(v) for k, v in cfg.items()}
    return json.loads(json.dumps(cfg, default=str))
