"""The documentation site builds with --strict, loads nothing from the network, and its
generated references (docs/hooks/reference.py) cover every config key and every command."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from types import ModuleType

import click
import pytest
from pydantic import BaseModel

from runner.config.models import PipelineConfig
from runner.ops.cli import cli

REPO = Path(__file__).resolve().parents[2]
MKDOCS = str(Path(sys.executable).with_name("mkdocs"))


def _hook() -> ModuleType:
    path = REPO / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_hooks_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


reference = _hook()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [MKDOCS, "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env={"PATH": str(Path(sys.executable).parent), "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def test_the_site_loads_nothing_from_the_network(site: Path) -> None:
    """No web fonts, scripts or stylesheets from elsewhere (links to other sites are fine)."""
    loads = re.compile(r"""<(?:script|img|link|iframe)\b[^>]*\b(?:src|href)=["']?(?:https?:)?//""")
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 15
    for page in pages:
        html = page.read_text()
        assert not loads.search(html), f"{page.relative_to(site)} loads {loads.search(html)}"
    for asset in [*pages, *site.rglob("*.css")]:
        text = asset.read_text()
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, asset


def test_the_references_are_generated_into_the_site(site: Path) -> None:
    config_page = (site / "reference" / "configuration" / "index.html").read_text()
    for row in reference.config_rows():
        assert f"<code>{row.key}</code>" in config_page, row.key
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    for command in reference.cli_commands():
        assert f"{command} [OPTIONS]" in cli_page, command
    assert "<!-- generated:" not in config_page + cli_page


def _is_model(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key a config file can hold, walked from the models independently of the hook."""
    keys = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.add(key)
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = args[0]
            args = list(typing.get_args(annotation))
        if _is_model(annotation):
            keys |= _leaf_keys(annotation, f"{key}.")
        elif typing.get_origin(annotation) in (tuple, list) and _is_model(args[0]):
            keys |= _leaf_keys(args[0], f"{key}[].")
        elif typing.get_origin(annotation) is dict and _is_model(args[1]):
            keys |= _leaf_keys(args[1], f"{key}.NAME.")
    return keys


def test_the_config_reference_has_every_key_of_the_models() -> None:
    assert {row.key for row in reference.config_rows()} == _leaf_keys(PipelineConfig)


def test_every_config_note_names_a_key_and_every_key_is_explained() -> None:
    notes = reference.load_notes()
    keys = {row.key for row in reference.config_rows()}
    assert set(notes) <= keys, set(notes) - keys
    for row in reference.config_rows():
        assert row.description or row.key in notes, f"{row.key}: no description, no note"


def test_the_cli_reference_knows_every_command() -> None:
    def walk(group: click.Group, prefix: str) -> list[str]:
        found = [prefix]
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += walk(command, f"{prefix} {name}")
            else:
                found.append(f"{prefix} {name}")
        return found

    assert sorted(reference.cli_commands()) == sorted(walk(cli, "dq-run"))
    bench = reference.cli_reference("dq-run bench")
    assert "dq-run bench [OPTIONS] CONFIG" in bench and "`--rate TEXT`" in bench
    assert "--help" not in bench


def test_the_readme_names_every_command_in_its_cli_line() -> None:
    """The landing page's link to the CLI reference lists the top-level commands; a command
    added without it there is missing from the first page people read."""
    readme = (REPO / "README.md").read_text()
    line = re.search(r"\[CLI reference\]\(docs/reference/cli.md\):(.*?)\n- ", readme, re.S)
    assert line is not None, "README.md has no CLI reference line"
    named = set(re.findall(r"`([a-z-]+)`", line.group(1)))
    assert named == set(cli.commands), f"README.md's CLI line: {sorted(named ^ set(cli.commands))}"


def test_the_hook_refuses_what_the_code_does_not_have() -> None:
    documented: set[str] = set()
    page = "<!-- generated: cli dq-run pause -->\n"
    assert "dq-run pause [OPTIONS] CONFIG TYPE" in reference.expand(page, documented)
    assert documented == {"dq-run pause"}
    with pytest.raises(reference.DocsDrift, match="dq-run frobnicate"):
        reference.expand("<!-- generated: cli dq-run frobnicate -->\n", documented)
    with pytest.raises(reference.DocsDrift, match=r"broker\.capacty"):
        reference.config_reference({"broker.capacty": "a note for a key that does not exist"})
