"""Turning pydantic's validation errors into lines an operator can act on.

Each line reads ``<dotted.key>: <problem> (from <source>)``. Only pydantic's message and context are used,
never the rejected input, because the input may be a database URL with its password.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from conveyor.config.settings import MUST_EXCEED, Settings
from conveyor.config.sources import Key, dotted

__all__ = ["DEFAULTS", "describe_errors"]

DEFAULTS = "defaults"
"""The source named for a value nobody set."""

_SECTION_TYPES = frozenset({"model_type", "model_attributes_type", "dict_type"})
_FIXED_PROBLEMS = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list or a comma-separated string",
    "path_type": "must be a filesystem path",
}


def describe_errors(error: ValidationError, sources: Mapping[Key, str]) -> list[str]:
    """One line per problem in ``error``; ``sources`` maps each key that was set to where it was set."""
    lines = []
    for detail in error.errors(include_url=False, include_input=False):
        loc = tuple(str(part) for part in detail["loc"])
        if detail["type"] == MUST_EXCEED:
            lines.append(_describe_must_exceed(loc, detail, sources))
        else:
            lines.append(f"{_display(detail['loc'])}: {_problem(loc, detail)} (from {_source(loc, sources)})")
    return lines


def _describe_must_exceed(section: Key, detail: ErrorDetails, sources: Mapping[Key, str]) -> str:
    ctx = detail.get("ctx", {})
    key, other = (*section, ctx["field"]), (*section, ctx["other"])
    origin, other_origin = _source(key, sources), _source(other, sources)
    also = "" if other_origin == origin else f"; {dotted(other)} from {other_origin}"
    problem = f"must be greater than {dotted(other)} ({ctx['value']} <= {ctx['floor']})"
    return f"{dotted(key)}: {problem} (from {origin}{also})"


def _problem(loc: Key, detail: ErrorDetails) -> str:
    kind, ctx = detail["type"], detail.get("ctx", {})
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(loc)
    if kind in _SECTION_TYPES:
        return "must be a section of keys, not a single value"
    if kind in _FIXED_PROBLEMS:
        return _FIXED_PROBLEMS[kind]
    bounds = {
        "greater_than": ("must be greater than", "gt"),
        "greater_than_equal": ("must be at least", "ge"),
        "less_than": ("must be less than", "lt"),
        "less_than_equal": ("must be at most", "le"),
    }
    if kind in bounds:
        words, bound = bounds[kind]
        return f"{words} {_number(ctx[bound])}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    message = detail["msg"].removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _number(value: object) -> str:
    # pydantic reports a float field's bound `gt=0` as 0.0; people wrote, and read, 0.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _suggestion(loc: Key) -> str:
    known = _field_names(loc[:-1])
    match = difflib.get_close_matches(loc[-1], known, n=1)
    return f"; did you mean {dotted((*loc[:-1], match[0]))!r}?" if match else ""


def _field_names(section: Key) -> list[str]:
    model: type[BaseModel] = Settings
    for name in section:
        field = model.model_fields.get(name)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _source(key: Key, sources: Mapping[Key, str]) -> str:
    # The value may have been set at this key or, for a list item, at an enclosing one...
    for end in range(len(key), 0, -1):
        if key[:end] in sources:
            return sources[key[:end]]
    # ...or, for a section or an unknown key, by the keys inside it.
    inside = sorted({source for set_key, source in sources.items() if set_key[: len(key)] == key})
    return ", ".join(inside) if inside else DEFAULTS


def _display(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "settings"
