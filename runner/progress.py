"""The live progress view on a terminal (Rich), an events.Listener.

One panel on stderr, redrawn a few times a second: done / total with a bar, throughput, retries,
dead letters, and each type's in-flight count against its limit. It is shown only when stderr is
a terminal and logs are text (``progress_enabled``), so JSON logs and pipes stay clean.

Text log lines do not tear the panel: the log writer writes to whatever ``sys.stderr`` is at
write time (see logs.py), and ``Live(redirect_stderr=True)`` swaps in a proxy that prints those
lines above the panel.

``handle`` runs on worker threads and takes no lock: it puts the event on a
``queue.SimpleQueue``; the render thread drains the queue and does all the counting.
"""

from __future__ import annotations

import queue
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from runner.config import LoggingConfig
from runner.events import Event
from runner.logs import resolve_format
from runner.metrics import RuntimeState


def progress_enabled(config: LoggingConfig, stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default: stderr) is a terminal and log lines are text."""
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return callable(isatty) and bool(isatty()) and resolve_format(config, target) == "text"


class Progress:
    """Live done/total, rate, retries, dead and per-type in-flight vs limit."""

    def __init__(
        self,
        total: int | None,
        limits: dict[str, int],
        state: RuntimeState,
        *,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.limits = dict(limits)
        self._state = state
        self._console = console if console is not None else Console(stderr=True)
        self._refresh = refresh_per_second
        self._clock = clock
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._counts: Counter[str] = Counter()
        self._done_by_type: Counter[str] = Counter()
        self._started_at = clock()
        self._stopped_at: float | None = None
        self._live: Live | None = None

    def handle(self, event: Event) -> None:
        if event.name.startswith("task."):
            self._events.put(event)

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._counts[event.name] += 1
            if event.name in ("task.succeeded", "task.dead"):
                self._done_by_type[event.type or "?"] += 1

    @property
    def done(self) -> int:
        """Tasks finished (succeeded or dead), as counted so far by the render side."""
        self._drain()
        return self._counts["task.succeeded"] + self._counts["task.dead"]

    def render(self) -> RenderableType:
        """The panel as it would be drawn now (also what Live redraws)."""
        self._drain()
        done = self._counts["task.succeeded"] + self._counts["task.dead"]
        end = self._stopped_at if self._stopped_at is not None else self._clock()
        elapsed = max(end - self._started_at, 1e-9)
        rate = done / elapsed

        head = Text()
        if self.total is not None:
            head.append(f"{done}/{self.total} done", style="bold")
        else:
            head.append(f"{done} done", style="bold")
        head.append(f"  {rate:,.1f}/s", style="cyan")
        if self.total and rate > 0 and done < self.total:
            head.append(f"  eta {(self.total - done) / rate:,.0f}s", style="dim")
        head.append(f"  retries {self._counts['task.retrying']}", style="yellow")
        dead_style = "bold red" if self._counts["task.dead"] else "dim"
        head.append(f"  dead {self._counts['task.dead']}", style=dead_style)
        if self._counts["task.timeout"]:
            head.append(f"  timeouts {self._counts['task.timeout']}", style="magenta")
        head.append(f"  {elapsed:,.1f}s", style="dim")

        try:
            inflight = self._state.inflight()
        except Exception:  # the view must never take the run down
            inflight = {}
        types = Table.grid(padding=(0, 2))
        types.add_column(justify="left")
        types.add_column(justify="right")
        types.add_column(justify="right")
        for type_ in sorted(set(self.limits) | set(inflight)):
            running = inflight.get(type_, 0)
            limit = self.limits.get(type_)
            style = "green" if limit is not None and running >= limit else ""
            slots = f"{running}/{limit}" if limit is not None else str(running)
            types.add_row(type_, Text(f"running {slots}", style=style),
                          f"done {self._done_by_type[type_]}")  # fmt: skip

        parts: list[RenderableType] = []
        if self.total:
            parts.append(ProgressBar(total=self.total, completed=min(done, self.total), width=40))
        parts += [head, types]
        return Group(*parts)

    def __rich__(self) -> RenderableType:
        return self.render()

    def start(self) -> None:
        """Start redrawing on the console (no-op when already started)."""
        if self._live is not None:
            return
        self._started_at = self._clock()
        self._live = Live(
            self,
            console=self._console,
            refresh_per_second=self._refresh,
            redirect_stderr=True,
            redirect_stdout=False,
            transient=False,
        )
        self._live.start()

    def stop(self) -> None:
        """Draw the final state once and stop redrawing. Safe to call twice."""
        live, self._live = self._live, None
        if live is None:
            return
        self._stopped_at = self._clock()
        live.stop()
