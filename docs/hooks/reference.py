"""MkDocs hook: the configuration and CLI references, generated from the code at build time.

A page asks for a generated part with an HTML comment on a line of its own:

- ``<!-- generated: config-keys -->``: every config key, one table per section, from the
  pydantic models (``runner.config.models``: structure, defaults, constraints, descriptions)
  and the JSON Schema ``dq-run schema`` prints (``runner.config.schema``: the value types an
  editor sees). ``DQ_*`` names follow ``runner.config.load``'s prefix and delimiter. Notes
  that say more than a model's one-line description live in ``config-notes.yaml`` beside this
  file, keyed by the key as the table shows it.
- ``<!-- generated: cli dq-run dlq list -->``: that command's usage line, help and options,
  read from the click command tree (``runner.ops.cli:cli``).

The build fails (``DocsDrift``, raised as mkdocs' ``PluginError``) when the generated parts and
the pages disagree: a key with neither a description nor a note, a note for a key that does not
exist, a command of the CLI that no page documents, or a marker naming a command that does not
exist. So a new key or command cannot ship undocumented, and a removed one cannot linger.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from runner.config.load import ENV_NESTED_DELIMITER, ENV_PREFIX
from runner.config.models import DURATION_PATTERN, PipelineConfig
from runner.config.schema import config_json_schema
from runner.loader import CLASS_PATTERN
from runner.ops.cli import cli

NOTES_FILE = Path(__file__).with_name("config-notes.yaml")
MARKER = re.compile(r"^<!-- generated: (config-keys|cli (?P<command>[a-z -]+?)) -->$", re.M)

#: Placeholders the tables use for names the user chooses: a map entry, a list item.
ENTRY = {"task_types": "NAME", "faults": "NAME", "mix": "NAME", "options": "KEY"}


class DocsDrift(Exception):
    """The docs and the code disagree (raised as mkdocs' PluginError by the hook below)."""


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    """One row of the configuration reference."""

    key: str  # as the table shows it: task_types.NAME.handler, middleware[].use
    section: str  # the top-level key it belongs to ("" for top-level scalars)
    type: str
    default: str
    env: str
    description: str


def config_rows() -> list[KeyRow]:
    """Every key of a config file, sections before their keys, in the models' order."""
    schema = config_json_schema()
    return list(_rows(PipelineConfig, schema, schema["$defs"], (), env=True))


def _rows(
    model: type[BaseModel],
    node: dict[str, Any],
    defs: dict[str, Any],
    path: tuple[str, ...],
    *,
    env: bool,
) -> Iterator[KeyRow]:
    """The rows of ``model``'s fields (``node``: its schema) under ``path``; ``env``: whether
    its keys have environment variables of their own (a list's items do not)."""
    node = _resolve(node, defs)
    for name, field in model.model_fields.items():
        prop = node["properties"][name]
        key = (*path, name)
        inner = _unwrap(field.annotation)
        origin = typing.get_origin(inner)
        nested = len(key) > 1 or _is_model(inner) or _map_of_models(inner) or _list_of_models(inner)
        section = key[0].removesuffix("[]") if nested else ""
        env_name = _env(key) if env else "—"
        default = _default(field, prop, defs)
        description = field.description or ""
        if _is_model(inner):
            doc = (inner.__doc__ or "").strip().splitlines()[0]
            yield KeyRow(_show(key), section, "section", "", _json_env(env_name), doc)
            yield from _rows(inner, _model_node(prop, defs), defs, key, env=env)
        elif _map_of_models(inner):
            value_model = typing.get_args(inner)[1]
            entry = ENTRY.get(name, "NAME")
            entry_type = f"map: {entry} → section"
            shown = _show(key)
            env_entry = _env((*key, entry)) + "__…" if env else "—"
            yield KeyRow(shown, section, entry_type, default, env_entry, description)
            (value_node,) = prop["patternProperties"].values()
            yield from _rows(value_model, value_node, defs, (*key, entry), env=env)
        elif _list_of_models(inner):
            item_model = typing.get_args(inner)[0]
            list_env = f"{env_name} (JSON)" if env else "—"
            yield KeyRow(_show(key), section, "list of sections", default, list_env, description)
            item_node = _resolve(prop["items"], defs)
            yield from _rows(item_model, item_node, defs, (*key[:-1], f"{name}[]"), env=False)
        else:
            text = _type(prop, defs) + _constraints(field)
            if origin is dict:
                shown_env = _env((*key, ENTRY.get(name, "KEY"))) if env else "—"
            elif origin in (tuple, list):
                shown_env = f"{env_name} (JSON)" if env else "—"
            else:
                shown_env = env_name
            yield KeyRow(_show(key), section, text, default, shown_env, description)


def _show(key: tuple[str, ...]) -> str:
    return ".".join(key).replace(".[]", "[]")


def _env(key: tuple[str, ...]) -> str:
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(part.upper() for part in key)


def _json_env(env_name: str) -> str:
    return "—" if env_name == "—" else f"{env_name}__… (or JSON)"


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X; other annotations unchanged."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else annotation
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _map_of_models(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is dict and len(args) == 2 and _is_model(args[1])


def _list_of_models(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (tuple, list) and bool(args) and _is_model(args[0])


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[1]] if isinstance(ref, str) else node


def _model_node(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    for branch in prop.get("anyOf", [prop]):
        if "$ref" in branch:
            return _resolve(branch, defs)
    return _resolve(prop, defs)


def _branches(node: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """The value's own schema branches: without ``${VAR}`` references and ``null``."""
    found = []
    for item in node.get("anyOf", [node]):
        branch = _resolve(item, defs)
        if "anyOf" in branch:
            found += _branches(branch, defs)
        elif branch.get("type") != "null" and not _is_reference(branch):
            found.append(branch)
    return found


def _is_reference(branch: dict[str, Any]) -> bool:
    # runner.config.schema lets every scalar be a ${VAR:-default} string: not the value's type.
    return str(branch.get("pattern", "")).startswith(r"\$\{")


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """The value type an editor sees, in words (patterns are shown by ``_constraints``)."""
    branches = _branches(node, defs)
    if any(branch.get("pattern") == DURATION_PATTERN for branch in branches):
        return "duration"
    words: list[str] = []
    for branch in branches:
        if "enum" in branch:
            words += [f"`{value}`" for value in branch["enum"]]
        elif "const" in branch:
            words.append(f"`{branch['const']}`")
        elif branch.get("pattern") == CLASS_PATTERN and words:
            words.append("`module:Class`")
        elif branch.get("type") == "array":
            if "prefixItems" in branch:
                items = ", ".join(_type(item, defs) for item in branch["prefixItems"])
                words.append(f"[{items}]")
            else:
                words.append(f"list of {_type(branch['items'], defs)}s")
        elif branch.get("type") == "object":
            values = [*branch.get("patternProperties", {}).values()]
            if isinstance(branch.get("additionalProperties"), dict):
                values.append(branch["additionalProperties"])
            words.append(f"map: NAME → {_type(values[0], defs)}" if values else "map")
        else:
            words.append(branch.get("type", "string"))
    if len(words) > 1:
        return ", ".join(words[:-1]) + " or " + words[-1]
    return words[0] if words else "any"


def _constraints(field: Any) -> str:
    marks = []
    for item in field.metadata:
        if isinstance(item, Ge):
            marks.append(f">= {_number(item.ge)}")
        elif isinstance(item, Gt):
            marks.append(f"> {_number(item.gt)}")
        elif isinstance(item, Le):
            marks.append(f"<= {_number(item.le)}")
        elif isinstance(item, Lt):
            marks.append(f"< {_number(item.lt)}")
        elif isinstance(item, MinLen):
            marks.append(f"at least {item.min_length}")
        elif getattr(item, "pattern", None) and not field.examples:
            marks.append(f"matching `{item.pattern}`")
    if field.examples:
        marks.append("e.g. " + ", ".join(f"`{example}`" for example in field.examples))
    return f", {', '.join(marks)}" if marks else ""


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(field: Any, prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "unset"
    if _type(prop, defs) == "duration" or (
        isinstance(value, tuple) and "duration" in _type(prop, defs)
    ):
        return f"`{_duration(value)}`"
    return f"`{_yaml(value)}`"


def _duration(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_duration(item) for item in value) + "]"
    seconds = float(value)
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _yaml(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, tuple):
        value = list(value)
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    # A string YAML would not read back as one is quoted: show it as people write it.
    return json.dumps(value) if isinstance(value, str) and text.startswith("'") else text


def load_notes(path: Path = NOTES_FILE) -> dict[str, str]:
    """The hand-written notes, by key as the table shows it."""
    notes = yaml.safe_load(path.read_text()) or {}
    return {str(key): " ".join(str(text).split()) for key, text in notes.items()}


def config_reference(notes: Mapping[str, str]) -> str:
    """The tables: top-level keys, then one per section (a heading each, for the page's TOC)."""
    rows = config_rows()
    keys = {row.key for row in rows}
    unknown = sorted(set(notes) - keys)
    if unknown:
        raise DocsDrift(f"config-notes.yaml names keys the models do not have: {unknown}")
    silent = [row.key for row in rows if not row.description and row.key not in notes]
    if silent:
        raise DocsDrift(f"config keys with neither a description nor a note: {silent}")
    out: list[str] = []
    for section in dict.fromkeys(row.section for row in rows):
        out += ["", f"### {f'`{section}`' if section else 'Top level'}", ""]
        out += ["| key | type | default | env var | meaning |", "|---|---|---|---|---|"]
        for row in rows:
            if row.section != section:
                continue
            meaning = _sentences(row.description, notes.get(row.key, ""))
            cells = [f"`{row.key}`", row.type, row.default, _code(row.env), meaning]
            out.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(out).strip() + "\n"


def _sentences(*parts: str) -> str:
    done = [part if part.endswith((".", "!", "?")) else part + "." for part in parts if part]
    return " ".join(done)


def _code(env: str) -> str:
    name, _, rest = env.partition(" ")
    return env if name == "—" else f"`{name}`" + (f" {rest}" if rest else "")


def _cell(text: str) -> str:
    # A pipe ends a table cell unless it is escaped or inside a code span (Python-Markdown's
    # tables), where a backslash would show: escape only the pipes outside backticks.
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("|", r"\|") for i, part in enumerate(parts))


# -- CLI ----------------------------------------------------------------------------------------


def cli_commands(group: click.Group = cli, prefix: tuple[str, ...] = ("dq-run",)) -> list[str]:
    """Every command of the CLI, groups included, as typed: ``dq-run dlq list``."""
    found = [" ".join(prefix)]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += cli_commands(command, (*prefix, name))
        else:
            found.append(" ".join((*prefix, name)))
    return found


def cli_reference(command_line: str) -> str:
    """One command's usage line, help text and options, as markdown."""
    words = command_line.split()
    if words[0] != "dq-run":
        raise DocsDrift(f"not a dq-run command: {command_line!r}")
    command: click.Command = cli
    ctx = click.Context(cli, info_name="dq-run")
    for word in words[1:]:
        if not isinstance(command, click.Group) or word not in command.commands:
            raise DocsDrift(f"the docs name a command the CLI does not have: {command_line}")
        command = command.commands[word]
        ctx = click.Context(command, info_name=word, parent=ctx)
    usage = command.get_usage(ctx).removeprefix("Usage: ")
    out = ["```text", usage, "```", "", _help(command.help or ""), ""]
    options = [
        param.get_help_record(ctx)
        for param in command.get_params(ctx)
        if isinstance(param, click.Option) and "--help" not in param.opts
    ]
    if options:
        out += ["| option | meaning |", "|---|---|"]
        for record in options:
            if record is not None:
                flags, text = record
                out.append(f"| `{flags}` | {_cell(_help(text))} |")
        out.append("")
    return "\n".join(out)


def _help(text: str) -> str:
    # click's help is hand-wrapped text: one line per paragraph (its backticks stay code).
    paragraphs = [" ".join(part.split()) for part in text.strip().split("\n\n")]
    return "\n\n".join(paragraphs)


# -- the hook -----------------------------------------------------------------------------------


def expand(markdown: str, documented: set[str]) -> str:
    """Replace every marker of ``markdown``; record the commands it documents."""

    def replace(match: re.Match[str]) -> str:
        command = match.group("command")
        if command is None:
            return config_reference(load_notes())
        documented.add(command)
        return cli_reference(command)

    return MARKER.sub(replace, markdown)


_documented: set[str] = set()


def on_pre_build(config: Any) -> None:
    _documented.clear()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown, _documented)
    except DocsDrift as exc:
        raise PluginError(f"{page.file.src_uri}: {exc}") from None


def on_post_build(config: Any) -> None:
    # Needs every page built: right for `mkdocs build` and `mkdocs serve`, not `serve --dirty`.
    from mkdocs.exceptions import PluginError

    missing = [command for command in cli_commands() if command not in _documented]
    if missing:
        raise PluginError(
            f"CLI commands no page documents (<!-- generated: cli ... -->): {missing}"
        )
