"""The one way mordasr turns parsed JSON/YAML/TOML into its dataclasses (manifests, device profiles,
model and training configs, engine options, tiling): ``from_dict``.

An unknown key, a missing required key or a value of the wrong type is a ``RecordError`` that
names the dotted path of the key and where the data came from; nested dataclasses, lists of them
and tuples are built from their type hints. Torch-free: the runtime reads its manifests with it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from mordasr.errors import MordasrError

T = TypeVar("T")


class RecordError(MordasrError, ValueError):
    """Data that does not fit the dataclass it is read into."""


def from_dict(cls: type[T], data: Any, where: str, *, coerce: bool = False, path: str = "") -> T:
    """``cls`` built from ``data`` (a dict). ``where`` names the source in messages (a file, "model
    config"). ``coerce``: config files typed by hand, so "1e-3" may stand for a float and 2.0 for an
    int; records written by mordasr itself are taken as they are."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: {path or 'the record'} should be a table of keys, not {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise RecordError(f"{where}: unknown key {_join(path, unknown[0])!r} (known here: {known})")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(f"{where}: missing key {_join(path, missing[0])!r}")
    values = {name: _value(hints[name], value, where, _join(path, name), coerce) for name, value in data.items()}
    return cls(**values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _value(hint: Any, value: Any, where: str, path: str, coerce: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _value(options[0], value, where, path, coerce) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value, where, coerce=coerce, path=path)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise RecordError(f"{where}: {path} should be a list, not {value!r}")
        return [from_dict(args[0], item, where, coerce=coerce, path=f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if coerce:
                raise RecordError(f"{where}: {path} takes a list, not {value!r}")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], v, where, path, coerce) for v in value)
        if len(args) == len(value):
            return tuple(_value(a, v, where, path, coerce) for a, v in zip(args, value))
        return tuple(value)
    if coerce:
        return _coerce(hint, value, where, path)
    return value


def _coerce(hint: Any, value: Any, where: str, path: str) -> Any:
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise RecordError(f"{where}: {path} takes a number, not {value!r}") from None
    if hint is int and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not number.is_integer():
            raise RecordError(f"{where}: {path} takes an integer, not {value!r}")
        return int(number)
    if hint is bool and not isinstance(value, bool):
        raise RecordError(f"{where}: {path} takes true or false, not {value!r}")
    if hint is str and not isinstance(value, str):
        raise RecordError(f"{where}: {path} takes text, not {value!r}")
    return value
