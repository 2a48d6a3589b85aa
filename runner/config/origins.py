"""Where each config value came from: locating problems, and printing the effective config.

A value's origin is, by precedence: a CLI flag (``flag --workers``), a ``DQ_*`` environment
variable (``env DQ_BROKER__CAPACITY``), the YAML file (``file.yaml:LINE:COL``) or the model's
default. Used by load_config for error locations and by ``dq-run config``.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.config.document import Document, KeyPath, dotted
from runner.config.inputs import Inputs, unwrap_annotation
from runner.config.layout import regroup
from runner.config.rules import Finding
from runner.errors import Problem

if TYPE_CHECKING:
    from runner.config.models import PipelineConfig

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Origins:
    """The origin of every key path in one load: flags, environment, YAML positions."""

    doc: Document
    flag_tree: dict[str, Any]  # flags nested like the YAML, for pydantic-settings' init source
    flags: dict[KeyPath, str]  # path -> "flag --workers"
    env: dict[KeyPath, str]  # path -> "env DQ_WORKERS"

    @classmethod
    def build(
        cls, doc: Document, flags: Mapping[str, Any], environ: Mapping[str, str], prefix: str
    ) -> Origins:
        tree: dict[str, Any] = {}
        flag_paths: dict[KeyPath, str] = {}
        for key, value in flags.items():
            parts = key.split(".")
            node = tree
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
            flag_paths[tuple(parts)] = f"flag --{key.replace('_', '-')}"
        env_paths: dict[KeyPath, str] = {}
        for name in environ:
            if name.upper().startswith(prefix) and len(name) > len(prefix):
                parts = name[len(prefix) :].lower().split("__")
                env_paths[tuple(parts)] = f"env {name}"
        return cls(doc=doc, flag_tree=tree, flags=flag_paths, env=env_paths)

    def _override(self, path: KeyPath) -> str | None:
        for table in (self.flags, self.env):
            for length in range(len(path), 0, -1):
                label = table.get(path[:length])
                if label is not None:
                    return label
        return None

    def source_of(self, path: KeyPath, *, at_key: bool = False) -> str:
        """Where a problem at ``path`` should be reported."""
        label = self._override(path)
        if label is not None:
            return label
        parent = path[:-1]
        if parent and self.doc.value_at(parent) is None:
            # A whole entry that only the environment creates (DQ_TASK_TYPES__SMS__TIMEOUT).
            for env_path, env_label in self.env.items():
                if env_path[: len(parent)] == parent:
                    return env_label
        position = self.doc.key_at(path) if at_key else self.doc.value_at(path)
        length = len(path)
        while position is None and length > 0:
            length -= 1
            position = self.doc.key_at(path[:length]) if length else self.doc.value_at(())
        return self.doc.where(*(position or (1, 1)))

    def origin_of(self, path: KeyPath) -> str:
        """The source of a value in the effective config, for ``dq-run config``."""
        label = self._override(path)
        if label is not None:
            return label
        position = self.doc.value_at(path)
        return f"{self.doc.name}:{position[0]}" if position else "default"

    def located(self, findings: Iterable[Finding]) -> list[Problem]:
        return [
            Problem(self.source_of(f.path, at_key=f.at_key), dotted(f.path), f.message)
            for f in findings
        ]

    def validation_problems(self, error: ValidationError, model: type[BaseModel]) -> list[Problem]:
        """pydantic's errors, located, with friendlier wording for the common ones."""
        findings: list[Finding] = []
        skip = self.doc.unresolved  # an unset variable was reported; its raw text fails too
        for item in error.errors(include_url=False):
            path, at_key = _clean_loc(item["loc"])
            if path in skip:
                continue
            message = _message(item, path, at_key, model)
            findings.append(Finding(path, message, at_key or item["type"] == "extra_forbidden"))
        return self.located(regroup(findings, self.doc, model))

    def inputs(
        self, data: Mapping[str, Any], model: type[BaseModel], error: ValidationError | None = None
    ) -> Inputs:
        """``data`` for the cross-field rules, with the keys ``error`` rejected marked invalid.

        A value whose ``${VAR}`` could not be resolved counts as invalid too.
        """
        values: set[KeyPath] = set(self.doc.unresolved)
        keys: set[KeyPath] = set()
        for item in error.errors(include_url=False) if error is not None else ():
            path, at_key = _clean_loc(item["loc"])
            (keys if at_key else values).add(path)
        return Inputs(data, model, invalid=values, invalid_keys=keys)

    def env_label(self, message: str) -> str:
        """The env source of a pydantic-settings parse error, which names only the field."""
        match = re.search(r'field "(\w+)"', message)
        names = [label for path, label in self.env.items() if match and path[0] == match.group(1)]
        return ", ".join(names) or "env"

    def ordered(self, problems: list[Problem]) -> list[Problem]:
        """File problems by position, then environment, then flags; duplicates dropped."""

        def key(problem: Problem) -> tuple[int, int, int]:
            rest = problem.source[len(self.doc.name) + 1 :]
            if problem.source.startswith(self.doc.name + ":"):
                line, _, column = rest.partition(":")
                if line.isdigit() and column.isdigit():
                    return (0, int(line), int(column))
            return (1 if problem.source.startswith("env") else 2, 0, 0)

        unique = list(dict.fromkeys(problems))
        return sorted(unique, key=lambda p: (*key(p), "" if key(p)[0] == 0 else p.source))


@dataclass(frozen=True)
class Loaded:
    """A validated config and the origins of its values."""

    config: PipelineConfig
    origins: Origins


def absolutize_handler_paths(doc: Document, base: Path) -> None:
    """YAML handler_paths are relative to the config file's directory; make them absolute."""
    paths = doc.data.get("handler_paths")
    if isinstance(paths, list):
        doc.data["handler_paths"] = [resolved(base / p) if isinstance(p, str) else p for p in paths]


def resolved(path: Path) -> str:
    """``path`` made absolute, or as it is when it cannot be (a NUL character, a name too long
    for the file system): the config's checks then say what is wrong with it."""
    try:
        return str(path.resolve())
    except (OSError, ValueError):
        return str(path)


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[KeyPath, bool]:
    path: list[str | int] = []
    at_key = False
    for part in loc:
        if part == "[key]":
            at_key = True
        elif isinstance(part, str) and "[" in part:
            continue  # pydantic's internal step names, e.g. function-after[...]
        else:
            path.append(part)
    return tuple(path), at_key


def _message(item: Any, path: KeyPath, at_key: bool, model: type[BaseModel]) -> str:
    kind, value = item["type"], item.get("input")
    if kind == "extra_forbidden":
        key = str(path[-1])
        known = _fields_at(model, path[:-1])
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f"unknown key {key!r} (did you mean {close[0]!r}?)"
        return f"unknown key {key!r} (known: {', '.join(known)})"
    if kind == "missing":
        return "required, but missing"
    if at_key:
        if path[0] == "schedules":
            return f"schedule names must match [a-z][a-z0-9_-]* (got {path[-1]!r})"
        return f"task type names must match [a-z][a-z0-9_]* (got {path[-1]!r})"
    if kind == "string_pattern_mismatch":
        last = path[-1] if path else ""
        if last == "handler":
            return f"must be 'module:function', e.g. handlers.demo:send_email (got {value!r})"
        if "never_retry" in path:
            return f"must be an exception name like ValueError or module:Class (got {value!r})"
    message = str(item["msg"]).removeprefix("Value error, ")
    if kind != "value_error" and isinstance(value, _SCALARS):
        shown = redact_url(value) if path in _SECRET_URLS and isinstance(value, str) else value
        message += f" (got {shown!r})"
    return message


def _fields_at(model: type[BaseModel], path: KeyPath) -> list[str]:
    """The field names of the model found at ``path`` below ``model`` ([] if none)."""
    annotation: Any = model
    for part in path:
        annotation = unwrap_annotation(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return []
    annotation = unwrap_annotation(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


# --- the effective config, printed ---------------------------------------------------------


def render(loaded: Loaded, name: str) -> str:
    """YAML of the effective config; every value ends with ``# <its origin>``.

    A value computed from other settings (an unset prefetch or concurrency) is printed as the
    value in force, commented ``# computed: 16 x workers``; a set value that is capped says
    what is in force. The output loads back to a config that runs the same.
    """
    lines = [
        f"# Effective configuration of {name}.",
        "# Each value's origin: default, FILE:LINE, env DQ_..., flag --..., or computed.",
    ]
    _emit(loaded.config.model_dump(), (), 0, lines, loaded.origins, loaded.config.in_force())
    return "\n".join(lines) + "\n"


def _emit(
    data: Mapping[str, Any],
    path: KeyPath,
    depth: int,
    lines: list[str],
    origins: Origins,
    in_force: Mapping[KeyPath, tuple[Any, str]],
) -> None:
    pad = "  " * depth
    for key, value in data.items():
        child = (*path, key)
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            _emit(value, child, depth + 1, lines, origins, in_force)
            continue
        shown, origin = value, origins.origin_of(child)
        if child in in_force:
            actual, why = in_force[child]
            if value is None:
                shown, origin = actual, f"computed: {why}"
            else:
                origin += f"; in force: {actual} ({why})"
        if child in _SECRET_URLS and isinstance(shown, str):
            shown, origin = redact_url(shown), f"{origin}; password hidden"
        lines.append(f"{pad}{key}: {_scalar(shown)}  # {origin}")


#: Values that may hold a password: printed with it replaced by ``***``.
_SECRET_URLS: frozenset[KeyPath] = frozenset({("broker", "url")})
_PASSWORD_QUERY_RE = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``; ``?password=`` too.

    A user-info part without a colon is all hidden: redis-py may send it as the password.
    """
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user + ':***' if colon else '***'}@{host}{slash}{path}"
    return _PASSWORD_QUERY_RE.sub(r"\1***", f"{scheme}{sep}{rest}")


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1_000_000)
    return text.removesuffix("\n...\n").strip()


def _plain(value: Any) -> Any:
    """Tuples as lists, and `${` escaped so the output is not interpolated when read back."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return value.replace("${", "$${")
    return value
