"""TOML config files for the node (`config.toml` in its data directory) and the relay
(`pigeon relay --config FILE`): one loader for both.

A file may set any field of the config dataclass, under the field's name; each value must have
the field's type (arrays of strings for tuples). Unknown keys and wrong types are refused with a
ConfigError naming the key and the file, so a typo never goes unnoticed. Command-line flags
override the file: `load(cls, path, **overrides)` applies the overrides that are not None last.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from node.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["load"]

T = TypeVar("T", bound="DataclassInstance")


def load(cls: type[T], path: Path | None, **overrides: Any) -> T:
    """Defaults of the config dataclass `cls`, then the TOML file at `path` (if given), then the
    non-None overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:  # TOML is UTF-8 (TOML 1.0 "Spec")
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is not "
                              "valid UTF-8)") from exc
        defaults = cls()
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in document.items():
            if key not in names:
                raise ConfigError(f"unknown key {key!r} in config file {path}")
            values[key] = _convert(key, value, getattr(defaults, key), path)
    values |= {key: value for key, value in overrides.items() if value is not None}
    return cls(**values)


def _convert(key: str, value: Any, default: Any, path: Path) -> Any:
    if default == "auto":  # a list the program may choose itself (the device's relays)
        if value == "auto":
            return value
        default = ()
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r} must be an array of strings ({path})")
        return tuple(value)
    if isinstance(default, Path) or key == "data_dir":
        try:
            return Path(_expect(key, value, str, path)).expanduser()
        except RuntimeError:  # "~nosuchuser/...", or "~" without a home directory
            raise ConfigError(f"config key {key!r}: cannot expand {value!r} (no such user or "
                              f"no home directory) ({path})") from None
    if isinstance(default, bool):
        return _expect(key, value, bool, path)
    if isinstance(default, float):
        return float(_expect(key, value, (float, int), path))
    if isinstance(default, int):
        return _expect(key, value, int, path)
    return _expect(key, value, str, path)


def _expect(key: str, value: Any, kind: type | tuple[type, ...], path: Path) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"config key {key!r} must be {kinds[0].__name__}, not a boolean ({path})")
    if not isinstance(value, kinds):
        raise ConfigError(f"config key {key!r} must be {kinds[0].__name__} ({path})")
    return value
