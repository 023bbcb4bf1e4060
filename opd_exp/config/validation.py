"""Config validation: turn a composed DictConfig into a typed dataclass or fail with one clear line.

Every dataclass field may carry constraints in its metadata, written with :func:`spec`:

    top_p: float = spec(1.0, "nucleus mass kept when sampling", gt=0.0, le=1.0)

:func:`validate` checks unknown keys (suggesting the closest valid one), types, ranges and choices, and
raises :class:`ConfigError` whose message names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message names the field, the value and the allowed values."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config error: {field}: {message}")
        self.field = field


def spec(default: Any = dataclasses.MISSING, doc: str = "", *, choices=None, ge=None, gt=None, le=None,
         lt=None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line doc and range/choice constraints checked by :func:`validate`."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def closest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' when a valid name is close to ``name``, else ''."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _to_plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list, dict, Optional, Literal,
    nested dataclass); ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(field, f"got {value!r}, expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        return validate(tp, value, field)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"got {value!r}, expected a list")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"got {value!r}, expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, f"got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field, f"got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"got {value!r}, expected a string")
        return value
    return value


def _check_constraints(value: Any, meta: Mapping[str, Any], field: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(str, choices))
        hint = closest(str(value), [str(c) for c in choices])
        raise ConfigError(field, f"got {value!r}, allowed values: {allowed}{hint}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    broken = [(sym, meta[key]) for key, sym, ok in bounds if meta.get(key) is not None
              and not ok(value, meta[key])]
    if broken:
        allowed = " and ".join(f"{sym} {bound}" for key, sym, ok in bounds
                               if (bound := meta.get(key)) is not None)
        raise ConfigError(field, f"got {value!r}, allowed: {allowed}")


def validate(cls: type[T], node: Any, prefix: str = "") -> T:
    """Build ``cls`` from a mapping, checking keys, types and constraints; raise :class:`ConfigError`."""
    node = _to_plain(node)
    where = prefix or "<root>"
    if node is None:
        node = {}
    if not isinstance(node, Mapping):
        raise ConfigError(where, f"got {node!r}, expected a mapping of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in node:
        if key not in fields:
            shown = str(key) or repr(key)  # an empty key (YAML `"": 1`) still gets a visible name
            name = f"{prefix}.{shown}" if prefix else shown
            valid = sorted(fields)
            raise ConfigError(name, f"unknown key{closest(str(key), valid)}; valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in node:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(path, "missing required value")
            continue
        value = _coerce(node[name], hints[name], path)
        _check_constraints(value, f.metadata, path)
        kwargs[name] = value
    return cls(**kwargs)


def check_paths(cfg: Any) -> None:
    """Checks of a validated RunConfig against the file system and the token list's types, before any work:
    the tiny pair's cache dir (``model.cache_dir``, set by env ``OPD_EXP_CACHE``) must be, or be creatable as,
    a directory; ``mask.tokens`` must hold token strings or non-negative ids (whether each is in the vocabulary
    is checked once the tokenizer is loaded)."""
    if cfg.model.kind == "tiny":
        path = Path(cfg.model.cache_dir).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "it" if existing == path else f"{existing}"
            raise ConfigError("model.cache_dir", f"got {str(path)!r}: {where} is a file, not a directory (set by "
                              f"env OPD_EXP_CACHE?); point it at a directory")
    for tok in cfg.mask.tokens or []:
        if isinstance(tok, bool) or not isinstance(tok, (str, int)) or (isinstance(tok, int) and tok < 0):
            raise ConfigError("mask.tokens", f"got {tok!r} in {cfg.mask.tokens!r}, allowed: token strings or "
                              f"ids >= 0")
