"""Mis-indented YAML: a section left empty whose keys landed at its parent's level.

::

    task_types:
      email:
      handler: handlers.demo:send_email   # meant to be inside email

YAML reads ``email`` as null and ``handler`` as a second task type, and validation then speaks
of dictionaries and model names ("Input should be a valid dictionary or instance of
TaskTypeConfig (got None)"). ``regroup`` finds a key whose value should be a mapping but is
null in the file, followed by keys at its own level that are in error and that would be valid
inside it; it replaces their errors with one at the empty key: ``task_types.email: has no keys:
are the lines below it indented?``. A null section with no such keys below it is reported as
having no keys, without the question.

Only runner.config.origins calls this, on validation findings of the YAML document.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from runner.config.document import Document, KeyPath
from runner.config.inputs import unwrap_annotation
from runner.config.rules import Finding

MISINDENTED = "has no keys: are the lines below it indented?"
EMPTY = "has no keys; its settings go on the lines below it, indented"


def regroup(findings: list[Finding], doc: Document, model: type[BaseModel]) -> list[Finding]:
    """``findings`` with the errors that mis-indentation explains replaced by one each."""
    out = list(findings)
    for path, value in _entries(doc.data, ()):
        if value is not None or doc.key_at(path) is None:
            continue
        accepts = _accepts(model, path)
        if accepts is None:
            continue  # not a section: null may be a fine value
        stray = _stray_keys(out, doc, path, accepts)
        own = [f for f in out if f.path == path and not f.at_key]  # not a bad name's error
        if not stray and not own:
            continue  # a null section that may be left out (retry:), with nothing misplaced
        out = [f for f in out if f not in own and not any(_within(f.path, key) for key in stray)]
        out.append(Finding(path, MISINDENTED if stray else EMPTY, at_key=True))
    return out


def _entries(data: Mapping[str, Any], path: KeyPath) -> Iterator[tuple[KeyPath, Any]]:
    for key, value in data.items():
        yield (*path, key), value
        if isinstance(value, Mapping):
            yield from _entries(value, (*path, key))


def _stray_keys(
    findings: list[Finding], doc: Document, path: KeyPath, accepts: Callable[[str], bool]
) -> list[KeyPath]:
    """The keys right after ``path`` at its level that are in error and fit inside it."""
    parent: Any = doc.data
    for part in path[:-1]:
        parent = parent[part]
    siblings = [str(key) for key in parent]  # YAML keys are read as text
    line = _line(doc, path)
    stray: list[KeyPath] = []
    for key in siblings[siblings.index(str(path[-1])) + 1 :]:
        sibling = (*path[:-1], key)
        if _line(doc, sibling) <= line or not accepts(key):
            break
        if not any(_within(f.path, sibling) for f in findings):
            break
        stray.append(sibling)
    return stray


def _line(doc: Document, path: KeyPath) -> int:
    position = doc.key_at(path)
    return position[0] if position else 0


def _within(path: KeyPath, prefix: KeyPath) -> bool:
    return path[: len(prefix)] == prefix


def _accepts(model: type[BaseModel], path: KeyPath) -> Callable[[str], bool] | None:
    """Which keys the mapping at ``path`` takes (None: the value there is not a mapping)."""
    annotation: Any = model
    for part in path:
        inner = unwrap_annotation(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            field = inner.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(inner) is dict:
            annotation = typing.get_args(inner)[1]
        else:
            return None
    inner = unwrap_annotation(annotation)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner.model_fields.__contains__
    if typing.get_origin(inner) is dict:
        return lambda key: True
    return None
