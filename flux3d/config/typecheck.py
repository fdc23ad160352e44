"""Config dataclasses from plain data (TOML, JSON, a checkpoint's config.json): unknown keys and wrong types are
ValueErrors. The pipeline, training and evaluation configs are all built here, so all three check alike.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Validate one TOML value against a field annotation (the subset of types config fields use)."""
    if tp is Any:  # a table of changes on another config, checked when that config is built from it
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(where, value, arm)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} matches none of {tp}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        key_tp, item_tp = typing.get_args(tp)
        return {_check_type(f"{where} key", k, key_tp): _check_type(f"{where}.{k}", v, item_tp)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ValueError(f"{where}: unsupported field type {tp}")


def build_dataclass(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """A config dataclass from plain data (TOML, JSON), nested sections included; unknown keys and wrong types are
    ValueErrors, and each dataclass's own checks run. The training and evaluation configs are built the same way."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown key(s) in [{where or 'top level'}]: {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub_where = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"[{sub_where}] must be a table")
            kwargs[name] = build_dataclass(tp, value, sub_where)
        else:
            kwargs[name] = _check_type(sub_where, value, tp)
    return cls(**kwargs)


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it table by table: nested tables merge, any other value replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
