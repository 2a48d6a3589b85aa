"""dq-run: parse arguments, call the library, map errors to exit codes. No logic lives here.

Exit codes: 0 success, 1 other failure, 2 config or usage error, 3 broker unavailable,
130 second signal (forced stop).
"""

from __future__ import annotations

import sys
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
