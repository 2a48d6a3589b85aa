"""Process execution (``execution: process``): a pool of child processes per task type.

A ProcessWorker is a Worker (the same books, dispatcher, fetcher, lease keeper and Settler, for
one process type) whose worker threads each own one child process (runner.engine.child): the
thread takes the next task as any worker thread does, sends it to its child as JSON and waits
for the answer, relaying the child's log lines to the task's logger meanwhile. So
``concurrency`` is the number of children, each runs one task at a time, the broker calls and
lease renewals stay in the parent, and a child's crash is the thread's news, not the process's.

- Past ``timeout`` the attempt's ``ctx.cancelled`` is set in the child and, with
  ``timeout_action: interrupt`` (the default), the child gets SIGTERM at once; with ``cancel``
  it may still return. Either way a child that has not answered ``kill_grace`` later gets
  SIGKILL, and the attempt fails as timed out. The slot is free again once the child is reaped.
- A child that dies mid-task (a segfault, ``os._exit``, the OOM killer) fails that attempt with
  ChildDied (its exit code or signal in the message); a new child is started.
- A child is replaced after ``max_tasks_per_child`` tasks, or when its RSS after a task is above
  ``max_memory_per_child``.
- Stop: children finish within the grace period or are killed; then every child is told to
  exit and killed if it does not. A child whose parent dies exits by itself (pipe end closed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from datetime import datetime, timezone
from multiprocessing.connection import Connection, wait
from typing import Any

from runner.brokers.base import Delivery
from runner.engine.attempt import Begun, ChildPolicy, TypeRuntime
from runner.engine.child import main as child_main
from runner.engine.settle import Outcome
from runner.engine.timeouts import Guard
from runner.engine.worker import Worker
from runner.errors import ChildDied, ChildError, ConfigError, PermanentError, Retry
from runner.loader import resolve_exception

log = logging.getLogger("runner.worker")

#: How long a new child has to import its handler and say it is ready.
START_TIMEOUT_S = 30.0
#: How often a waiting thread looks at its task's ctx.cancelled and the shutdown.
LOOK_S = 0.1
#: How long a child told to exit (idle) gets before it is killed.
EXIT_WAIT_S = 2.0


def default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class ChildStartFailed(ChildDied):
    """A child could not start (its handler failed to import there, or it did not answer)."""


class Child:
    """One child process and the parent's end of its pipe."""

    def __init__(self, policy: ChildPolicy, name: str) -> None:
        self.policy = policy
        self.name = name
        self.tasks = 0
        spec = json.loads(policy.spec)
        context = multiprocessing.get_context(policy.start_method)
        if policy.start_method == "forkserver":
            # The children fork from a server that has the runner imported already.
            factory = spec["factory"].partition(":")[0]
            context.set_forkserver_preload(["runner.engine.child", factory])
        parent_end, child_end = context.Pipe()
        self.conn: Connection = parent_end
        # The level its log lines are sent from, and whether it reports its memory after a task.
        spec["log_level"] = logging.getLogger("runner.task").getEffectiveLevel()
        spec["rss"] = bool(policy.max_memory)
        self.process = context.Process(  # type: ignore[attr-defined]
            target=child_main, args=(child_end, json.dumps(spec)), name=name, daemon=False
        )
        self.process.start()
        child_end.close()
        self.pid = self.process.pid or 0
        # Its hello, or its end (a child that dies before it reads its pipe may not close it).
        ready = wait([self.conn, self.process.sentinel], START_TIMEOUT_S)
        if not ready:
            self.kill()
            raise ChildStartFailed(
                f"child process {self.pid} did not start within {START_TIMEOUT_S:g}s"
            )
        if self.conn not in ready and not self.conn.poll(0):
            raise ChildStartFailed(f"child process {self.pid} {self.exit_status()} while starting")
        try:
            hello = self.recv()
        except (EOFError, OSError):
            raise ChildStartFailed(
                f"child process {self.pid} {self.exit_status()} while starting"
            ) from None
        if "failed" in hello:
            self.kill()
            raise ChildStartFailed(f"child process could not start: {hello['failed']}")

    def send(self, message: dict[str, Any]) -> None:
        self.conn.send_bytes(json.dumps(message).encode())

    def recv(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.conn.recv_bytes())
        return message

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.join(EXIT_WAIT_S)
        self.conn.close()

    def exit_status(self) -> str:
        """How the child ended ("died of SIGSEGV", "exited with code 3"), reaping it."""
        self.process.join(EXIT_WAIT_S)
        self.conn.close()
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            try:
                return f"died of {signal.Signals(-code).name}"
            except ValueError:
                return f"died of signal {-code}"
        return f"exited with code {code}"

    def close(self) -> None:
        """Tell an idle child to exit; kill it if it does not."""
        with contextlib.suppress(OSError):
            self.send({"exit": True})
        self.process.join(EXIT_WAIT_S)
        if self.process.exitcode is None:
            self.kill()
        self.conn.close()


class Slot:
    """One worker thread's child: started before the first task, replaced when it dies, is
    killed or has done its share."""

    def __init__(self, rt: TypeRuntime, index: int) -> None:
        assert rt.children is not None, "a process type has a child policy"
        self.policy: ChildPolicy = rt.children
        self.name = f"dq-{rt.name}-{index}"
        self.child: Child | None = None
        self.forced = False  # set at shutdown past the grace period: kill at once
        self._lock = threading.Lock()  # guards ``child`` against close() from stop()

    def open(self) -> Child:
        with self._lock:
            if self.child is None:
                self.child = Child(self.policy, self.name)
            return self.child

    def open_now(self) -> None:
        """Start the child ahead of the next task. One that cannot start is logged, not raised:
        the next task's ``call`` tries again and fails with why (ChildStartFailed)."""
        try:
            self.open()
        except Exception as exc:
            log.warning("%s: %s", self.name, exc)

    def pid(self) -> int | None:
        child = self.child
        return child.pid if child is not None else None

    def close(self) -> None:
        with self._lock:
            child, self.child = self.child, None
        if child is not None:
            child.close()

    def _drop(self, child: Child) -> None:
        with self._lock:
            if self.child is child:
                self.child = None

    # -- one task ---------------------------------------------------------------------------

    def call(self, begun: Begun) -> Any:
        """Run ``begun`` in the child; its return value, or raise what ended it."""
        child = self.open()
        rt, run, ctx = begun.rt, begun.run, begun.ctx
        payload = begun.payload
        dump = getattr(payload, "model_dump", None)
        if callable(dump):  # a pydantic model (validated here): the child validates it again
            payload = dump(mode="json")
        task = {
            "type": rt.name,
            "id": ctx.task_id,
            "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts,
            "left_s": max(0.0, run.deadline - time.monotonic()),
            "headers": dict(ctx.headers) if ctx.headers else None,
            "payload": payload,
        }
        try:
            message = json.dumps({"run": task}, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"the payload cannot cross to a child process: {exc}") from None
        try:
            child.conn.send_bytes(message)
        except OSError:
            self._drop(child)
            raise ChildDied(
                f"child process {child.pid} {child.exit_status()} before the task"
            ) from None
        cancel_sent = False
        while True:
            left = run.deadline - time.monotonic()
            if left <= 0 or run.expired:
                return self._timed_out(child, begun)
            try:
                answer = _answer(child, begun, min(left, LOOK_S))
            except (EOFError, OSError):
                self._drop(child)
                why = f"child process {child.pid} {child.exit_status()} while running the task"
                log.warning("%s (%s %s)", why, rt.name, ctx.task_id)
                raise ChildDied(why) from None
            if answer is not None:
                self._done(child, answer)
                return _value(answer, rt)
            if run.cancelled.is_set() and not cancel_sent:
                _cancel(child)
                cancel_sent = True

    def _timed_out(self, child: Child, begun: Begun) -> Any:
        """Past the deadline (or cut short by shutdown): ctx.cancelled in the child, SIGTERM
        (``interrupt``), SIGKILL ``kill_grace`` later unless a ``cancel`` type answered."""
        rt, run = begun.rt, begun.run
        if not run.expired:
            run.expired = True
            run.cancelled.set()
            run.on_timeout(run)
        _cancel(child)
        hard = rt.interrupt or self.forced
        if hard:
            child.signal(signal.SIGTERM)
        grace = self.policy.kill_grace_s
        try:
            answer = _answer(child, begun, min(grace, 0.5) if self.forced else grace)
        except (EOFError, OSError):
            answer = None  # it left on SIGTERM
        if answer is not None and not hard:
            self._done(child, answer)  # timeout_action: cancel, and it returned in time
            raise TimeoutError(f"ran past its timeout of {rt.timeout_s:g}s")
        self._drop(child)
        child.kill()
        raise TimeoutError(
            f"ran past its timeout of {rt.timeout_s:g}s; its child process was killed"
        )

    def _done(self, child: Child, answer: dict[str, Any]) -> None:
        """After a task: replace the child when it has done its share or grown too big."""
        child.tasks += 1
        policy = self.policy
        if (policy.max_tasks and child.tasks >= policy.max_tasks) or (
            policy.max_memory and int(answer.get("rss", 0)) > policy.max_memory
        ):
            self._drop(child)
            child.close()


def _answer(child: Child, begun: Begun, wait_s: float) -> dict[str, Any] | None:
    """The child's answer to ``begun``'s task, relaying its log lines meanwhile; None when
    none came within ``wait_s``. EOFError or OSError: the child is gone."""
    end = time.monotonic() + wait_s
    while child.conn.poll(max(0.0, end - time.monotonic())):
        message = child.recv()
        if "log" not in message:
            return message
        _relog(begun, message["log"])
    return None


def _cancel(child: Child) -> None:
    """Set the running task's ctx.cancelled in the child (gone already: nothing to do)."""
    with contextlib.suppress(OSError):
        child.send({"cancel": True})


def _relog(begun: Begun, line: list[Any]) -> None:
    """A child's log line, logged here by the task's logger (with the task's fields)."""
    level, message, fields = line
    begun.ctx.logger.log(int(level), message, extra=fields)


def _value(answer: dict[str, Any], rt: TypeRuntime) -> Any:
    """A child's answer as the handler's return value, or the exception it raised."""
    if "error" in answer:
        raise _rebuilt(answer["error"])
    if "unencodable" in answer:
        if rt.result_ttl or (rt.pipeline is not None and rt.pipeline.then):
            raise PermanentError(f"the handler's return value is not JSON: {answer['unencodable']}")
        return None  # nobody reads it: dropped, as a thread type's return value would be
    return answer["ok"]


def _rebuilt(error: dict[str, Any]) -> BaseException:
    """A child's exception, as the parent raises it (runner.errors.ChildError)."""
    retry = error.get("retry")
    if retry is not None:
        at = retry["at"]
        return Retry(
            delay=None if at is not None else retry["delay"],
            at=datetime.fromtimestamp(at, tz=timezone.utc) if at is not None else None,
            count=retry["count"],
            message=retry["message"],
        )
    origin = _origin(error["module"], error["qualname"])
    if origin is None and error.get("permanent_error"):
        origin = PermanentError
    return ChildError(error["kind"], error["message"], error["traceback"], origin)


def _origin(module_name: str, qualname: str) -> type[BaseException] | None:
    """The exception class a child raised, if the parent can import it (as never_retry's
    names are resolved)."""
    try:
        return resolve_exception(f"{module_name}:{qualname}")
    except ConfigError:
        return None


class ProcessWorker(Worker):
    """Runs one process type's tasks in its children (module docstring)."""

    mode = "process"

    def _setup(self) -> None:
        (rt,) = self.types.values()  # one type per ProcessWorker: its own children
        self._slots = [Slot(rt, i) for i in range(rt.limit)]
        self._local = threading.local()

    def _start_threads(self) -> None:
        for slot in self._slots:
            thread = threading.Thread(
                target=self._slot_loop, args=(slot,), name=slot.name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _slot_loop(self, slot: Slot) -> None:
        self._local.slot = slot
        slot.open_now()  # started before the first task
        try:
            self._work_loop()
        finally:
            slot.close()

    def _run(self, guard: Guard, delivery: Delivery) -> Outcome:
        slot: Slot = self._local.slot
        outcome = self.attempts.run(guard, delivery, slot.call)
        if slot.child is None and not self.stopping:
            slot.open_now()  # its child died, was killed or replaced: the next one starts now
        return outcome

    def _force(self) -> None:
        """Past the grace period: the running tasks' children are killed (handed back)."""
        self.attempts.forcing = True
        for slot in self._slots:
            slot.forced = True
        for run in self.attempts.runs():
            run.expired = True
            run.cancelled.set()

    def stop(self, grace_s: float) -> int:
        forced = super().stop(grace_s)
        for slot in self._slots:
            slot.close()
        return forced

    def children(self) -> list[int]:
        """The pids of this worker's live children."""
        return [pid for slot in self._slots if (pid := slot.pid()) is not None]
