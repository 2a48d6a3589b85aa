"""Read one YAML config into plain data plus the line and column of every key and value.

Only runner.config calls this module; it is the part of "reading YAML" that knows about marks.
What it adds over ``yaml.safe_load``:

- every value's position (``Document.value_at``) and every key's (``Document.key_at``), so a
  validation error can name ``file.yaml:LINE:COL``;
- duplicate keys are problems (PyYAML silently keeps the last one);
- ``${VAR}`` and ``${VAR:-default}`` in values are replaced from the given environment; an
  unquoted result is typed again by YAML's rules (``${WORKERS:-3}`` is the integer 3), a quoted
  one stays a string; ``$${`` writes a literal ``${``; mapping keys are never interpolated;
- an empty file, a top-level list or scalar, and a second document are clear errors;
- aliases are not expanded again on each use: the composer shares the anchored node and counts
  what each use would expand to, so a document that would expand past ``MAX_NODES`` nodes (an
  "alias bomb"), or an alias used inside its own anchor, is refused at the alias's line before
  anything is built.

Fatal problems (syntax, document shape) raise ConfigError at once; the others are returned with
the data, so the caller can report them together with the validation errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from runner.errors import ConfigError, Problem

#: A path to a value inside the document: mapping keys and sequence indexes.
KeyPath = tuple[str | int, ...]

# `$${` is an escaped `${`; `${...}` is a reference; a lone `${` is unclosed.
_REFERENCE_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_NAME_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)
_MERGE_TAG = "tag:yaml.org,2002:merge"

#: The most nodes a config document may expand to, counting each alias use as a copy of its
#: anchor. Real configs have a few hundred; a 383-byte alias bomb expands to millions.
MAX_NODES = 10_000


class _AliasProblem(yaml.YAMLError):
    """An alias that would expand too far, or inside its own anchor; carries the alias's mark."""

    def __init__(self, mark: yaml.Mark, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _CountingLoader(yaml.SafeLoader):
    """A SafeLoader whose composer knows each node's expanded size and stops a bomb early.

    Sizes are computed once per node, when it is complete, from its children's sizes, so the
    count costs one pass over the text however often an anchor is used.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}
        self._expanded = 0

    def compose_document(self) -> Node | None:
        self._sizes, self._expanded = {}, 0
        return super().compose_document()

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            aliased = super().compose_node(parent, index)
            size = self._sizes.get(id(aliased))
            if size is None:  # still being composed: the alias is inside its own anchor
                raise _AliasProblem(mark, "an alias cannot be used inside its own anchor")
            self._expanded += size
            if self._expanded > MAX_NODES:
                raise _AliasProblem(
                    mark,
                    f"this alias makes the document expand past {MAX_NODES:,} values "
                    "(an alias bomb?); use fewer or smaller aliases",
                )
            return aliased
        node = super().compose_node(parent, index)
        self._expanded += 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        return node


@dataclass
class Document:
    """A config file's data and where each part of it came from (1-based line and column)."""

    name: str  # the file name as the user gave it; used in every location
    data: dict[str, Any]
    values: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    unresolved: set[KeyPath] = field(default_factory=set)  # values whose ${...} failed

    def where(self, line: int, column: int) -> str:
        return f"{self.name}:{line}:{column}"

    def value_at(self, path: KeyPath) -> tuple[int, int] | None:
        return self.values.get(path)

    def key_at(self, path: KeyPath) -> tuple[int, int] | None:
        return self.keys.get(path) or self.values.get(path)


def read_document(path: Path, name: str, environ: Mapping[str, str]) -> Document:
    """Parse ``path`` (reported as ``name``) into a Document; raise ConfigError if unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(name, "", f"cannot read the file: {exc}")]) from None
    try:
        nodes = list(yaml.compose_all(text, Loader=_CountingLoader))
    except _AliasProblem as exc:
        where = f"{name}:{exc.mark.line + 1}:{exc.mark.column + 1}"
        raise ConfigError([Problem(where, "", exc.message)]) from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(name, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(name, "", f"YAML error: {exc}")]) from None
    nodes = [node for node in nodes if node is not None]
    if not nodes:
        raise ConfigError(
            [Problem(f"{name}:1:1", "", "the file is empty; a config needs at least task_types")]
        )
    if len(nodes) > 1:
        line, column = _mark(nodes[1])
        # Point at the `---` that starts it, when there is one above its first node.
        lines = text.splitlines()
        for number in range(line, 0, -1):
            if lines[number - 1].startswith("---"):
                line, column = number, 1
                break
        raise ConfigError(
            [
                Problem(
                    f"{name}:{line}:{column}",
                    "",
                    "a second YAML document starts here; a config file holds exactly one",
                )
            ]
        )
    root = nodes[0]
    if not isinstance(root, MappingNode):
        line, column = _mark(root)
        found = "a list" if isinstance(root, SequenceNode) else f"the scalar {root.value!r}"
        raise ConfigError(
            [
                Problem(
                    f"{name}:{line}:{column}",
                    "",
                    f"the top level must be a mapping of settings (version, broker, ...), "
                    f"found {found}",
                )
            ]
        )
    reader = _Reader(Document(name=name, data={}), environ)
    reader.doc.values[()] = _mark(root)
    reader.doc.data = reader.mapping(root, ())
    return reader.doc


def _syntax_problem(name: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    return Problem(where, "", f"YAML syntax error: {what or 'invalid document'}")


def _mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def dotted(path: KeyPath) -> str:
    """``("retry", "never_retry", 0)`` -> ``retry.never_retry[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class _Reader:
    """Turns nodes into data, recording marks and collecting soft problems."""

    def __init__(self, doc: Document, environ: Mapping[str, str]) -> None:
        self.doc = doc
        self.environ = environ
        self.constructor = SafeConstructor()
        self.resolver = yaml.SafeLoader("")  # only its implicit-tag resolver is used

    def problem(self, node: Node, path: KeyPath, message: str) -> None:
        line, column = _mark(node)
        self.doc.problems.append(Problem(self.doc.where(line, column), dotted(path), message))

    def value(self, node: Node, path: KeyPath) -> Any:
        self.doc.values.setdefault(path, _mark(node))
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            return [self.value(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)  # the composer makes only these three kinds
        return self.scalar(node, path)

    def mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        own: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.update(self.merge(value_node, path))
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(key_node, path, "keys must be plain names, not lists or mappings")
                continue
            # The raw text, not YAML 1.1's reading of it: a key `on:` stays "on", not True.
            key = key_node.value
            child = (*path, key)
            if key in own:
                first_line, _ = self.doc.keys[child]
                self.problem(
                    key_node, child, f"duplicate key {key!r} (first defined on line {first_line})"
                )
                continue
            self.doc.keys[child] = _mark(key_node)
            own[key] = self.value(value_node, child)
        return {**merged, **own}

    def merge(self, node: Node, path: KeyPath) -> dict[str, Any]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        result: dict[str, Any] = {}
        for source in reversed(sources):  # earlier sources win, as YAML's merge key says
            if isinstance(source, MappingNode):
                result.update(self.mapping(source, path))
            else:
                self.problem(source, path, "a merge key (<<) needs a mapping or a list of them")
        return result

    def scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        if "${" not in node.value:
            return self.constructor.construct_object(node, deep=True)
        text = self.interpolate(node, path)
        if text is None:
            return node.value
        if node.style is not None:  # quoted or block scalar: stays a string
            return text
        tag = self.resolver.resolve(ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
        retyped = ScalarNode(tag, text, node.start_mark, node.end_mark)
        return self.constructor.construct_object(retyped, deep=True)

    def interpolate(self, node: ScalarNode, path: KeyPath) -> str | None:
        failed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal failed
            whole = match.group(0)
            if whole == "$${":
                return "${"
            if match.group(1) is None:
                self.problem(node, path, "unclosed ${ in value; write $${ for a literal ${")
                failed = True
                return whole
            reference = _NAME_RE.match(match.group(1))
            if reference is None:
                self.problem(
                    node, path, f"invalid reference {whole!r}: use ${{NAME}} or ${{NAME:-default}}"
                )
                failed = True
                return whole
            name, default = reference.group(1), reference.group(2)
            value = self.environ.get(name)
            if value:  # like the shell's :-, an empty variable counts as unset
                return value
            if default is not None:
                return default
            if value is None:
                self.problem(
                    node,
                    path,
                    f"environment variable {name} is not set (give a default: ${{{name}:-value}})",
                )
                failed = True
            return ""

        text = _REFERENCE_RE.sub(replace, node.value)
        if failed:
            self.doc.unresolved.add(path)
            return None
        return text
