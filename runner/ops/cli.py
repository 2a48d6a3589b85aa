"""dq-run: parse arguments, call the library, map errors to exit codes. No logic lives here.

Exit codes: 0 success, 1 other failure, 2 config or usage error (also: the broker cannot do
this, e.g. publish to a memory broker), 3 broker unavailable: each error class carries its own
(runner.errors). 130: second signal (forced stop). `run` exits with its code even when a
handler left threads running (see runner.ops.service).

Size: about 630 lines because every command's options and help live here, one function each,
with no logic of their own (runner.ops.admin, bench and service do the work); a module per
command is the split when it grows further.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import click

from runner.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ConfigError,
    InputError,
    Problem,
    RunnerError,
    UsageError,
)


class _Group(click.Group):
    """A command group that answers a mistyped command with the one meant."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            close = difflib.get_close_matches(args[0], list(self.commands), n=1)
            if close:
                raise click.UsageError(
                    f"no such command {args[0]!r}; did you mean {close[0]!r}?", ctx
                )
        return super().resolve_command(ctx, args)


class _DefaultToRun(_Group):
    """`dq-run CONFIG` means `dq-run run CONFIG`.

    A first argument that is neither a command nor an option is a config file, unless no such
    file exists and it is a word, not a path, that looks like a command: a misspelt one
    (``valdate``), or any word followed by a file (``frobnicate configs/demo.yaml``, which
    `run` would take as a second config).
    """

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            if Path(args[0]).exists() or any(c in args[0] for c in "./\\"):
                args = ["run", *args]  # a file, or a path: never taken for a command
            elif not difflib.get_close_matches(args[0], list(self.commands), n=1):
                if len(args) > 1 and Path(args[1]).is_file():
                    known = ", ".join(self.commands)
                    raise click.UsageError(f"no such command {args[0]!r} (commands: {known})", ctx)
                args = ["run", *args]  # `run` says that the config file is missing
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
    "--types",
    metavar="TYPE,...",
    help="Run only these task types in this process (override `types`; DQ_TYPES too).",
)
@click.option(
    "--replay",
    is_flag=True,
    help="First put every dead letter back in the queue (attempts reset). The way to replay "
    "a memory pipeline's file DLQ, e.g. tasks dead-lettered at shutdown.",
)
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
    types: str | None,
    replay: bool,
    summary_json: Path | None,
) -> None:
    """Start the workers. With a `simulate` section: publish, process, exit when all are done."""
    from runner.config.load import config_warnings, load_config
    from runner.ops.service import RunOptions, serve

    flags: dict[str, object] = {"workers": workers} if workers is not None else {}
    if types is not None:
        flags["types"] = types
    config = load_config(config_file, flags=flags)
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}", err=True)
    options = RunOptions(
        simulate=not no_simulate, until_empty=until_empty, replay=replay, summary_json=summary_json
    )
    try:
        code = serve(config, options)
    except RunnerError as exc:
        code = report(exc)
    _exit_run(code)


def _exit_run(code: int) -> NoReturn:
    """Exit with ``code``, without waiting for threads a handler left running (CPython would;
    serve has logged their names and written out everything of ours)."""
    from runner.ops.service import threads_left

    if not threads_left():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to save
            stream.flush()
    os._exit(code)


@cli.command()
@click.argument("config_files", metavar="FILE...", nargs=-1, required=True)
def validate(config_files: tuple[str, ...]) -> None:
    """Check config files fully, handlers imported: an OK line per file, or every problem."""
    from runner.config.load import config_warnings, load_config

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
    from runner.config.load import render_config

    flags = {"workers": workers} if workers is not None else {}
    click.echo(render_config(config_file, flags=flags), nl=False)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of config files (for editor completion and inline errors)."""
    import json

    from runner.config.schema import config_json_schema

    click.echo(json.dumps(config_json_schema(), indent=2))


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("type_name", metavar="TYPE", required=False)
@click.argument("payload_json", metavar="[PAYLOAD_JSON]", required=False)
@click.option(
    "--file",
    "input_file",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help='JSON Lines, one {"type": ..., "payload": ...} per line; - reads stdin.',
)
@click.option("--delay", metavar="DURATION", help="Ready only after this long (10s, 5m).")
@click.option(
    "--at", "at", metavar="TIME", help="Ready only at this time (ISO 8601 with a zone offset)."
)
@click.option(
    "--expires", metavar="DURATION", help="Not run if not started within this long (10m)."
)
@click.option("--unique-key", metavar="KEY", help="Publish only if no task of the type holds KEY.")
def publish(
    config_file: str,
    type_name: str | None,
    payload_json: str | None,
    input_file: str | None,
    delay: str | None,
    at: str | None,
    expires: str | None,
    unique_key: str | None,
) -> None:
    """Publish tasks and print their ids. All input is checked first: all or nothing.

    A unique task whose key is held is not published: the holder's id is printed, followed
    by a note saying so."""
    from runner.config.load import load_config
    from runner.ops import admin
    from runner.ops.drafts import read_drafts

    config = load_config(config_file)
    admin.require_shared(config, "publish")
    delay_s = admin.parse_delay(delay)
    when = admin.parse_at(at, given_delay=delay is not None)
    expires_s = None if expires is None else admin.parse_duration_option("--expires", expires)
    if expires_s == 0:
        raise UsageError("--expires '0': expected a duration above 0 (10s, 5m)")
    if input_file is None:
        drafts = read_drafts(config, type_name, payload_json, None)
    else:
        source = "<stdin>" if input_file == "-" else input_file
        with click.open_file(input_file, mode="rb") as raw:
            lines = _utf8_lines(raw, source)
            drafts = read_drafts(config, type_name, payload_json, lines, source)
    for task_id, held in admin.publish(config, drafts, delay_s, when, expires_s, unique_key):
        click.echo(
            f"{task_id}  (not published: unique key {held!r} is held by it)" if held else task_id
        )


def _utf8_lines(raw: Iterable[bytes], source: str) -> Iterator[str]:
    """``--file`` input decoded line by line: invalid UTF-8 is an InputError naming the line."""
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                [
                    Problem(
                        f"{source}:{number}",
                        "",
                        f"invalid UTF-8 (byte {line[exc.start]:#04x} at column {exc.start + 1}); "
                        "the input must be UTF-8",
                    )
                ]
            ) from None


_F = TypeVar("_F", bound=Callable[..., Any])


def _dlq_filters(func: _F) -> _F:
    options = (
        click.option("--type", "type_name", metavar="T", help="Only this task type."),
        click.option("--error", metavar="NAME", help="Only this error type (TimeoutError)."),
        click.option("--since", metavar="DURATION", help="Only those dead within this (1h)."),
    )
    for option in reversed(options):
        func = option(func)
    return func


@cli.group(cls=_Group)
def dlq() -> None:
    """Dead letters: list, show, replay, purge (sqlite, redis, or a memory config's file)."""


@dlq.command("list")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_dlq_filters
def dlq_list(
    config_file: str, as_json: bool, type_name: str | None, error: str | None, since: str | None
) -> None:
    """List dead letters, oldest first."""
    import json

    from runner.config.load import load_config
    from runner.ops import admin
    from runner.ops import views as adminview

    config = load_config(config_file)
    where = admin.dead_letter_filter(type_name, error, since)
    with admin.open_admin(config, read_only=True) as target:
        records = target.dead_letters(where)
    if as_json:
        for record in records:
            click.echo(json.dumps(adminview.dead_letter_summary(record), ensure_ascii=False))
    elif records:
        click.echo(adminview.dead_letter_table(records))
    else:
        click.echo("no dead letters match", err=True)


@dlq.command("show")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("task_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
def dlq_show(config_file: str, task_id: str, as_json: bool) -> None:
    """Show one dead letter: payload, every attempt's error and traceback, the final error.

    ID is the whole id or any end of it (6 characters or more) that only one dead letter has,
    such as the short id tables and logs show.
    """
    import json

    from runner.config.load import load_config
    from runner.ops import admin
    from runner.ops import views as adminview

    config = load_config(config_file)
    with admin.open_admin(config, read_only=True) as target:
        record = admin.find_dead_letter(target, task_id)
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(adminview.dead_letter_detail(record))


@dlq.command("replay")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("task_ids", metavar="[ID...]", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter the filters match.")
@_dlq_filters
@click.option("--rate", metavar="N/s", help="At most N tasks per second (or N/m per minute).")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; change nothing.")
def dlq_replay(
    config_file: str,
    task_ids: tuple[str, ...],
    replay_all: bool,
    type_name: str | None,
    error: str | None,
    since: str | None,
    rate: str | None,
    dry_run: bool,
) -> None:
    """Put dead letters back on the queue with their attempts reset.

    Each ID is a whole id or a unique end of one (6+ characters), as tables show them.
    """
    from runner.config.load import load_config
    from runner.engine.handoff import before_replay, not_replayable
    from runner.ops import admin
    from runner.ops import views as adminview

    config = load_config(config_file)
    rate_per_s = None if rate is None else admin.parse_rate(rate)
    with admin.open_admin(config) as target:
        ids = admin.resolve_ids(target, task_ids)
        where = admin.dead_letter_filter(type_name, error, since, ids)
        records, missing = admin.select_for_replay(target, ids, replay_all, where)
        for task_id in missing:
            click.echo(f"warning: no matching dead letter with id {task_id}", err=True)
        held = admin.held_unique(target, records)
        for task_id, holder in held.items():
            click.echo(f"skipped {task_id}: its unique key is held by {holder}", err=True)
        joins = not_replayable(records)
        for task_id, why in joins.items():
            click.echo(f"skipped {task_id}: {why}", err=True)
        records = [r for r in records if r.id not in held and r.id not in joins]
        if not records:
            click.echo("nothing to replay: no dead letter matches")
            return
        if dry_run:
            click.echo(adminview.dead_letter_table(records))
            click.echo(f"dry run: {len(records)} would be replayed; nothing changed")
            return
        before_replay(target, records)
        moved = admin.replay(target, [r.id for r in records], rate_per_s)
    click.echo(f"replayed {moved} of {len(records)}")
    if moved < len(records):
        click.echo("the rest were skipped: already queued, or undecodable records", err=True)


@dlq.command("purge")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("task_ids", metavar="[ID...]", nargs=-1)
@_dlq_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(
    config_file: str,
    task_ids: tuple[str, ...],
    type_name: str | None,
    error: str | None,
    since: str | None,
    yes: bool,
) -> None:
    """Delete dead letters for good (those matching the IDs and filters; all without any).

    Each ID is a whole id or a unique end of one (6+ characters), as tables show them.
    """
    from runner.config.load import load_config
    from runner.ops import admin, pipelines

    config = load_config(config_file)
    with admin.open_admin(config) as target:
        where = admin.dead_letter_filter(
            type_name, error, since, admin.resolve_ids(target, task_ids)
        )
        records = target.dead_letters(where)
        if not records:
            click.echo("nothing to purge: no dead letter matches")
            return
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(
                    f"refusing to purge {len(records)} dead letters without confirmation: "
                    "stdin is not a terminal; pass --yes"
                )
            click.confirm(f"Purge {len(records)} dead letters for good?", abort=True)
        pipelines.before_purge(target, records)
        purged = admin.purge(target, records)
    click.echo(f"purged {purged}")


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(config_file: str, as_json: bool) -> None:
    """Queue depth by type (ready, delayed, leased), oldest task age, dead-letter count."""
    import json

    from runner.config.load import load_config
    from runner.ops import admin
    from runner.ops import views as adminview

    config = load_config(config_file)
    admin.require_shared(config, "stats")
    with admin.open_admin(config, read_only=True) as target:
        result = admin.stats(config, target)
    click.echo(json.dumps(result.to_json()) if as_json else adminview.stats_table(result))


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("task_id", metavar="ID")
@click.option("--wait", "wait", metavar="DURATION", help="Wait up to this long for it (10s).")
def result(config_file: str, task_id: str, wait: str | None) -> None:
    """Print a task's kept result as JSON (its type needs `results`); exit 1 while none."""
    import json

    from runner.config.load import load_config
    from runner.ops import admin

    config = load_config(config_file)
    wait_s = 0.0 if wait is None else admin.parse_duration_option("--wait", wait)
    found = admin.result(config, task_id, wait_s)
    if found is None:
        click.echo(
            f"no result for {task_id}: still running, an unknown id, or its result expired "
            "(a type keeps results only with `results`)",
            err=True,
        )
        raise SystemExit(1)
    click.echo(json.dumps(found))


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("root_id", metavar="ROOT_ID")
def cancel(config_file: str, root_id: str) -> None:
    """Cancel the pipeline whose first task is ROOT_ID: nothing more of it starts, its queued
    tasks are dead-lettered (reason cancelled; replay them to resume), running ones see
    ctx.cancelled."""
    from runner.config.load import load_config
    from runner.engine.handoff import cancel as cancel_pipeline
    from runner.ops import pipelines

    config = load_config(config_file)
    broker = pipelines.pipeline_broker(config, "cancel")
    try:
        ids = cancel_pipeline(broker, root_id)
    finally:
        broker.close()
    click.echo(
        f"cancelled pipeline {root_id}: {len(ids)} queued task(s) dead-lettered (reason "
        "cancelled); running ones see ctx.cancelled; nothing more of it starts"
    )


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("root_id", metavar="ROOT_ID")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as one JSON object.")
def trace(config_file: str, root_id: str, as_json: bool) -> None:
    """The tree of a pipeline's tasks: each one's type, state, attempts, duration and error."""
    import json

    from runner.config.load import load_config
    from runner.ops import pipelines
    from runner.ops.views import trace_tree

    config = load_config(config_file)
    broker = pipelines.pipeline_broker(config, "trace")
    try:
        roots = pipelines.trace(broker, root_id)
    finally:
        broker.close()
    if not roots:
        click.echo(f"nothing known of pipeline {root_id} (an unknown id, or it expired)", err=True)
        raise SystemExit(1)
    if as_json:
        click.echo(json.dumps([node.to_json() for node in roots]))
    else:
        click.echo(trace_tree(roots))


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule, per line.")
def schedules(config_file: str, as_json: bool) -> None:
    """Each schedule with its last fired tick (from the broker) and its next one."""
    import json

    from runner.config.load import load_config
    from runner.ops.schedules import schedule_states, schedules_table

    config = load_config(config_file)
    states, read = schedule_states(config)
    if as_json:
        for state in states:
            click.echo(json.dumps(state.to_json()))
    else:
        click.echo(schedules_table(states, read, config.broker.kind))


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("type_name", metavar="TYPE")
@click.option("--for", "for_", metavar="DURATION", help="Resume by itself after this long (10m).")
def pause(config_file: str, type_name: str, for_: str | None) -> None:
    """Hand out no TYPE task to any process until resumed; running tasks finish."""
    from runner.config.load import load_config
    from runner.ops import admin
    from runner.ops.views import paused_list

    config = load_config(config_file)
    for_s = None if for_ is None else admin.parse_duration_option("--for", for_)
    gate = admin.pause(config, type_name, for_s)
    click.echo(f"paused: {paused_list({type_name: gate.until})}")


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("type_name", metavar="TYPE")
def resume(config_file: str, type_name: str) -> None:
    """Hand out TYPE tasks again after `dq-run pause`."""
    from runner.config.load import load_config
    from runner.ops import admin

    config = load_config(config_file)
    was = admin.resume(config, type_name)
    click.echo(f"resumed: {type_name}" if was else f"{type_name} was not paused")


@cli.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--rate", default="500/s", show_default=True, help="Publish rate: 500/s, 30/m, max.")
@click.option("--duration", default="30s", show_default=True, help="How long to publish.")
@click.option("--tasks", type=click.IntRange(min=1), help="Stop publishing after N tasks.")
@click.option("--type", "types", multiple=True, help="Task type to publish (repeatable).")
@click.option("--workers", type=click.IntRange(min=1), help="Override `workers`.")
@click.option(
    "--publish-mode",
    type=click.Choice(["batch", "call"]),
    default="batch",
    show_default=True,
    help="batch: many tasks per publish_many; call: one publish() per task (a web app's way).",
)
def bench(
    config_file: str,
    rate: str,
    duration: str,
    tasks: int | None,
    types: tuple[str, ...],
    workers: int | None,
    publish_mode: Literal["batch", "call"],
) -> None:
    """Publish synthetic load into CONFIG's pipeline; report throughput and latency per type."""
    from runner.config.load import load_config
    from runner.ops.bench import BenchOptions, parse_rate, parse_seconds, run_bench

    options = BenchOptions(
        rate=parse_rate(rate),
        duration_s=parse_seconds(duration),
        tasks=tasks,
        types=types,
        publish_mode=publish_mode,
    )
    flags = {"workers": workers} if workers is not None else {}
    config = load_config(config_file, flags=flags)
    run_bench(config, options).render(sys.stdout)


def report(exc: RunnerError) -> int:
    """Print an error the way users should see it (no traceback) and return its exit code
    (the class's: runner.errors)."""
    if isinstance(exc, ConfigError | InputError):
        for problem in exc.problems:
            click.echo(str(problem), err=True)
    else:
        click.echo(f"error: {exc}", err=True)
    return exc.exit_code


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
