"""Property test: the shipped configs, broken at random (a value swapped for one of the wrong
kind, a key dropped or added, a section copied where it does not belong, a line cut, indented
or stripped of its colon), either still load or fail as ConfigError, whose every problem is
one ``file:line:col: ...`` line: never another exception, which `dq-run` would print as a
traceback."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.load import load_config
from runner.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
#: Values that are wrong somewhere: other kinds, edge numbers, malformed durations, rates,
#: crons and handlers, unset variables, odd lists and mappings.
VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**70, 1.5, -0.0, float("inf"), float("nan"), "", "x",
    "1s", "-5s", "0s", "1e309", "10/s", "0/s", "5 per minute", "* * * * *", "61 * * * *",
    "@daily", [], {}, [1], {"a": 1}, "${NOPE}", "${NOPE:-3}", "$${x}", "\u00e9", "a" * 300,
    "handlers.demo:nope", "nope:nope", ":", "1h", [{"type": "x"}], {"type": "x"},
    {"type": None}, [{"type": "resize", "each": 3}], "memory", "sqlite", "redis",
    "/dev/null/x.db", "interrupt", "process", "async",
]  # fmt: skip
#: Keys added where they may not belong.
KEYS = [
    "bogus", "then", "each", "join", "on_dead", "rate_limit", "circuit_breaker", "schedules",
    "results", "unique", "expires", "execution", "concurrency", "timeout", "max_fanout",
]  # fmt: skip
PROBLEM = r"{file}:\d+:\d+: \S"


def _paths(tree: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in ``tree`` but the root, parents first."""
    found = [at] if at else []
    if isinstance(tree, dict | list):
        for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
            found += _paths(value, (*at, key))
    return found


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def broken_trees(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one to three edits."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        places = _paths(tree)
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent, key = _at(tree, path[:-1]), path[-1]
        edit = draw(st.sampled_from(["value", "value", "drop", "add", "copy"]))
        if edit == "value":
            parent[key] = copy.deepcopy(draw(st.sampled_from(VALUES)))
        elif edit == "drop":
            del parent[key]
        elif edit == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = copy.deepcopy(draw(st.sampled_from(VALUES)))
        else:
            parent[key] = copy.deepcopy(_at(tree, draw(st.sampled_from(places))))
    return tree


@st.composite
def broken_texts(draw: st.DrawFn, text: str) -> str:
    """``text`` with one line cut short, indented, stripped of a colon, tabbed or repeated."""
    lines = text.splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    edit = draw(st.sampled_from(["cut", "indent", "colon", "tab", "repeat"]))
    if edit == "cut":
        lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    elif edit == "indent":
        lines[i] = " " + lines[i]
    elif edit == "colon":
        lines[i] = lines[i].replace(":", "", 1)
    elif edit == "tab":
        lines[i] = lines[i].replace(" ", "\t", 1)
    else:
        lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
    return "".join(lines)


@st.composite
def broken_configs(draw: st.DrawFn) -> str:
    """A shipped config's text, broken as a tree (then dumped) or as text."""
    source = draw(st.sampled_from(CONFIGS)).read_text()
    if draw(st.booleans()):
        tree = draw(broken_trees(yaml.safe_load(source)))
        return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    return draw(broken_texts(source))


def test_every_shipped_config_is_a_base() -> None:
    assert len(CONFIGS) >= 6
    for path in CONFIGS:
        load_config(path, environ={})  # each loads as shipped: the edits are what breaks them


@settings(max_examples=150, deadline=None)
@given(broken_configs())
def test_a_broken_config_loads_or_fails_with_one_line_per_problem(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "broken.yaml"
        path.write_text(text)
        try:
            load_config(path, environ={})
        except ConfigError as exc:
            lines = [str(problem) for problem in exc.problems]
            assert lines, "a ConfigError with no problem to print"
            pattern = re.compile(PROBLEM.format(file=re.escape(str(path))))
            assert all(pattern.match(line) and "\n" not in line for line in lines), lines
