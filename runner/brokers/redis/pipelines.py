"""The PipelineAdmin half of RedisBroker: ``tasks_of`` and ``cancel`` (the hand-offs themselves
are SETTLE's effects, settle.lua). Mixed into RedisBroker, whose client and call plumbing it uses
(declared below); the data model is in runner/brokers/redis/scripts.py.

Both read every queued task of every type (QUEUED, one script call per type, so a type's stream,
pending entries and delayed set are read at one instant) and decode them here: an operator
command, as ``oldest_enqueued_at``. A task that cannot be decoded is not listed (its root is
unknown; it reaches the dead letters at hand-out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from runner.brokers.base import Queued, cancelled_record, of_root
from runner.brokers.redis.scripts import GROUP, RELEASED
from runner.codec import decode_task, encode_dead_letter
from runner.model import Task

T = TypeVar("T")

#: Where a queued task is: its type, and its entry id in the stream or its delayed-set member.
_Place = tuple[str, Literal["entry", "member"], bytes]


class RedisPipelines:
    """PipelineAdmin on the Redis data model; RedisBroker provides what is declared here."""

    _client: Any
    _scripts: dict[str, Any]

    def _key(self, *parts: str) -> str:
        raise NotImplementedError

    def _stream(self, type_: str) -> str:
        raise NotImplementedError

    def _delayed(self, type_: str) -> str:
        raise NotImplementedError

    def _call(self, fn: Callable[[], T], operation: str) -> T:
        raise NotImplementedError

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def tasks_of(self, root_id: str) -> list[Queued]:
        """The queued tasks of ``root_id``, type by type (its stream's entries, then its
        delayed ones), each with the attempts it has had so far (the current one, for a
        leased task)."""
        return [queued for queued, _ in self._of_root(root_id, "tasks_of")]

    def cancel(self, root_id: str, message: str) -> list[str]:
        """CANCEL (cancel.lua) of the ready and delayed tasks of ``root_id``: each is
        dead-lettered only if it is still where it was read and not leased. One that moved
        meanwhile (a delayed task fallen due, a released one) is read again and cancelled by
        the next pass; passes end when one cancels all it tried, or finds none waiting."""
        cancelled: list[str] = []
        while True:
            waiting = [
                (queued.task, place)
                for queued, place in self._of_root(root_id, "cancel")
                if queued.state != "leased"
            ]
            if not waiting:
                return cancelled
            done = self._cancel(waiting, message)
            cancelled += done
            if len(done) == len(waiting):
                return cancelled

    def _cancel(self, waiting: list[tuple[Task, _Place]], message: str) -> list[str]:
        """One CANCEL call for ``waiting``; answers the ids it dead-lettered."""
        now = self.now()
        types = list(dict.fromkeys(type_ for _, (type_, _, _) in waiting))
        index = {name: i + 1 for i, name in enumerate(types)}
        keys = [self._key(k) for k in ("count", "dlq", "dlq:idx", "held")]
        for name in types:
            keys += [self._stream(name), self._delayed(name)]
        args: list[Any] = [GROUP]
        for task, (type_, kind, where) in waiting:
            entry, member = (where, b"") if kind == "entry" else (b"", where)
            record = encode_dead_letter(cancelled_record(task, message, now))
            args += [index[type_], entry, member, task.id, record, repr(now)]
        answers = self._run("CANCEL", keys, args)
        return [task.id for (task, _), ok in zip(waiting, answers, strict=True) if int(ok)]

    def _of_root(self, root_id: str, operation: str) -> list[tuple[Queued, _Place]]:
        """The queued tasks of ``root_id``, each with where it is."""
        names = self._call(lambda: self._client.smembers(self._key("types")), operation)
        found: list[tuple[Queued, _Place]] = []
        for name in sorted(raw.decode() for raw in names):
            for queued, place in self._queued(name, operation):
                if of_root(queued.task, root_id):
                    found.append((queued, place))
        return found

    def _queued(self, type_: str, operation: str) -> list[tuple[Queued, _Place]]:
        """Every decodable queued task of ``type_`` (QUEUED, queued.lua), with where it is."""
        script = self._scripts["QUEUED"]
        keys = [self._stream(type_), self._delayed(type_)]
        entries, pending, members = self._call(lambda: script(keys=keys, args=[GROUP]), operation)
        # Entry id -> (consumer, delivery count) of each pending entry; one that is not
        # pending is ready, with no hand-out since it was put, as one pending for RELEASED.
        handed = {p[0]: (p[1].decode(), int(p[3])) for p in pending}
        out: list[tuple[Queued, _Place]] = []
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            consumer, count = handed.get(entry_id, (RELEASED, 0))
            state: Literal["ready", "leased"] = "ready" if consumer == RELEASED else "leased"
            task = _decoded(fields.get(b"t", b""), int(fields.get(b"a", 0)) + count)
            if task is not None:
                out.append((Queued(task, state), (type_, "entry", entry_id)))
        for member in members:
            _, attempts, envelope = member.split(b" ", 2)
            task = _decoded(envelope, int(attempts))
            if task is not None:
                out.append((Queued(task, "delayed"), (type_, "member", member)))
        return out


def _decoded(envelope: bytes, attempt: int) -> Task | None:
    try:
        return decode_task(envelope, attempt)
    except ValueError:
        return None
