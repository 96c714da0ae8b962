"""The places settings come from, each turned into a *layer*: a flat map from key path to value and source.

Keeping every value's source beside it is what lets a validation error say where the bad value came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from conveyor.config.files import NAMESPACE, SUPPORTED_SUFFIXES, read_config_file
from conveyor.config.settings import Settings
from conveyor.errors import ConfigError

__all__ = [
    "COMMAND_LINE",
    "CONFIG_ENV",
    "ENV_PREFIX",
    "Entry",
    "Key",
    "Layer",
    "dotted",
    "env_layer",
    "file_layer",
    "find_config_file",
    "overlaps",
    "overrides_layer",
]

Key = tuple[str, ...]
"""A setting's path, ``("worker", "concurrency")`` for ``worker.concurrency``."""

ENV_PREFIX = "CONVEYOR_"
CONFIG_ENV = "CONVEYOR_CONFIG"
COMMAND_LINE = "command line"


class Entry(NamedTuple):
    value: Any
    source: str
    """The file path, environment variable name or ``COMMAND_LINE`` the value came from."""


Layer = dict[Key, Entry]


def dotted(key: Key) -> str:
    return ".".join(key)


def find_config_file(config_file: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    """The file to read: the explicit one, else ``$CONVEYOR_CONFIG``, else the one ``./conveyor.*``."""
    if config_file is not None:
        return Path(config_file)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    found = [path for path in (Path(f"conveyor{suffix}") for suffix in SUPPORTED_SUFFIXES) if path.is_file()]
    if len(found) > 1:
        # Picking one by a hidden rule would leave the other silently ignored.
        names = ", ".join(map(str, found))
        raise ConfigError(f"several config files in {Path.cwd()}: {names}; keep one or set {CONFIG_ENV}")
    return found[0] if found else None


def file_layer(path: Path) -> Layer:
    """The settings in a file; they may sit at the top level or under a ``conveyor`` key."""
    data: Mapping[str, Any] = read_config_file(path)
    if NAMESPACE in data:
        # Sibling keys belong to other tools sharing the file, unless they are ours put in the wrong place.
        misplaced = sorted(set(data) & set(Settings.model_fields))
        if misplaced:
            names = ", ".join(misplaced)
            raise ConfigError(f"config file {path}: {names} must go under {NAMESPACE!r} like the rest")
        section = data[NAMESPACE]
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"config file {path}: {NAMESPACE!r} must hold a mapping of settings")
        data = section or {}
    layer: Layer = {}
    _add_tree(layer, (), data, str(path), skip_none=False)
    return layer


def env_layer(environ: Mapping[str, str]) -> Layer:
    """``CONVEYOR_*`` variables; a double underscore nests (``CONVEYOR_WORKER__CONCURRENCY``)."""
    layer: Layer = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = tuple(name.removeprefix(ENV_PREFIX).lower().split("__"))
        if not all(key):
            example = "CONVEYOR_WORKER__CONCURRENCY"
            raise ConfigError(f"{name}: not a settings variable; nest with a double underscore: {example}")
        _add(layer, key, Entry(value, name))
    return layer


def overrides_layer(overrides: Mapping[str, Any]) -> Layer:
    """Explicit values such as command-line flags, by dotted key; ``None`` means "not given"."""
    layer: Layer = {}
    _add_tree(layer, (), overrides, COMMAND_LINE, skip_none=True)
    return layer


def _add_tree(layer: Layer, prefix: Key, tree: Mapping[Any, Any], source: str, *, skip_none: bool) -> None:
    for name, value in tree.items():
        if not isinstance(name, str) or not all(parts := name.split(".")):
            where = f" under {dotted(prefix)}" if prefix else ""
            raise ConfigError(f"{source}: {name!r}{where} is not a settings key")
        key = (*prefix, *parts)
        if isinstance(value, Mapping):
            _add_tree(layer, key, value, source, skip_none=skip_none)
        elif value is not None or not skip_none:
            _add(layer, key, Entry(value, source))


def _add(layer: Layer, key: Key, entry: Entry) -> None:
    for other, other_entry in layer.items():
        if overlaps(key, other):
            # "worker = 3" beside "worker.concurrency = 5" has no meaning; say so instead of picking one.
            mine = f"{dotted(key)} (from {entry.source})"
            raise ConfigError(f"{mine} conflicts with {dotted(other)} (from {other_entry.source})")
    layer[key] = entry


def overlaps(a: Key, b: Key) -> bool:
    """Whether one key is the other or lies inside it."""
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]
