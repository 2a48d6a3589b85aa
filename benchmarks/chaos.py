"""`make chaos`: fault scenarios against real worker processes, audited by a ledger.

    .venv/bin/python benchmarks/chaos.py                    # every scenario (under ten minutes)
    .venv/bin/python benchmarks/chaos.py --quick            # smaller sizes (soak 10,000)
    .venv/bin/python benchmarks/chaos.py -k SIGKILL -b redis  # scenarios whose name matches

Each scenario (benchmarks/chaos_scenarios.py) runs `dq-run run` worker processes on a fresh
SQLite file or a fresh throwaway redis-server (chaos_worlds.py), injects its fault, and keeps a
ledger: every published id, every handler run (the audit handler's lines), every outcome the
broker accepted (the workers' JSON logs) and the DLQ. chaos_ledger.py audits it and judges it.
Prints a table, writes benchmarks/chaos_results.md, and exits 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from chaos_ledger import (  # noqa: E402
    Row,
    Verdict,
    judge,
    markdown_table,
    notes_lines,
    render_table,
)
from chaos_scenarios import SCENARIOS, SIZES, Scenario, Sizes  # noqa: E402
from chaos_worlds import SCENARIO_ERRORS, make_world  # noqa: E402

from tests.redis_server import redis_server_binary  # noqa: E402

PROMISES = """\
- **memory**: nothing survives the process (not run here: a killed process takes its queue).
- **sqlite / redis**: at-least-once, no loss: a task leaves the broker only when acked after
  success or dead-lettered; a dead or frozen worker's tasks come back after the visibility
  timeout (vt); an ack from a worker whose lease moved on is refused, so nothing is completed
  twice.
- **redis without persistence**: what Redis had not persisted is lost when it restarts; lost
  tasks are counted, not judged.
"""

RULES = """\
A row fails on (the issue's rules): any loss where the broker promises none; any task completed
(acked) twice; any task run twice in the soak or in the SIGTERM-within-grace scenario; recovery
over 1.5 x vt + 1 s; RSS growth over 10% in the soak. And on broken promises of the engine that
the scenarios also see: a healthy task dead-lettered; a worker that does not exit as promised
(0 after SIGTERM, within grace + 2 s even with handlers blocked in a C call; 130 at once after a
second signal); a thawed worker starting a task another worker already completed; tasks
published after a Redis restart not completed; tasks stuck (the queue stopped moving); a fault
that hit no task (nothing was tested).

"lost" = published, never acked, never returned from its handler and not in the DLQ (a task
still in the broker when the scenario gave up counts too). "ran twice" = handler started more
than once (tasks that fail on purpose are left out: their retries are the point).
"completed twice" = more than one task.succeeded / task.dead in the workers' logs, which log an
outcome only once the broker accepted it. "recovery" = from the fault (for a Redis restart:
from when Redis answered again) to the moment the last task it hit (in flight in the faulted
process, or handed out to it and never started) started again or was acked."""


def run_one(scenario: Scenario, broker: str, sizes: Sizes) -> Row:
    """Run one scenario in a fresh temp dir; the dir (worker logs, audit) is kept if it fails."""
    started = time.monotonic()
    if broker == "redis" and redis_server_binary() is None:
        return Row(scenario.name, broker, _error("redis-server is not installed"))
    tmp = Path(tempfile.mkdtemp(prefix="dq-chaos-"))
    world = make_world(broker, tmp, **scenario.world)
    try:
        ledger, promise = scenario.run(world, sizes)
        verdict = judge(ledger, promise)
    except SCENARIO_ERRORS as exc:
        traceback.print_exc()
        verdict = _error(f"scenario error: {type(exc).__name__}: {_gist(str(exc))}")
    finally:
        world.close()
    if verdict.passed:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"   worker logs and audit kept in {tmp}")
    return Row(scenario.name, broker, verdict, time.monotonic() - started)


def _gist(message: str) -> str:
    """A message on one line: its first and last lines (a worker's log tail ends in the cause)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1:
        lines = [lines[0], "...", lines[-1]]
    return " ".join(lines)[:300]


def _error(reason: str) -> Verdict:
    return Verdict(0, 0, 0, 0, 0, None, 0.0, 0.0, None, (reason,))


def render_markdown(rows: list[Row], context: list[str]) -> str:
    lines = ["# Chaos results", "", "Written by `make chaos` (benchmarks/chaos.py).", ""]
    lines += [markdown_table(rows), ""]
    lines += [f"- {note}" for note in notes_lines(rows)]
    lines += ["", "## What is promised", "", PROMISES, "## How a row is judged", "", RULES, ""]
    lines += [f"- {item}" for item in context]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (soak 10,000)")
    parser.add_argument("-k", dest="match", default="", help="only scenarios whose name has this")
    parser.add_argument("-b", "--brokers", default="sqlite,redis", help="comma-separated")
    parser.add_argument("--soak", type=int, help="tasks in the soak (default: by size)")
    parser.add_argument("--output", type=Path, default=HERE / "chaos_results.md")
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    if args.soak:
        sizes = Sizes(sizes.tasks, args.soak)
    brokers = args.brokers.split(",")

    began = time.monotonic()
    rows: list[Row] = []
    for scenario in SCENARIOS:
        if args.match.lower() not in scenario.name.lower():
            continue
        for broker in (b for b in scenario.brokers if b in brokers):
            print(f"-- {scenario.name} on {broker} ...", flush=True)
            row = run_one(scenario, broker, sizes)
            print("   " + " | ".join(row.cells()[2:]) + f"  ({row.seconds:.0f}s)", flush=True)
            rows.append(row)
    took = time.monotonic() - began

    print()
    print(render_table(rows))
    for line in notes_lines(rows):
        print(f"  {line}")
    context = [
        f"run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {took:.0f} s in all, "
        f"{'quick' if args.quick else 'full'} sizes ({sizes.tasks} tasks per fault scenario, "
        f"{sizes.soak:,} in the soak)",
        f"machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}",
    ]
    args.output.write_text(render_markdown(rows, context))
    print(f"\n{took:.0f}s; wrote {args.output}")
    return 0 if rows and all(r.verdict.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
