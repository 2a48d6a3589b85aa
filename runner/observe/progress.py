"""The live progress view on a terminal (Rich), an events.Listener.

One panel on stderr, redrawn a few times a second: a bar and done / total, throughput, retries,
dead letters, and each type's in-flight count against its limit. It is shown only when stderr is
a terminal and logs are text (``progress_enabled``), so JSON logs and pipes stay clean.

What "total" means depends on the broker (its ``shared`` capability flag):

- Alone on a broker (memory: in-process), the total is the work this process can see: the
  queue's depth when the view started (the backlog) plus what is published meanwhile (at least
  ``planned``, the tasks this process means to publish, e.g. the ``simulate`` count).
- On a broker other processes may share (an SQLite file, Redis), they drain the same backlog,
  so no fraction would be true: the view shows this process's done count and the queue's depth
  (read at most once per ``depth_every_s``).

Tasks the memory broker dead-letters at shutdown (reason ``shutdown``) are not "done": they are
counted as ``left``.

The panel fits the console's width: parts of the status line drop, least useful first, and what
still does not fit (a long type name) is cut with an ellipsis.

Text log lines do not tear the panel: the log writer writes to whatever ``sys.stderr`` is at
write time (see logs.py), and ``Live(redirect_stderr=True)`` swaps in a proxy that prints those
lines above the panel. Starting and stopping hold ``logs.STDERR_LOCK``, which the log writer
holds for each line, so no line lands inside the first or the last frame.

``handle`` runs on worker threads and takes no lock: it puts the event on a
``queue.SimpleQueue``; the render thread drains the queue and does all the counting.
"""

from __future__ import annotations

import queue
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from runner.config.models import LoggingConfig
from runner.events import Event, EventName
from runner.model import DeadReason
from runner.observe.logs import STDERR_LOCK, resolve_format
from runner.observe.metrics import RuntimeState

#: The bar's width on a wide console.
BAR_WIDTH = 40
#: How long stop() waits for a log line being written before it draws the last frame anyway.
_LOCK_WAIT_S = 2.0


def progress_enabled(config: LoggingConfig, stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default: stderr) is a terminal and log lines are text."""
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return callable(isatty) and bool(isatty()) and resolve_format(config, target) == "text"


@dataclass(frozen=True)
class _Part:
    """One piece of the status line; ``rank`` 0 is never dropped, higher ranks drop first."""

    text: str
    style: str
    rank: int


class _Panel:
    """The panel laid out for the width it is rendered at."""

    def __init__(
        self,
        total: int | None,
        done: int,
        parts: list[_Part],
        rows: list[tuple[str, str, str, str]],
    ) -> None:
        self.total = total
        self.done = done
        self.parts = parts
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        if self.total:
            bar = Table.grid()
            bar.add_column(no_wrap=True)
            bar.add_row(
                ProgressBar(
                    total=self.total,
                    completed=min(self.done, self.total),
                    width=min(BAR_WIDTH, width),
                )
            )
            yield bar
        yield fit_line(self.parts, width)
        types = Table.grid(padding=(0, 2))
        types.add_column(no_wrap=True, overflow="ellipsis", max_width=max(8, width - 30))
        types.add_column(no_wrap=True, justify="right")
        types.add_column(no_wrap=True, justify="right")
        for name, running, style, done in self.rows:
            types.add_row(name, Text(running, style=style), done)
        yield types


def fit_line(parts: Iterable[_Part], width: int, sep: str = "  ") -> Text:
    """The parts joined by ``sep`` in their order, dropping the highest ranks until the line
    fits ``width``; what still does not fit ends in an ellipsis."""
    kept = list(parts)
    while len(kept) > 1 and len(sep.join(p.text for p in kept)) > width:
        worst = max(range(len(kept)), key=lambda i: (kept[i].rank, i))
        if kept[worst].rank == 0:
            break
        del kept[worst]
    line = Text(no_wrap=True, overflow="ellipsis")
    for i, part in enumerate(kept):
        if i:
            line.append(sep)
        line.append(part.text, style=part.style)
    line.truncate(max(width, 1), overflow="ellipsis")
    return line


class Progress:
    """Live done/total (or done and queue depth), rate, retries, dead and per-type slots."""

    def __init__(
        self,
        planned: int | None,
        limits: dict[str, int],
        state: RuntimeState,
        *,
        shared: bool = False,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        depth_every_s: float = 1.0,
        flush_logs: Callable[[], object] | None = None,
    ) -> None:
        self.planned = planned
        self._flush_logs = flush_logs
        self.shared = shared
        self.limits = dict(limits)
        self.backlog: int | None = None  # queued when the view started (set by start)
        self._state = state
        self._console = console if console is not None else Console(stderr=True)
        self._refresh = refresh_per_second
        self._clock = clock
        self._depth_every_s = depth_every_s
        self._depth: tuple[float, int | None] | None = None  # (read at, tasks queued)
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._counts: Counter[str] = Counter()
        self._done_by_type: Counter[str] = Counter()
        self._left = 0  # dead-lettered at shutdown without finishing (memory broker)
        self._started_at = clock()
        self._stopped_at: float | None = None
        self._live: Live | None = None

    def handle(self, event: Event) -> None:
        if event.name.startswith("task."):
            self._events.put(event)
        elif event.name == EventName.WORKER_STOPPED and self.shared:
            # The last moment the broker is open (the runner closes it next): the final frame
            # shows the depth as the run left it, not as it was up to a second before.
            self._queued(fresh=True)

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event.name == EventName.TASK_DEAD and event.reason == DeadReason.SHUTDOWN:
                self._left += 1
                continue
            self._counts[event.name] += 1
            if event.name in (EventName.TASK_SUCCEEDED, EventName.TASK_DEAD):
                self._done_by_type[event.type or "?"] += 1

    @property
    def done(self) -> int:
        """Tasks finished here (succeeded or dead), as counted so far by the render side."""
        self._drain()
        return self._counts[EventName.TASK_SUCCEEDED] + self._counts[EventName.TASK_DEAD]

    @property
    def total(self) -> int | None:
        """The fraction's denominator, or None when the view shows a count (shared broker)."""
        self._drain()
        if self.shared:
            return None
        published = self._counts[EventName.TASK_PUBLISHED]
        return (self.backlog or 0) + max(self.planned or 0, published)

    def _queued(self, fresh: bool = False) -> int | None:
        """Tasks waiting in the broker (ready or delayed), re-read at most every depth_every_s
        (``fresh``: now), and never once the view has stopped (the broker is closed by then)."""
        now = self._clock()
        stale = self._depth is None or now - self._depth[0] >= self._depth_every_s
        if fresh or (stale and self._stopped_at is None):
            try:
                depth = self._state.depth()
                queued: int | None = sum(d.ready + d.delayed for d in depth.values())
            except Exception:  # a closed or unreachable broker: the view must not fail
                queued = None
            self._depth = (now, queued)
        return self._depth[1] if self._depth is not None else None

    def render(self) -> RenderableType:
        """The panel as it would be drawn now (also what Live redraws)."""
        done = self.done
        total = self.total
        end = self._stopped_at if self._stopped_at is not None else self._clock()
        elapsed = max(end - self._started_at, 1e-9)
        rate = done / elapsed
        counts = self._counts

        parts = [_Part(f"{done}/{total} done" if total else f"{done} done", "bold", 0)]
        if self.shared:
            queued = self._queued()
            parts.append(_Part(f"queued {'?' if queued is None else queued}", "cyan", 1))
        parts.append(_Part(f"{rate:,.1f}/s", "cyan", 4))
        if total and rate > 0 and done < total and self._stopped_at is None:
            parts.append(_Part(f"eta {(total - done) / rate:,.0f}s", "dim", 5))
        retrying = counts[EventName.TASK_RETRYING]
        dead = counts[EventName.TASK_DEAD]
        timeouts = counts[EventName.TASK_TIMEOUT]
        parts.append(_Part(f"retries {retrying}", "yellow", 3))
        parts.append(_Part(f"dead {dead}", "bold red" if dead else "dim", 1))
        if timeouts:
            parts.append(_Part(f"timeouts {timeouts}", "magenta", 3))
        if self._left:
            parts.append(_Part(f"left {self._left}", "yellow", 2))
        parts.append(_Part(f"{elapsed:,.1f}s", "dim", 6))

        try:
            inflight = self._state.inflight()
        except Exception:  # the view must never take the run down
            inflight = {}
        rows = []
        for type_ in sorted(set(self.limits) | set(inflight)):
            running = inflight.get(type_, 0)
            limit = self.limits.get(type_)
            style = "green" if limit is not None and running >= limit else ""
            slots = f"{running}/{limit}" if limit is not None else str(running)
            rows.append((type_, f"running {slots}", style, f"done {self._done_by_type[type_]}"))
        return _Panel(total, done, parts, rows)

    def __rich__(self) -> RenderableType:
        return self.render()

    def start(self) -> None:
        """Note the backlog and start redrawing on the console (no-op when already started)."""
        if self._live is not None:
            return
        self._started_at = self._clock()
        try:
            self.backlog = sum(d.total for d in self._state.depth().values())
        except Exception:  # the view must never take the run down
            self.backlog = None
        self._live = Live(
            self,
            console=self._console,
            refresh_per_second=self._refresh,
            redirect_stderr=True,
            redirect_stdout=False,
            transient=False,
        )
        with STDERR_LOCK:
            self._live.start()

    def stop(self) -> None:
        """Draw the final state once and stop redrawing. Safe to call twice."""
        live, self._live = self._live, None
        if live is None:
            return
        self._stopped_at = self._clock()
        if self._flush_logs is not None:
            # Lines still queued are printed above the panel, so its last frame ends up last.
            self._flush_logs()
        # A stuck stderr must not hold up shutdown: after the wait, stop anyway.
        locked = STDERR_LOCK.acquire(timeout=_LOCK_WAIT_S)
        try:
            live.stop()
        finally:
            if locked:
                STDERR_LOCK.release()
