"""Every example in README.md and docs/ works: YAML validates, Python compiles, JSON parses, and
every `dq-run` command runs (with the output a console block shows), so the docs cannot drift
from the code. The rules for writers are in docs/development.md; the parsing in blocks_kit.py.

Each page's blocks run in order in a scratch directory holding copies of configs/, handlers/
and deploy/, so a page may write a handler, then its config, then run commands on both.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from tests.docs.blocks_kit import (
    COMMAND_LANGS,
    MAX_NORUN,
    PAGES,
    REPO,
    Block,
    Command,
    base_env,
    commands,
    merged,
    needs_redis,
    output_matches,
    parses_as_json,
    read_blocks,
    run_line,
    scratch,
    to_server,
)

ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]
CHECKED = ("yaml", "python", "json", *COMMAND_LANGS)
#: The pages with something to check (a page that gains an example joins by itself).
EXAMPLE_PAGES = [
    page
    for page in PAGES
    if any(b.lang in CHECKED and "norun" not in b.markers for b in read_blocks(page))
]


def _id(page: Path) -> str:
    return str(page.relative_to(REPO))


#: The pages whose examples take longest to run (many dq-run processes, a Redis server): in
#: `make test-slow` (and .ci/run), so that the default suite stays near five minutes.
SLOW_PAGES = {"docs/reference/cli.md", "docs/scaling.md"}


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(page, marks=pytest.mark.slow) if _id(page) in SLOW_PAGES else page
        for page in EXAMPLE_PAGES
    ],
    ids=_id,
)
def test_every_example_of_the_page_works(
    page: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    blocks = [block for block in read_blocks(page) if "norun" not in block.markers]
    env = base_env()
    url = None
    if needs_redis(blocks):
        url = request.getfixturevalue("redis_server").url
        env.update(REDIS_URL=url, DQ_BROKER__NAMESPACE=f"docs-{uuid.uuid4().hex[:12]}")
        env["DQ_METRICS__PORT"] = "0"  # configs/redis.yaml serves metrics: take a free port
    workspace = scratch(tmp_path)
    for number, block in enumerate(blocks):
        if block.lang == "python":
            compile(block.text, block.where, "exec")
            _write(workspace, block)
        elif block.lang == "json":
            assert parses_as_json(block.text), f"{block.where}: not JSON"
        elif block.lang == "yaml":
            _validate(workspace, block, number, env)
        elif block.lang in COMMAND_LANGS:
            for item in commands(block):
                if isinstance(item, tuple):  # export NAME=value
                    name, value = item
                    env[name] = to_server(value, url)
                else:
                    _run(workspace, item, env, url)


def _write(workspace: Path, block: Block) -> Path | None:
    if block.file_name is None:
        return None
    path = workspace / block.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.text)
    return path


def _validate(workspace: Path, block: Block, number: int, env: dict[str, str]) -> None:
    base = block.markers.get("fragment-of")
    if base is not None:
        assert block.file_name is None, f"{block.where}: a fragment is not a file of its own"
        fragment = yaml.safe_load(block.text)
        assert isinstance(fragment, dict), f"{block.where}: a fragment must be a mapping"
        # Beside its base, so the base's relative paths (handler_paths) still hold.
        path = (workspace / base).with_name(f"doc-block-{number}.yaml")
        path.write_text(yaml.safe_dump(merged(workspace / base, fragment), sort_keys=False))
    else:
        path = _write(workspace, block) or workspace / f"doc-block-{number}.yaml"
        if block.file_name is None:
            path.write_text(block.text)
    line = f"dq-run validate {path.relative_to(workspace)}"
    code, output = run_line(line, workspace, env, serve=False)
    assert code == block.expected_exit, (
        f"{block.where}: `{line}` exited {code}, expected {block.expected_exit}:\n{output}"
    )


def _run(workspace: Path, command: Command, env: dict[str, str], url: str | None) -> None:
    line = to_server(command.line, url)
    code, output = run_line(line, workspace, env, serve=command.serves)
    where = command.block.where
    expected = command.block.expected_exit
    assert code == expected, f"{where}: `{line}` exited {code}, expected {expected}:\n{output}"
    assert "Traceback" not in output or code == 0, f"{where}: `{line}` printed a traceback"
    for wanted in command.expected:
        assert output_matches(wanted, output), (
            f"{where}: `{line}` did not print {wanted!r}; it printed:\n{output}"
        )


def test_norun_markers_are_few_and_give_a_reason() -> None:
    skipped = [block for block in ALL_BLOCKS if "norun" in block.markers]
    assert len(skipped) <= MAX_NORUN, [block.where for block in skipped]
    for block in skipped:
        assert len(block.markers["norun"].split()) >= 3, f"{block.where}: say why it cannot run"


def test_the_docs_have_examples_of_every_kind() -> None:
    """A guard for the parser: if it stopped finding blocks, every page test would pass."""
    langs = [block.lang for block in ALL_BLOCKS]
    runs = [
        item
        for block in ALL_BLOCKS
        if block.lang in COMMAND_LANGS
        for item in commands(block)
        if isinstance(item, Command)
    ]
    assert langs.count("yaml") >= 10 and langs.count("python") >= 3, langs
    assert len(runs) >= 30, len(runs)
    assert {"validate", "publish", "run", "dlq", "stats", "pause", "bench", "config"} <= {
        run.line.split("dq-run ", 1)[1].split()[0] for run in runs
    }


SAMPLE = """\
Text.

<!-- fragment-of: configs/demo.yaml -->
```yaml
workers: 2
```

- a list item with a block:

  <!-- expect-exit: 2 -->
  ```console
  $ make demo
  ignored output
  $ WORKERS=2 dq-run valdate configs/demo.yaml   # a comment
  …did you mean 'validate'?
  $ dq-run configs/demo.yaml
  ```

```sh
export REDIS_URL=redis://example:6379/0
dq-run run configs/redis.yaml --until-empty
docker compose up
```
"""


def test_the_kit_reads_blocks_markers_commands_and_output() -> None:
    yaml_block, console, sh = read_blocks(REPO / "docs" / "sample.md", SAMPLE)
    assert (yaml_block.lang, yaml_block.line, yaml_block.text) == ("yaml", 4, "workers: 2\n")
    assert yaml_block.markers == {"fragment-of": "configs/demo.yaml"}
    assert console.markers == {"expect-exit": "2"} and console.expected_exit == 2
    typo, demo = commands(console)
    assert isinstance(typo, Command) and isinstance(demo, Command)
    assert typo.line.startswith("WORKERS=2 dq-run valdate") and not typo.serves
    assert typo.expected == ("…did you mean 'validate'?",) and demo.serves
    assert next(iter(commands(sh))) == ("REDIS_URL", "redis://example:6379/0")
    assert [c.line for c in commands(sh) if isinstance(c, Command)] == [
        "dq-run run configs/redis.yaml --until-empty"
    ]
    assert needs_redis([sh]) and not needs_redis([console])
    assert output_matches("… greet 1 never_retry …", "84166a17  greet   1  never_retry  x\n")
    assert not output_matches("OK a.yaml", "OK b.yaml\n")
