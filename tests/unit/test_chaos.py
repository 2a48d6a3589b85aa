"""benchmarks/chaos_ledger.py: the chaos audit and its verdicts, on made-up ledgers.

The scenarios themselves run real processes (`make chaos`), not here; this checks that the
judging code fails what it must: loss, double completion, double runs where single runs are
promised, slow recovery, RSS growth, healthy tasks dead-lettered.
"""

from __future__ import annotations

from benchmarks.chaos_ledger import (
    Fault,
    Ledger,
    Outcome,
    Promise,
    Row,
    judge,
    markdown_table,
    recovery_s,
    render_table,
    rss_growth,
)
from tests.integration.audit_handlers import Run

T0 = 1_000.0
VT = 2.0


def run(
    task_id: str, start: float, end: float | None = None, *, pid: int = 1, attempt: int = 1
) -> Run:
    return Run(task_id, attempt, pid, T0 + start, None if end is None else T0 + end)


def clean(ids: list[str]) -> Ledger:
    """Every task ran once, returned, and was acked once."""
    return Ledger(
        published=ids,
        runs=[run(i, n * 0.1, n * 0.1 + 0.05) for n, i in enumerate(ids)],
        outcomes=[Outcome(i, T0 + n * 0.1 + 0.06) for n, i in enumerate(ids)],
    )


def test_a_clean_ledger_passes() -> None:
    verdict = judge(clean(["a", "b", "c"]), Promise(VT, single_runs=True, max_rss_growth=0.1))
    assert verdict.passed, verdict.failures
    assert (verdict.tasks, verdict.lost, verdict.ran_twice, verdict.completed_twice) == (3, 0, 0, 0)
    assert verdict.recovery_s is None


def test_a_task_never_acked_never_returned_nor_dead_is_lost() -> None:
    ledger = clean(["a", "b"])
    ledger.published.append("c")
    ledger.runs.append(run("c", 1.0))  # started, never returned, never acked
    verdict = judge(ledger, Promise(VT))
    assert verdict.lost == 1
    assert not verdict.passed
    assert any("lost 1" in f for f in verdict.failures)


def test_a_task_acked_or_returned_or_dead_is_not_lost() -> None:
    ledger = clean(["a"])
    ledger.published += ["acked", "returned", "dead"]
    ledger.outcomes.append(Outcome("acked", T0 + 1))  # its ledger line cut by a kill
    ledger.runs.append(run("returned", 1.0, 1.1))  # its ack lost with a Redis restart
    ledger.dead.add("dead")
    ledger.faulty.add("dead")
    verdict = judge(ledger, Promise(VT))
    assert verdict.lost == 0
    assert verdict.passed, verdict.failures


def test_loss_where_the_broker_may_lose_is_counted_not_failed() -> None:
    ledger = clean(["a"])
    ledger.published.append("gone")
    verdict = judge(ledger, Promise(VT, no_loss=False))
    assert verdict.lost == 1
    assert verdict.passed, verdict.failures
    assert any("expected" in n for n in verdict.notes)


def test_a_task_acked_twice_fails_even_where_runs_may_repeat() -> None:
    ledger = clean(["a", "b"])
    ledger.outcomes.append(Outcome("a", T0 + 5))
    verdict = judge(ledger, Promise(VT))
    assert verdict.completed_twice == 1
    assert not verdict.passed


def test_an_ack_and_a_dead_letter_of_one_task_are_completed_twice() -> None:
    ledger = clean(["a"])
    ledger.outcomes.append(Outcome("a", T0 + 5, "task.dead"))
    assert judge(ledger, Promise(VT)).completed_twice == 1


def test_ran_twice_fails_only_where_single_runs_are_promised() -> None:
    ledger = clean(["a", "b"])
    ledger.runs.append(run("a", 3.0, 3.1, pid=2, attempt=2))
    at_least_once = judge(ledger, Promise(VT))
    assert at_least_once.ran_twice == 1
    assert at_least_once.passed, at_least_once.failures
    single = judge(ledger, Promise(VT, single_runs=True))
    assert not single.passed
    assert "1 ran twice" in single.failures


def test_retries_of_tasks_failing_on_purpose_are_not_runs_twice() -> None:
    ledger = clean(["a"])
    ledger.published.append("bad")
    ledger.runs += [run("bad", 1.0), run("bad", 1.2, attempt=2)]
    ledger.dead.add("bad")
    ledger.faulty.add("bad")
    verdict = judge(ledger, Promise(VT, single_runs=True))
    assert verdict.ran_twice == 0
    assert verdict.passed, verdict.failures


def test_a_healthy_task_in_the_dlq_fails() -> None:
    ledger = clean(["a", "b"])
    ledger.dead.add("b")
    verdict = judge(ledger, Promise(VT))
    assert verdict.healthy_dead == 1
    assert not verdict.passed


def test_recovery_is_from_the_fault_to_the_hit_tasks_next_run() -> None:
    ledger = clean(["a"])
    ledger.published += ["held", "prefetched"]
    ledger.runs += [
        run("held", 0.5, pid=7),  # in flight in pid 7 when it was killed at 1.0
        run("held", 3.5, 3.6, pid=8, attempt=2),
        run("prefetched", 3.9, 4.0, pid=8, attempt=2),  # handed to pid 7, never started
        run("elsewhere", 0.5, pid=9),  # in flight in another process: not hit
    ]
    ledger.outcomes += [Outcome("held", T0 + 3.6), Outcome("prefetched", T0 + 4.0)]
    ledger.faults.append(Fault(T0 + 1.0, pid=7))
    assert abs((recovery_s(ledger) or 0) - 2.9) < 1e-9  # the prefetched one, the later
    verdict = judge(ledger, Promise(VT))  # bound 1.5 x 2 + 1 = 4 s
    assert verdict.passed, verdict.failures


def test_recovery_over_one_and_a_half_visibility_timeouts_plus_one_second_fails() -> None:
    ledger = clean(["a"])
    ledger.published.append("held")
    ledger.runs += [run("held", 0.5, pid=7), run("held", 5.2, 5.3, pid=8, attempt=2)]
    ledger.faults.append(Fault(T0 + 1.0, pid=7))
    verdict = judge(ledger, Promise(VT))
    assert verdict.recovery_bound_s == 4.0
    assert abs((verdict.recovery_s or 0) - 4.2) < 1e-9
    assert not verdict.passed
    assert any("recovery" in f for f in verdict.failures)


def test_recovery_after_a_broker_restart_counts_from_its_return_and_sees_late_acks() -> None:
    ledger = clean(["a"])
    ledger.published.append("in flight")
    ledger.runs.append(run("in flight", 0.5, 1.5, pid=3))  # finished while Redis was down
    ledger.outcomes.append(Outcome("in flight", T0 + 3.0))  # acked once it was back
    ledger.faults.append(Fault(T0 + 1.0, pid=None, since=T0 + 2.0))
    assert abs((recovery_s(ledger) or 0) - 1.0) < 1e-9


def test_a_hit_task_that_never_comes_back_is_lost_not_recovered() -> None:
    ledger = clean(["a"])
    ledger.published.append("held")
    ledger.runs.append(run("held", 0.5, pid=7))
    ledger.faults.append(Fault(T0 + 1.0, pid=7))
    verdict = judge(ledger, Promise(VT))
    assert verdict.recovery_s is None
    assert verdict.lost == 1
    assert not verdict.passed


def test_a_fault_that_hit_no_task_fails_the_row() -> None:
    ledger = clean(["a", "b"])
    ledger.faults.append(Fault(T0 + 5.0, pid=1))  # after every run ended
    verdict = judge(ledger, Promise(VT))
    assert not verdict.passed
    assert any("hit no task" in f for f in verdict.failures)


def test_a_run_that_began_at_the_fault_instant_was_hit() -> None:
    ledger = clean(["a"])
    ledger.published.append("exit")
    ledger.faulty.add("exit")
    # The run that called os._exit dates the death; nothing else was in flight there.
    ledger.runs += [run("exit", 1.0, pid=7), run("exit", 3.5, pid=8, attempt=2)]
    ledger.dead.add("exit")
    ledger.faults.append(Fault(T0 + 1.0, pid=7))
    verdict = judge(ledger, Promise(VT))
    assert abs((verdict.recovery_s or 0) - 2.5) < 1e-9
    assert verdict.passed, verdict.failures


def test_rss_growth_over_the_limit_fails() -> None:
    assert rss_growth([(100_000, 105_000), (100_000, 112_000)]) == 0.12
    assert rss_growth([]) is None
    ledger = clean(["a"])
    ledger.rss_kb = {1: (100_000, 109_000)}
    assert judge(ledger, Promise(VT, max_rss_growth=0.10)).passed
    ledger.rss_kb = {1: (100_000, 109_000), 2: (100_000, 111_000)}
    verdict = judge(ledger, Promise(VT, max_rss_growth=0.10))
    assert not verdict.passed
    assert any("RSS grew 11.0%" in f for f in verdict.failures)
    assert judge(ledger, Promise(VT)).passed  # RSS not judged without a limit


def test_outcomes_missing_from_the_logs_fail_rather_than_hide_double_acks() -> None:
    ledger = clean(["a", "b", "c"])
    ledger.outcomes.clear()
    verdict = judge(ledger, Promise(VT))
    assert not verdict.passed
    assert any("no accepted outcome logged" in f for f in verdict.failures)


def test_problems_the_scenario_reported_fail_the_row() -> None:
    ledger = clean(["a"])
    ledger.problems.append("worker-0 did not exit")
    verdict = judge(ledger, Promise(VT))
    assert verdict.failures == ("worker-0 did not exit",)


def test_the_tables_show_every_figure_and_the_reason_of_a_failure() -> None:
    ledger = clean(["a"])
    ledger.published.append("gone")
    rows = [
        Row("SIGKILL", "sqlite", judge(clean(["a"]), Promise(VT))),
        Row("SIGKILL", "redis", judge(ledger, Promise(VT))),
    ]
    text = render_table(rows)
    assert "scenarios: 1 PASS, 1 FAIL" in text
    assert "FAIL: lost 1 (the broker promises none)" in text
    md = markdown_table(rows)
    assert md.splitlines()[0].startswith("| scenario | broker | tasks | lost | ran twice |")
    assert len(md.splitlines()) == 4
