"""Config loading: presets are TOML data files, overridden by a user file and `--set key=value`."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad configuration value; the message names the field (`section.key`)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field `{field}`: {message}")


class StageConfig:
    """Mixin for stage config dataclasses.

    EXECUTION_FIELDS name fields that change how a stage runs but not what it writes (threads,
    batch sizes, runners); they are left out of the parameter hash so changing them never
    invalidates shards.
    """

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset()
    SECTION: ClassVar[str] = ""
    # field -> "section.field" it takes when left unset (None): one setting, one place, e.g.
    # evaluate's retrieval thresholds are the retrieve stage's unless evaluate sets its own
    INHERITS: ClassVar[dict[str, str]] = {}

    def params(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: v for k, v in d.items() if k not in self.EXECUTION_FIELDS}

    def check(self, cond: bool, name: str, message: str) -> None:
        if not cond:
            raise ConfigError(f"{self.SECTION}.{name}", message)


PRESETS = ("demo", "paper")


def load_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("pipelines.presets").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); values parse as JSON when they can."""
    if "=" not in item:
        raise ConfigError(item, "overrides look like `section.key=value`")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(key, "overrides look like `section.key=value`")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_raw(preset: str = "demo", file: str | Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    raw = load_preset(preset)
    if file is not None:
        raw = merge(raw, read_config_file(Path(file)))
    for item in overrides or []:
        (section, key), value = parse_override(item)
        raw = merge(raw, {section: {key: value}})
    return raw


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML table of a `--config` file; any problem with the file is a ConfigError naming it."""
    if not path.exists():
        raise ConfigError("--config", f"file {path} does not exist")
    if not path.is_file():
        raise ConfigError("--config", f"{path} is not a file (a directory?)")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("--config", f"{path} is not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError("--config", f"{path} cannot be read: {e}") from e


def build(cls: type, section: str, values: dict[str, Any]) -> Any:
    """Construct a config dataclass from a dict, coercing types and naming any bad field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}",
                          f"unknown field; known fields: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(f"{section}.{k}", hints[k], v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(section, str(e)) from e


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, args[0], value)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(name, f"expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        seq = [_coerce(name, inner, v) for v in value] if inner is not Any else list(value)
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # inf/nan overflow timers and deadlines downstream
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    return value
