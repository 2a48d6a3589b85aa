"""The fenced blocks of README.md and docs/, and how each kind is checked (test_doc_blocks.py).

A block is checked by its language: ``yaml`` is validated with ``dq-run validate``; ``python``
must compile; ``json`` must parse; in ``console``, ``sh`` and ``bash`` blocks every ``dq-run``
command is run. An HTML comment on the lines just above a fence changes that (the rules for
writers are in docs/development.md):

- ``<!-- norun: REASON -->``: not checked (at most ``MAX_NORUN`` in all);
- ``<!-- fragment-of: configs/demo.yaml -->``: a YAML block that is part of a pipeline, validated
  merged into that file;
- ``<!-- expect-exit: N -->``: validating it, or each command in it, exits N.

A first line ``# some/file.py`` (or ``.yaml``) names the file a block is written to, so later
blocks of the page can import or run it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
#: The repository's directories a page's commands may name; copied into its scratch directory.
COPIED = ("configs", "handlers", "deploy")
MAX_NORUN = 10
#: How long `dq-run run` without --until-empty runs before it gets SIGINT (it must exit 0 then).
SERVE_S = 5.0
#: How long any one command may take (the demo and bench examples take a few seconds).
COMMAND_TIMEOUT_S = 60.0
MARKERS = ("norun", "fragment-of", "expect-exit")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})(?P<lang>[\w-]*)\s*$")
_MARKER = re.compile(r"^\s*<!-- (?P<key>[a-z-]+): (?P<value>.+?) -->\s*$")
_FILE_HEADER = re.compile(r"^# (?P<name>[\w./-]+\.(?:py|ya?ml))\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_REDIS_URL = re.compile(r"redis://\S+")
COMMAND_LANGS = ("console", "sh", "bash")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    markers: Mapping[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """The file the block's first line names (``# hello.py``), if any."""
        first = self.text.split("\n", 1)[0]
        match = _FILE_HEADER.match(first)
        return match.group("name") if match else None

    @property
    def expected_exit(self) -> int:
        return int(self.markers.get("expect-exit", "0"))


def read_blocks(page: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of ``page``, with the markers on the lines above it."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, ticks = opening.group("indent"), opening.group("ticks")
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        blocks.append(
            Block(page, i + 1, opening.group("lang"), "\n".join(body) + "\n", _markers(lines, i))
        )
        i = end + 1
    return blocks


def _markers(lines: list[str], fence: int) -> dict[str, str]:
    found = {}
    above = fence - 1
    while above >= 0 and (not lines[above].strip() or _MARKER.match(lines[above])):
        match = _MARKER.match(lines[above])
        if match and match.group("key") in MARKERS:
            found[match.group("key")] = match.group("value")
        above -= 1
    return found


@dataclass(frozen=True)
class Command:
    """A ``dq-run`` command line of a block, and the output a console block shows after it."""

    block: Block
    line: str
    expected: tuple[str, ...]

    @property
    def serves(self) -> bool:
        """A run that only a signal ends (no --until-empty)."""
        words = shlex.split(self.line, comments=True)
        words = words[next(i for i, w in enumerate(words) if w == "dq-run") :]
        runs = len(words) > 1 and (words[1] == "run" or words[1].endswith((".yaml", ".yml")))
        return runs and "--until-empty" not in words


def commands(block: Block) -> Iterator[Command | tuple[str, str]]:
    """The block's ``dq-run`` commands in order, and its ``export NAME=value`` lines as
    (NAME, value); other lines (make, docker, comments) are not run."""
    pending: tuple[str, list[str]] | None = None
    for raw in block.text.splitlines():
        if block.lang == "console":
            if not raw.startswith("$ "):
                if pending is not None and raw.strip():
                    pending[1].append(raw)
                continue
            line = raw[2:]
        else:
            line = raw
        if pending is not None:
            yield Command(block, pending[0], tuple(pending[1]))
            pending = None
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for word in words[1:]:
                name, _, value = word.partition("=")
                yield name, value
            continue
        while words and _ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words[:1] == ["dq-run"]:
            pending = (line, [])
    if pending is not None:
        yield Command(block, pending[0], tuple(pending[1]))


def output_matches(expected: str, actual: str) -> bool:
    """Does some line of ``actual`` match ``expected``? ``…`` matches anything; runs of spaces
    compare equal (tables are aligned to their content)."""
    pattern = ".*".join(re.escape(part) for part in " ".join(expected.split()).split("…"))
    return any(re.fullmatch(pattern, " ".join(line.split())) for line in actual.splitlines())


def needs_redis(blocks: list[Block]) -> bool:
    return any(
        isinstance(item, Command) and "redis" in item.line
        for block in blocks
        if block.lang in COMMAND_LANGS and "norun" not in block.markers
        for item in commands(block)
    )


def to_server(text: str, url: str | None) -> str:
    """Every Redis URL of ``text`` pointed at the test's throwaway server (``url``)."""
    return text if url is None else _REDIS_URL.sub(url, text)


def scratch(directory: Path) -> Path:
    """A directory holding copies of the repository's configs, handlers and deploy files."""
    for name in COPIED:
        shutil.copytree(REPO / name, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def base_env(**extra: str) -> dict[str, str]:
    """The environment commands run in: no DQ_* of the caller's, this venv's dq-run first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def merged(base: Path, fragment: Any) -> Any:
    """``fragment`` merged into the pipeline file ``base`` (mappings key by key)."""
    return _merge(yaml.safe_load(base.read_text()), fragment)


def _merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = _merge(base.get(key), value)
        return out
    return extra


def run_line(line: str, cwd: Path, env: Mapping[str, str], serve: bool) -> tuple[int, str]:
    """Run a command line with bash; a serving run gets SIGINT after SERVE_S. Returns the exit
    code and stdout + stderr."""
    process = subprocess.Popen(
        ["bash", "-c", line],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so SIGINT reaches dq-run however bash started it
    )
    try:
        try:
            out, err = process.communicate(timeout=SERVE_S if serve else COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if not serve:
                raise
            os.killpg(process.pid, signal.SIGINT)
            out, err = process.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, out + err


def parses_as_json(text: str) -> bool:
    """One JSON document, or JSON Lines."""
    try:
        json.loads(text)
    except ValueError:
        try:
            for line in text.splitlines():
                if line.strip():
                    json.loads(line)
        except ValueError:
            return False
    return True
