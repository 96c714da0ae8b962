"""``load_settings``: defaults < config file < environment < explicit overrides, validated once."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conveyor.config.problems import describe_errors
from conveyor.config.settings import Settings
from conveyor.config.sources import (
    Layer,
    env_layer,
    file_layer,
    find_config_file,
    overlaps,
    overrides_layer,
)
from conveyor.errors import ConfigError

__all__ = ["load_settings"]


def load_settings(
    config_file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the process's settings once, at start-up, from every source.

    Sources, later ones winning key by key (a deep merge, so a file's ``worker.concurrency`` and an
    environment's ``CONVEYOR_WORKER__QUEUES`` both apply):

    1. the defaults on ``Settings``;
    2. ``config_file``, else the file named by ``$CONVEYOR_CONFIG``, else the single ``./conveyor.yaml``,
       ``.yml``, ``.toml``, ``.json`` or ``.ini`` if there is one;
    3. ``CONVEYOR_*`` variables in ``environ`` (default ``os.environ``), ``__`` nesting a section:
       ``CONVEYOR_WORKER__CONCURRENCY=50``;
    4. ``overrides`` by dotted key, e.g. ``{"worker.concurrency": 50}``; ``None`` values are skipped so
       unset command-line flags can be passed straight through.

    Raises ``ConfigError`` for an unreadable or unparsable file, and for invalid settings with every
    problem listed as ``<dotted.key>: <problem> (from <source>)``. Unknown keys are errors.
    """
    # The one read of the process environment; everything after start-up gets the Settings value.
    env = os.environ if environ is None else environ
    layers: list[Layer] = []
    path = find_config_file(config_file, env)
    if path is not None:
        layers.append(file_layer(path))
    layers.append(env_layer(env))
    if overrides:
        layers.append(overrides_layer(overrides))

    merged = _merge(layers)
    try:
        return Settings.model_validate(_nest(merged))
    except ValidationError as exc:
        problems = describe_errors(exc, {key: entry.source for key, entry in merged.items()})
    # Raised outside the handler so the pydantic error is not even kept as __context__: its errors()
    # carry the raw input, database password included.
    raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


def _merge(layers: Iterable[Layer]) -> Layer:
    merged: Layer = {}
    for layer in layers:
        for key, entry in layer.items():
            # A later value replaces whatever an earlier layer set at, above or below the same key.
            for stale in [old for old in merged if overlaps(old, key)]:
                del merged[stale]
            merged[key] = entry
    return merged


def _nest(flat: Layer) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, entry in flat.items():
        node = tree
        for part in key[:-1]:
            # No key in `flat` lies inside another (see _merge), so this is always a dict we made.
            node = node.setdefault(part, {})
        node[key[-1]] = entry.value
    return tree
