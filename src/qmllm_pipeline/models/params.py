"""Typed, frozen settings from the parameters: one dataclass per stage and per attacker, built once where a node
starts (`parse(Stage1Settings, params, "pretrain.stage1")`), so every function below a node reads named,
checked fields instead of nested dicts. Plain Python: usable without Kedro, on a dict from anywhere.

An unknown key, a missing one or a value of the wrong type is one line naming the parameters file and the
dotted key (`conf/*/parameters_pretrain.yml: pretrain.stage1.training.stpes: unknown key ...`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping

RUN_KEYS = ("seed", "threads", "checkpoint_dir", "distributed")   # conf/*/parameters.yml: read by every pipeline


class SettingsError(ValueError):
    """A parameter that does not fit its settings: the message names the file and the key."""


def parameters_file(key: str) -> str:
    """The parameters file a dotted key lives in, by the project's convention (`parameters_<top key>.yml`)."""
    top = key.split(".")[0].split("[")[0]
    if top in RUN_KEYS:
        return "conf/*/parameters.yml"
    return "conf/*/parameters_pretrain.yml" if top == "variants" else f"conf/*/parameters_{top}.yml"


def where(key: str) -> str:
    return f"{parameters_file(key)}: {key}"


def parse(cls, values, key: str):
    """An instance of the frozen dataclass `cls` from `values` (the parameters found at the dotted `key`): every
    field converted to its annotated type (nested dataclasses, tuples, `Literal` choices, optional values)."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise SettingsError(f"{where(key)}: expected a mapping of {cls.__name__} settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = [name for name in values if name not in names]
    if unknown:
        raise SettingsError(f"{where(f'{key}.{unknown[0]}')}: unknown key (expected one of {', '.join(names)})")
    kwargs = {}
    for field in fields:
        if field.name in values:
            kwargs[field.name] = convert(values[field.name], hints[field.name], f"{key}.{field.name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{where(f'{key}.{field.name}')}: missing")
    return cls(**kwargs)


def convert(value, hint, key: str):
    """`value` as the type `hint` says, or a `SettingsError` naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, key)
            except SettingsError:
                continue
        raise SettingsError(f"{where(key)}: expected {_name(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise SettingsError(f"{where(key)}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where(key)}: expected a list, got {value!r}")
        return [convert(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where(key)}: expected a list, got {value!r}")
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise SettingsError(f"{where(key)}: expected {len(kinds)} values, got {len(value)}")
        return tuple(convert(v, kind, f"{key}[{i}]") for i, (v, kind) in enumerate(zip(value, kinds, strict=True)))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where(key)}: expected a mapping, got {value!r}")
        return {k: (convert(v, args[1], f"{key}.{k}") if args else v) for k, v in value.items()}
    return _scalar(value, hint, key)


def _scalar(value, hint, key: str):
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise SettingsError(f"{where(key)}: expected {_name(hint)}, got {value!r}")


def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
