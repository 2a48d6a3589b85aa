"""Typed reads of config input that may be partly invalid, for the cross-field rules.

A rule between keys should still run when some unrelated key is wrong, so load_config can report
every problem in one run. ``Inputs`` wraps the merged input data (YAML, environment, flags) and
the key paths validation rejected; ``value`` returns a key's validated value (each field's own
validators apply, so durations go through ``parse_duration``) or its model default, and raises
``Unknown`` when that key, a part of it or a section above it is invalid. A rule whose inputs
are unknown is skipped: its inputs already have problems of their own.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from runner.config.document import KeyPath


class Unknown(Exception):
    """A rule input is invalid or missing, so the rule cannot be judged."""


_ABSENT = object()


class Inputs:
    """Config data (valid or not) read through the models' field types and defaults."""

    def __init__(
        self,
        data: Mapping[str, Any],
        model: type[BaseModel],
        invalid: Iterable[KeyPath] = (),
        invalid_keys: Iterable[KeyPath] = (),
    ) -> None:
        self._data = data
        self._model = model
        self._invalid = set(invalid) | set(invalid_keys)
        self._invalid_keys = set(invalid_keys)

    def _usable(self, path: KeyPath) -> bool:
        """False if validation rejected the key, anything inside it or a section above it."""
        return not any(bad == path[: len(bad)] or path == bad[: len(path)] for bad in self._invalid)

    def _raw(self, path: KeyPath) -> Any:
        node: Any = self._data
        for part in path:
            if node is None or node is _ABSENT:
                return _ABSENT  # an absent section: its keys take their defaults
            if not isinstance(node, Mapping):
                raise Unknown(path)
            node = node.get(part, _ABSENT)
        return node

    def value(self, path: KeyPath) -> Any:
        """The validated value at ``path``, or its default if absent; raise Unknown if neither."""
        if not self._usable(path):
            raise Unknown(path)
        annotation, default = _field(self._model, path)
        raw = self._raw(path)
        if raw is _ABSENT:
            if default is _ABSENT:
                raise Unknown(path)
            return default
        try:
            return TypeAdapter(annotation).validate_python(raw)
        except ValidationError:
            raise Unknown(path) from None

    def present(self, path: KeyPath) -> bool:
        """Whether ``path`` is set (not absent, not null); invalid keys inside do not matter."""
        if any(bad == path[: len(bad)] for bad in self._invalid):
            raise Unknown(path)
        raw = self._raw(path)
        return raw is not _ABSENT and raw is not None

    def names(self, path: KeyPath, *, complete: bool = False) -> list[str]:
        """The keys of the mapping at ``path`` (``[]`` if absent), minus invalid ones.

        With ``complete``, raise Unknown instead of leaving a name out (a set of declared names
        with a gap cannot say that a name is undeclared).
        """
        if any(bad == path[: len(bad)] for bad in self._invalid):
            raise Unknown(path)
        raw = self._raw(path)
        if raw is _ABSENT or raw is None:
            return []
        if not isinstance(raw, Mapping):
            raise Unknown(path)
        bad = [name for name in raw if (*path, name) in self._invalid_keys]
        if bad and complete:
            raise Unknown(path)
        return [str(name) for name in raw if name not in bad]


def _field(model: type[BaseModel], path: KeyPath) -> tuple[Any, Any]:
    """The annotation (with its constraints) and default of the field at ``path``."""
    annotation: Any = model
    default: Any = _ABSENT
    for part in path:
        inner = unwrap_annotation(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            info = inner.model_fields.get(str(part))
            if info is None:
                raise Unknown(path)
            annotation = info.annotation
            if info.metadata:
                params = (annotation, *info.metadata)  # the field's constraints, e.g. gt=0
                annotation = typing.Annotated[params]
            required = info.is_required()
            default = _ABSENT if required else info.get_default(call_default_factory=True)
        elif typing.get_origin(inner) is dict:
            annotation, default = typing.get_args(inner)[1], _ABSENT
        else:
            raise Unknown(path)
    return annotation, default


def unwrap_annotation(annotation: Any) -> Any:
    """``X`` from ``Annotated[X, ...]`` and ``X | None``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return unwrap_annotation(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return unwrap_annotation(members[0]) if len(members) == 1 else annotation
    return annotation
