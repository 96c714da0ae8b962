"""Reading a settings file (YAML, JSON, TOML or INI) into a plain nested mapping.

Parse errors name the file and, where the parser knows it, the line, but never quote the offending text:
the broken line may well be the one holding a database password.
"""

from __future__ import annotations

import configparser
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from conveyor.errors import ConfigError

__all__ = ["NAMESPACE", "SUPPORTED_SUFFIXES", "read_config_file"]

NAMESPACE = "conveyor"
"""The top-level key (or INI section) that holds Conveyor's settings in a file shared with other tools."""


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse ``path`` by its extension; the result may still hold sections under ``NAMESPACE``."""
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise ConfigError(f"config file {path}: unsupported extension {path.suffix!r}; use {supported}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    data = parser(path, text)
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a mapping of settings, not {type(data).__name__}")
    return data


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        # str(exc) quotes the surrounding lines; keep only the problem and its position.
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}: invalid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {type(exc).__name__}") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _parse_toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line N, column M)" and no source text.
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None


def _parse_ini(path: Path, text: str) -> Any:
    # interpolation=None: percent-encoded URLs ("p%40ss") are common and "%" would otherwise be syntax.
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            f"config file {path}: option {exc.option!r} repeated in [{exc.section}] at line {exc.lineno}"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"config file {path}: [{exc.section}] repeated at line {exc.lineno}") from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"config file {path}: invalid INI at line {exc.lineno}: a value before any [section]"
        ) from None
    except configparser.ParsingError as exc:
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        raise ConfigError(f"config file {path}: invalid INI at line {lines}") from None
    if parser.defaults():
        # [DEFAULT] values would be copied into every section, which the settings cannot mean.
        raise ConfigError(f"config file {path}: a [{parser.default_section}] section is not supported")
    data: dict[str, Any] = dict(parser.items(NAMESPACE)) if parser.has_section(NAMESPACE) else {}
    for section in parser.sections():
        if section == NAMESPACE:
            continue
        if section in data:
            # A [worker] section and a "worker = ..." line under [conveyor]: report it rather than pick one.
            raise ConfigError(f"config file {path}: {section!r} is both a section and a key in [{NAMESPACE}]")
        data[section] = dict(parser.items(section))
    return data


_PARSERS: dict[str, Callable[[Path, str], Any]] = {
    ".yaml": _parse_yaml,
    ".yml": _parse_yaml,
    ".json": _parse_json,
    ".toml": _parse_toml,
    ".ini": _parse_ini,
}

SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_PARSERS)
