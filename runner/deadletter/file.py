"""FileDeadLetters: dead letters as JSON Lines in one file that outlives the process.

Appends are locked (fcntl) so several processes may share the file; ``dq-run dlq`` lists,
replays and purges it later.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import IO

from runner.brokers.base import DeadLetterFilter
from runner.codec import decode_dead_letter, encode_dead_letter
from runner.errors import BrokerUnavailable
from runner.model import DeadLetter

#: Mode of the files FileDeadLetters creates: dead letters hold payloads and error messages.
FILE_MODE = 0o600


class FileDeadLetters:
    """Dead letters in a JSON Lines file, one ``encode_dead_letter`` record per line.

    Each append is flushed and fsynced before ``add`` returns. ``take`` and ``purge`` rewrite the
    file through a temporary file and ``os.replace``, so a crash leaves either the old or the new
    file, never half of one. A torn last line (a crash mid-append) is ignored when reading and cut
    off before the next append; a malformed line anywhere else raises ValueError naming the line,
    because silently skipping it would lose a task.

    The file, its lock and its temporary files are created with ``file_mode`` (0600 unless the
    config's ``dead_letter.file_mode`` widens it; the umask may still narrow it).

    Several processes may share the file (a running ``dq-run`` appends while ``dq-run dlq replay``
    rewrites it): every operation holds an exclusive ``flock`` on ``<path>.lock`` and opens the
    file afresh, so an append never lands in a file that has just been replaced.
    """

    def __init__(
        self, path: str | Path, file_mode: int = FILE_MODE, read_only: bool = False
    ) -> None:
        """``read_only``: for an operator who only reads (``dq-run dlq list``, ``show``):
        nothing is created or written, so a directory they may only read will do; reads then
        share the lock (when its file is there) with other readers."""
        self.path = Path(path)
        self._mode = file_mode
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._read_only = read_only
        if read_only:
            return
        # At start: found at the first dead letter instead, its settle would fail.
        with self._unavailable("create it", "open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self._lock_path, "ab", opener=self._opener).close()

    def _opener(self, path: str, flags: int) -> int:
        return os.open(path, flags, self._mode)  # the mode applies only when this creates it

    def add(self, record: DeadLetter) -> None:
        self.add_many([record])

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        if not records:
            return
        data = b"".join(encode_dead_letter(r) + b"\n" for r in records)
        with self._locked(f"write {len(records)} record(s) to it", "dead"):
            self._cut_torn_tail()
            with open(self.path, "ab", opener=self._opener) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def records(self, where: DeadLetterFilter) -> list[DeadLetter]:
        with self._reading():
            return [r for r in self._read() if where.matches(r)]

    def take(self, ids: Collection[str]) -> list[DeadLetter]:
        wanted = frozenset(ids)
        with self._locked("take records from it", "replay"):
            records = self._read()
            taken = [r for r in records if r.id in wanted]
            if taken:
                self._rewrite([r for r in records if r.id not in wanted])
        return taken

    def purge(self, where: DeadLetterFilter) -> int:
        with self._locked("purge it", "purge"):
            records = self._read()
            kept = [r for r in records if not where.matches(r)]
            if len(kept) != len(records):
                self._rewrite(kept)
        return len(records) - len(kept)

    def count(self) -> int:
        with self._reading():
            return len(self._read())

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The file steady for a read: locked as for a write, or, read-only, under a shared
        lock opened for reading. With no lock file (no writer has opened the store: each makes
        it first), it is read unlocked, which is safe: a rewrite replaces the file in one step
        and a torn last line is skipped."""
        if not self._read_only:
            with self._locked("read it", "dead_letters"):
                yield
            return
        with self._unavailable("read it", "dead_letters"), self._lock:
            try:
                lock_file = open(self._lock_path, "rb")  # noqa: SIM115 (closed below)
            except FileNotFoundError:
                lock_file = None
            if lock_file is None:
                yield
                return
            with lock_file, _flocked(lock_file, fcntl.LOCK_SH):
                yield

    @contextlib.contextmanager
    def _locked(self, doing: str, operation: str) -> Iterator[None]:
        """The file to ourselves for ``doing`` (the broker method ``operation``)."""
        # The thread lock orders our own threads; flock (per open file), other processes.
        with (
            self._unavailable(doing, operation),
            self._lock,
            open(self._lock_path, "ab", opener=self._opener) as lock_file,
            _flocked(lock_file, fcntl.LOCK_EX),
        ):
            yield

    @contextlib.contextmanager
    def _unavailable(self, doing: str, operation: str) -> Iterator[None]:
        """A file system error while ``doing`` is BrokerUnavailable: a settle that writes a
        dead letter is tried again (runner.engine.settle), its task stays leased meanwhile,
        and `dq-run dlq` says why."""
        try:
            yield
        except OSError as exc:
            raise BrokerUnavailable(
                f"dead-letter file {self.path}: cannot {doing}: {exc}",
                backend="file",
                operation=operation,
            ) from exc

    def _read(self) -> list[DeadLetter]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        # Everything after the last newline is a torn line (an append that died): ignored.
        complete = raw.split(b"\n")[:-1]
        records = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                records.append(decode_dead_letter(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{self.path}:{number}: malformed dead-letter record: {exc}"
                ) from exc
        return records

    def _cut_torn_tail(self) -> None:
        """Truncate an unfinished last line so the next append starts on a line of its own."""
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                f.seek(0)
                keep = f.read().rfind(b"\n") + 1
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            return

    def _rewrite(self, records: list[DeadLetter]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb", opener=self._opener) as f:
            f.write(b"".join(encode_dead_letter(r) + b"\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # Make the rename itself durable.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _flocked(lock_file: IO[bytes], how: int) -> Iterator[None]:
    """``lock_file`` flocked ``how`` (LOCK_SH or LOCK_EX) while the block runs."""
    fcntl.flock(lock_file.fileno(), how)
    try:
        yield
    finally:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
