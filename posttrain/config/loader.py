"""The generic loader: defaults <- YAML file <- dotted overrides, checked against typed dataclasses.

YAML files and dotted command-line overrides are merged with OmegaConf (which gives us
`${policy.model_name}`-style interpolation), then the plain result is checked against the
dataclasses so that a typo or a wrong type fails at start-up with the key's full name. Nothing
here knows a section: any dataclass tree loads, and its `check()` runs last.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def require(condition: bool, message: str) -> None:
    """The one way a check fails: a ConfigError whose message names the key and the fix."""
    if not condition:
        raise ConfigError(message)


def positive(cfg: Any, *keys: str) -> None:
    """Each dotted key of `cfg` must be > 0."""
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        require(value > 0, f"{key} must be > 0, got {value}")


T = TypeVar("T")


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- dotted overrides, then type-checked against `schema`."""
    layers: list[tuple[str, DictConfig]] = []  # (where it came from, for errors; the layer)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open(encoding="utf-8") as f:
            try:
                loaded = OmegaConf.load(f)
            except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
                raise ConfigError(f"cannot parse config file {path}: {err}") from err
            except OSError as err:  # how OmegaConf rejects a file holding a single number or boolean
                raise ConfigError(f"config file {path} must hold a mapping of sections (policy:, data:, ...): "
                                  f"{err}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of sections (policy:, data:, ...), "
                              f"not a {type(loaded).__name__}")
        layers.append((f"config file {path}", loaded))
    layers.append(("the overrides", _parse_overrides(overrides or [])))
    merged = OmegaConf.create(to_dict(schema()))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except TypeError as err:  # a list meets a mapping; OmegaConf names neither the key nor the source
            clash = _container_clash(OmegaConf.to_container(merged), OmegaConf.to_container(layer))
            raise ConfigError(f"{source}: {clash or err}") from err
    try:
        merged = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config: {err}") from err
    cfg = from_dict(schema, merged)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def _container_clash(base: Any, layer: Any, key: str = "") -> str | None:
    """Names the dotted key where `layer` puts a list over a mapping of `base`, or a mapping over a list."""
    if isinstance(base, dict) and isinstance(layer, dict):
        for name, value in layer.items():
            if name in base and (found := _container_clash(base[name], value, f"{key}.{name}" if key else str(name))):
                return found
        return None
    if {type(base), type(layer)} != {dict, list}:
        return None
    kind = {dict: "a mapping", list: "a list"}
    return f"'{key}' must be {kind[type(base)]}, got {kind[type(layer)]}: {layer!r}"


def _parse_overrides(overrides: list[str]):
    cleaned = []
    for item in overrides:
        key, sep, _ = item.lstrip("+").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        cleaned.append(item.lstrip("+"))
    try:
        return OmegaConf.from_dotlist(cleaned)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {cleaned}: {err}") from err


def from_dict(schema: type[T], data: Any, prefix: str = "") -> T:
    """Build `schema` from plain data, failing on unknown keys and wrong types."""
    return _convert(schema, data, prefix)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'config'} must be a mapping (section {tp.__name__}), "
                              f"got {type(value).__name__}: {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        kwargs = {}
        for name, item in value.items():
            full = f"{key}.{name}" if key else str(name)
            if name not in names:
                close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
                hint = f"; did you mean '{key + '.' if key else ''}{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{full}'{hint} "
                                  f"(valid keys here: {', '.join(names)})")
            kwargs[name] = _convert(hints[name], item, full)
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key} expects {_type_name(tp)}, got {type(value).__name__}: {value!r}"
                          f"{_quote_hint(tp, value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} expects a list, got {type(value).__name__}: {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {type(value).__name__}: {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"{key} must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(f"{key} expects {_type_name(tp)}, got {type(value).__name__}: {value!r}"
                      f"{_quote_hint(tp, value)}")


def _quote_hint(tp: Any, value: Any) -> str:
    """A number is not turned into text: YAML has already rewritten it (010 is 8, 1.10 is 1.1)."""
    if str in (tp, *typing.get_args(tp)) and isinstance(value, int | float) and not isinstance(value, bool):
        return " (YAML read an unquoted number; quote the value to keep its text as written)"
    return ""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- saving


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config so a run can be reproduced from its own folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_escape_interpolation(to_dict(cfg)), sort_keys=False))
    return path


def _escape_interpolation(value: Any) -> Any:
    """The saved config is already resolved: a literal `${` must not be interpolated on reload."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape_interpolation(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolation(v) for v in value]
    return value


def config_hash(section: Any) -> str:
    """Stable short hash of a config section, recorded in checkpoints to refuse mismatched resumes."""
    payload = json.dumps(to_dict(section) if dataclasses.is_dataclass(section) else section, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
