"""Benchmark rows rendered as a terminal table and as benchmarks/results.md."""

from __future__ import annotations

from dataclasses import dataclass

BASELINES = {
    "A": "A = concurrent.futures.ThreadPoolExecutor, same threads, same no-op callables",
    "B": "B = bare redis-py loop (XADD pipelined, XREADGROUP COUNT 10, XACK pipelined), same "
    "threads, same Redis",
}


@dataclass(frozen=True)
class Row:
    broker: str
    case: str
    value: float
    unit: str
    baseline: str = ""  # "A", "B", or what the ratio is against
    baseline_value: float | None = None
    target: str = ""
    passed: bool | None = None

    @property
    def ratio(self) -> str:
        if self.baseline_value in (None, 0):
            return ""
        return f"{self.value / self.baseline_value:.2f}x"

    def cells(self) -> list[str]:
        base = (
            "" if self.baseline_value is None else f"{self.baseline}: {_num(self.baseline_value)}"
        )
        verdict = "" if self.passed is None else ("PASS" if self.passed else "FAIL")
        target = f"{self.target} {verdict}".strip()
        return [self.broker, self.case, f"{_num(self.value)} {self.unit}", base, self.ratio, target]


HEADER = ["broker", "case", "median", "baseline (same run)", "ratio", "target"]


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def render_table(rows: list[Row]) -> str:
    table = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    passed = sum(r.passed is True for r in rows)
    failed = sum(r.passed is False for r in rows)
    lines.append(f"targets: {passed} PASS, {failed} FAIL")
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(rows: list[Row], context: dict[str, str], notes: list[str]) -> str:
    lines = ["# Benchmark results", "", "Written by `make bench` (benchmarks/run.py).", ""]
    lines += [markdown_table(rows), ""]
    lines += [f"- {text}" for text in BASELINES.values()]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
