"""Refuse booleans where the config expects a number: only runner.config.models calls this module.

YAML 1.1 reads ``yes``, ``no``, ``on``, ``off``, ``true`` and ``false`` as booleans, and pydantic's
lax mode then takes True as 1 (``workers: yes`` ran one worker). Strict mode would also refuse the
strings that ``DQ_*`` variables and ``${VAR}`` bring, so instead a before-validator on every config
model asks ``boolean_problem`` whether the value is, or holds, a boolean that its field's type does
not admit, and names what was expected.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator
from pydantic.fields import FieldInfo

_BOOL_WORDS = "yes/no/on/off/true/false"


def boolean_problem(field: FieldInfo, value: Any) -> str | None:
    """A message when ``value`` is or holds a boolean that ``field`` does not admit, else None."""
    return _check(field.annotation, field.metadata, value)


def _check(annotation: Any, metadata: list[Any], value: Any) -> str | None:
    annotation, metadata = _strip(annotation, metadata)
    if isinstance(value, bool):
        expected = _expected(annotation, metadata)
        if expected is None:
            return None
        return f"expected {expected}, not a boolean ({_BOOL_WORDS} are booleans in YAML)"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        # Containers inside an Optional: check against the first member that is a container.
        for member in args:
            if member is not type(None):
                found = _check(member, [], value)
                if found:
                    return found
        return None
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        for item in value.values():
            found = _check(args[1], [], item)
            if found:
                return found
    if origin in (tuple, list) and isinstance(value, list | tuple) and args:
        repeated = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        for index, item in enumerate(value[: None if repeated else len(args)]):
            found = _check(args[0] if repeated else args[index], [], item)
            if found:
                return found
    return None


def _strip(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    while get_origin(annotation) is Annotated:
        annotation, *more = get_args(annotation)
        metadata = [*metadata, *more]
    return annotation, metadata


def _expected(annotation: Any, metadata: list[Any]) -> str | None:
    """What a numeric ``annotation`` expects, or None if it admits booleans or is not numeric."""
    annotation, metadata = _strip(annotation, metadata)
    if annotation is bool or annotation is Any:
        return None
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [_strip(member, []) for member in get_args(annotation)]
        if any(member is bool or member is Any for member, _ in members):
            return None
        for member, more in members:
            expected = _expected(member, [*metadata, *more])
            if expected:
                return expected
        return None
    if origin is Literal:
        choices = get_args(annotation)
        if any(isinstance(choice, bool) for choice in choices):
            return None
        numbers = [repr(choice) for choice in choices if isinstance(choice, int | float)]
        return " or ".join(numbers) if numbers else None
    if annotation is int:
        return "an integer"
    if annotation is float:
        if any(_is_duration(item) for item in metadata):
            return "a duration (a number of seconds, or 50ms, 2s, 1.5m, 1h)"
        return "a number"
    return None


def _is_duration(item: Any) -> bool:
    # By name: runner.config.models defines parse_duration and imports this module.
    return isinstance(item, BeforeValidator) and getattr(item.func, "__name__", "") == (
        "parse_duration"
    )
