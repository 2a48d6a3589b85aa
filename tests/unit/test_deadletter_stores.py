"""Dead-letter stores: the memory list and the JSON Lines file (real temp files)."""

from __future__ import annotations

import fcntl
import inspect
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.app import build_runtime
from runner.backends import create_dead_letter_store
from runner.brokers.base import DeadLetterFilter
from runner.codec import encode_dead_letter
from runner.config.models import PipelineConfig
from runner.deadletter.file import FileDeadLetters
from runner.deadletter.memory import MemoryDeadLetters
from runner.deadletter.store import DeadLetterStore
from runner.errors import BrokerUnavailable, ConfigError
from runner.model import AttemptRecord, DeadLetter, Task

ANY = DeadLetterFilter()


def record(
    type_: str = "a", error: str = "KeyError", dead_at: float = 100.0, n: int = 0
) -> DeadLetter:
    failure = AttemptRecord(1, error, f"failed {n}", "Traceback ...", dead_at - 1, 0.5, "host:1")
    return DeadLetter(
        task=Task(type=type_, payload={"n": n, "text": "héllo"}, attempt=1, history=(failure,)),
        reason="error",
        error_type=error,
        message=f"failed {n}",
        traceback="Traceback ...",
        attempts=1,
        first_attempt_at=dead_at - 1,
        last_attempt_at=dead_at - 1,
        dead_at=dead_at,
    )


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DeadLetterStore:
    if request.param == "memory":
        return MemoryDeadLetters()
    return FileDeadLetters(tmp_path / "dlq" / "dead.jsonl")


def test_both_stores_satisfy_the_protocol(store: DeadLetterStore) -> None:
    # isinstance() on a runtime-checkable Protocol checks method names only: compare each
    # method's signature too (parameter names, kinds, defaults, annotations and return type).
    assert isinstance(store, DeadLetterStore)
    methods = vars(DeadLetterStore).items()
    members = [n for n, v in methods if inspect.isfunction(v) and not n.startswith("_")]
    assert {"add", "add_many", "records", "take", "purge", "count"} <= set(members)
    for name in members:
        wanted = inspect.signature(getattr(DeadLetterStore, name))
        wanted = wanted.replace(parameters=list(wanted.parameters.values())[1:])  # drop self
        assert inspect.signature(getattr(store, name)) == wanted, name


def test_records_come_back_in_order_and_filtered(store: DeadLetterStore) -> None:
    a = record("a", "KeyError", 100, 0)
    b = record("b", "OSError", 200, 1)
    c = record("b", "KeyError", 300, 2)
    store.add(a)
    store.add_many([b, c])
    assert store.records(ANY) == [a, b, c]
    assert store.records(DeadLetterFilter(type="b")) == [b, c]
    assert store.records(DeadLetterFilter(error="KeyError")) == [a, c]
    assert store.records(DeadLetterFilter(since=200)) == [b, c]
    assert store.records(DeadLetterFilter(ids=frozenset({a.id, c.id}))) == [a, c]
    assert store.count() == 3


def test_take_removes_and_returns_only_the_given_ids(store: DeadLetterStore) -> None:
    records = [record(n=i) for i in range(4)]
    store.add_many(records)
    taken = store.take([records[1].id, records[3].id, "missing"])
    assert taken == [records[1], records[3]]
    assert store.records(ANY) == [records[0], records[2]]
    assert store.take(["missing"]) == []
    assert store.count() == 2


def test_purge_counts_what_it_deleted(store: DeadLetterStore) -> None:
    store.add_many([record("a"), record("b"), record("b")])
    assert store.purge(DeadLetterFilter(type="b")) == 2
    assert store.purge(DeadLetterFilter(type="b")) == 0
    assert [r.task.type for r in store.records(ANY)] == ["a"]


def test_concurrent_adds_are_all_kept(store: DeadLetterStore) -> None:
    def add_some(base: int) -> None:
        for i in range(20):
            store.add(record(n=base + i))

    threads = [threading.Thread(target=add_some, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.task.payload["n"] for r in store.records(ANY)) == sorted(
        k * 100 + i for k in range(4) for i in range(20)
    )


def test_file_store_survives_the_process(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    kept = [record(n=1), record(n=2)]
    FileDeadLetters(path).add_many(kept)
    assert FileDeadLetters(path).records(ANY) == kept  # a new process would do exactly this


def test_file_store_writes_one_encoded_record_per_line(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    r = record()
    FileDeadLetters(path).add(r)
    assert path.read_bytes() == encode_dead_letter(r) + b"\n"


def test_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    whole = record(n=1)
    path.write_bytes(encode_dead_letter(whole) + b"\n" + encode_dead_letter(record(n=2))[:25])
    store = FileDeadLetters(path)
    assert store.records(ANY) == [whole]
    later = record(n=3)
    store.add(later)
    assert store.records(ANY) == [whole, later]
    assert path.read_bytes().endswith(b"\n")


def test_a_malformed_middle_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    path.write_bytes(
        encode_dead_letter(record()) + b"\n{not json\n" + encode_dead_letter(record()) + b"\n"
    )
    with pytest.raises(ValueError, match=r"dead\.jsonl:2"):
        FileDeadLetters(path).records(ANY)


def test_rewrites_replace_the_file_and_leave_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    store = FileDeadLetters(path)
    records = [record(n=i) for i in range(3)]
    store.add_many(records)
    inode = path.stat().st_ino
    assert store.take([records[0].id]) == [records[0]]
    assert path.stat().st_ino != inode  # replaced, not edited in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead.jsonl", "dead.jsonl.lock"]
    assert store.records(ANY) == records[1:]


def test_two_handles_on_one_file_see_each_others_changes(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    runner_side, operator_side = FileDeadLetters(path), FileDeadLetters(path)
    a, b = record(n=1), record(n=2)
    runner_side.add(a)
    assert operator_side.take([a.id]) == [a]
    runner_side.add(b)  # lands in the replaced file, not the unlinked one
    assert operator_side.records(ANY) == [b]


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_a_file_that_cannot_be_created_is_an_error_at_once(tmp_path: Path, where: str) -> None:
    """Found when the store is made (the runner's start), as BrokerUnavailable (`dq-run`'s exit
    code 3, no traceback), not at the first dead letter, whose settle would then fail and, on
    the memory broker, lose the queue that a shutdown dead-letters."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "dead.jsonl" if where == "under a file" else Path("/proc/dq.jsonl")
    with pytest.raises(BrokerUnavailable, match=f"dead-letter file {path}: cannot create it: "):
        FileDeadLetters(path)


def test_a_file_that_cannot_be_written_any_more_is_broker_unavailable(tmp_path: Path) -> None:
    """The file system failing later (here the file's place taken by a directory) is
    BrokerUnavailable naming the file and what failed, which the settle of a dead letter tries
    again (the task stays leased meanwhile), not an OSError the engine does not expect."""
    path = tmp_path / "dead.jsonl"
    store = FileDeadLetters(path)
    path.mkdir()
    with pytest.raises(BrokerUnavailable, match=r"cannot write 1 record\(s\) to it: ") as caught:
        store.add(record(n=1))
    assert caught.value.operation == "dead"
    with pytest.raises(BrokerUnavailable, match=r"dead-letter file .*: cannot read it: "):
        store.records(ANY)


def test_a_read_only_store_creates_nothing_and_reads_under_a_shared_lock(
    tmp_path: Path,
) -> None:
    """For `dq-run dlq list` where the operator may only read: nothing is created (checked as
    such: root may write anywhere), and a read waits for a writer's lock, beside other
    readers."""
    path = tmp_path / "var" / "dead.jsonl"
    reader = FileDeadLetters(path, read_only=True)
    assert reader.records(ANY) == [] and reader.count() == 0
    assert not path.parent.exists()
    FileDeadLetters(path).add(record(n=1))
    lock = path.with_name("dead.jsonl.lock")
    with open(lock, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a writer's, mid-rewrite
        read: list[int] = []
        thread = threading.Thread(target=lambda: read.append(reader.count()))
        thread.start()
        thread.join(0.3)
        assert read == []  # waits for the writer
        fcntl.flock(held.fileno(), fcntl.LOCK_SH)  # now a reader's: shared
        thread.join(5)
        assert read == [1]
    lock.unlink()
    assert reader.count() == 1
    assert not lock.exists()


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    store = FileDeadLetters(tmp_path / "nothing-yet.jsonl")
    assert store.records(ANY) == []
    assert store.count() == 0
    assert store.take(["x"]) == []
    assert store.purge(ANY) == 0


def _config(**dead_letter: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"task_types": {"a": {"handler": "mod:fn"}}, "dead_letter": dead_letter}
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, MemoryDeadLetters),
        ({"kind": "memory"}, MemoryDeadLetters),
        ({"kind": "file", "path": "PATH"}, FileDeadLetters),
    ],
)
def test_create_dead_letter_store(
    tmp_path: Path, settings: dict[str, str], expected: Callable[..., object]
) -> None:
    if "path" in settings:
        settings = {**settings, "path": str(tmp_path / "d.jsonl")}
    assert type(create_dead_letter_store(_config(**settings))) is expected


def test_create_dead_letter_store_for_kind_broker_is_none() -> None:
    assert create_dead_letter_store(_config(kind="broker")) is None


def test_a_file_store_needs_a_path() -> None:
    try:
        config = _config(kind="file")
    except Exception:  # the config layer may already reject it, which is just as good
        return
    with pytest.raises(ConfigError, match=r"dead_letter\.path"):
        create_dead_letter_store(config)


def test_a_shutdown_that_cannot_dead_letter_the_queue_says_the_tasks_are_lost(
    tmp_path: Path,
) -> None:
    """The memory broker's stop dead-letters what is still queued; when the file cannot take
    them, the stop still ends (its observers closed) and then raises BrokerUnavailable saying
    those tasks are lost with the process, as `dq-run` prints it (exit code 3)."""
    path = tmp_path / "dead.jsonl"
    config = PipelineConfig.model_validate(
        {
            "task_types": {"a": {"handler": "handlers.demo:send_email"}},
            "dead_letter": {"kind": "file", "path": str(path)},
        }
    )
    runner = build_runtime(config, observe=False)
    closed: list[bool] = []
    runner._closers.append(lambda: closed.append(True))
    runner.publish_many([("a", {"to": "x"})] * 3)
    path.mkdir()  # the file's place taken
    with pytest.raises(
        BrokerUnavailable, match=r"cannot write 3 record\(s\).*those tasks are lost"
    ):
        runner.stop()
    assert closed == [True]
