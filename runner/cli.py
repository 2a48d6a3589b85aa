"""dq-run: parse arguments, call the library, map errors to exit codes. No logic lives here.

Exit codes: 0 success, 1 other failure, 2 config or usage error, 3 broker unavailable,
130 second signal (forced stop).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from runner.errors import BrokerUnavailable, ConfigError, RunnerError, UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3


class _DefaultToRun(click.Group):
    """`dq-run CONFIG` means `dq-run run CONFIG`."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distributed-queue")
def cli() -> None:
    """Run a config-driven task pipeline: dq-run CONFIG (same as dq-run run CONFIG)."""


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--workers", type=click.IntRange(min=1), help="Override `workers`.")
@click.option("--until-empty", is_flag=True, help="Exit when nothing is ready, delayed or running.")
@click.option("--no-simulate", is_flag=True, help="Ignore the config's `simulate` section.")
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the final summary (counts, dead letters, percentiles) as JSON here.",
)
def run(
    config_file: str,
    workers: int | None,
    until_empty: bool,
    no_simulate: bool,
    summary_json: Path | None,
) -> None:
    """Start the workers. With a `simulate` section: publish, process, exit when all are done."""
    from runner.config import config_warnings, load_config
    from runner.service import RunOptions, serve

    flags = {"workers": workers} if workers is not None else {}
    config = load_config(config_file, flags=flags)
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}", err=True)
    options = RunOptions(
        simulate=not no_simulate, until_empty=until_empty, summary_json=summary_json
    )
    sys.exit(serve(config, options))


@cli.command()
@click.argument("config_files", metavar="FILE...", nargs=-1, required=True)
def validate(config_files: tuple[str, ...]) -> None:
    """Check config files fully, handlers imported: an OK line per file, or every problem."""
    from runner.config import config_warnings, load_config

    failed = False
    for config_file in config_files:
        try:
            config = load_config(config_file)
        except ConfigError as exc:
            report(exc)
            failed = True
            continue
        for warning in config_warnings(config):
            click.echo(f"{config_file}: warning: {warning}", err=True)
        count = len(config.task_types)
        noun = "task type" if count == 1 else "task types"
        click.echo(f"OK {config_file} ({count} {noun}, broker {config.broker.kind})")
    if failed:
        sys.exit(EXIT_USAGE)


@cli.command("config")
@click.argument("config_file", metavar="FILE")
@click.option("--workers", type=click.IntRange(min=1), help="Override `workers`, as run does.")
def show_config(config_file: str, workers: int | None) -> None:
    """Print the effective config as YAML, each value followed by where it came from."""
    from runner.config import render_config

    flags = {"workers": workers} if workers is not None else {}
    click.echo(render_config(config_file, flags=flags), nl=False)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of config files (for editor completion and inline errors)."""
    import json

    from runner.config import config_json_schema

    click.echo(json.dumps(config_json_schema(), indent=2))


def report(exc: RunnerError) -> int:
    """Print an error the way users should see it (no traceback) and return its exit code."""
    if isinstance(exc, ConfigError):
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        return EXIT_USAGE
    click.echo(f"error: {exc}", err=True)
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, BrokerUnavailable):
        return EXIT_BROKER
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="dq-run", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(EXIT_FAILURE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except RunnerError as exc:
        sys.exit(report(exc))
