"""Tables that fit a terminal: which columns to keep and how wide each may be.

Pure functions shared by the Rich tables (the run summary) and the plain-text ones (``dq-run dlq
list``, ``stats``). A column may be *flexible* (its cells are cut with an ellipsis, down to its
``min_width``) and has a *rank*: 0 is never dropped, higher ranks drop first. To fit, columns
are dropped (highest rank first) until the table fits with every flexible column at its minimum;
then flexible columns shrink, widest first, only as far as needed. A table that still cannot fit
(a very narrow terminal) keeps its rank-0 columns at their minimum and is cut by the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.cells import cell_len, set_cell_size

ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "left"
    rank: int = 0  # 0: always shown; higher ranks are dropped first when space runs out
    flexible: bool = False  # cells may be cut (with an ellipsis) down to min_width
    min_width: int = 0


def elide(text: str, width: int) -> str:
    """``text`` in at most ``width`` terminal cells, ending in an ellipsis when cut."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return set_cell_size(text, width - 1).rstrip() + ELLIPSIS


def fit_columns(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    width: int,
    *,
    gap: int,
    edges: int = 0,
) -> list[tuple[int, int]]:
    """The columns to show, as ``(index, width)`` in their order, so that the table fits
    ``width`` cells: each column's cells plus ``gap`` between columns and ``edges`` in all
    (a boxed Rich table: gap 3, edges 4; plain text joined by two spaces: gap 2, edges 0)."""
    natural = [
        max([cell_len(c.header), *(cell_len(row[i]) for row in rows)])
        for i, c in enumerate(columns)
    ]

    def least(i: int) -> int:
        c = columns[i]
        return min(natural[i], max(c.min_width, 1)) if c.flexible else natural[i]

    def span(kept: list[int], widths: dict[int, int]) -> int:
        return sum(widths[i] for i in kept) + gap * max(len(kept) - 1, 0) + edges

    kept = list(range(len(columns)))
    minimum = {i: least(i) for i in kept}
    while span(kept, minimum) > width:
        droppable = [i for i in kept if columns[i].rank > 0]
        if not droppable:
            break
        kept.remove(max(droppable, key=lambda i: (columns[i].rank, i)))

    widths = {i: natural[i] for i in kept}
    excess = span(kept, widths) - width
    while excess > 0:
        shrinkable = [i for i in kept if columns[i].flexible and widths[i] > minimum[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        others = [widths[i] for i in shrinkable if i != widest]
        # Down to the next widest (or the minimum), so the widest columns shrink together.
        floor = max([minimum[widest], *others, widths[widest] - excess])
        step = max(widths[widest] - floor, 1)
        widths[widest] -= step
        excess -= step
    return [(i, widths[i]) for i in kept]


def fitted_rows(fit: Sequence[tuple[int, int]], rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """``rows`` cut down to the kept columns, each cell elided to its column's width."""
    return [[elide(row[i], w) for i, w in fit] for row in rows]


def plain_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> str:
    """A plain-text table (columns two spaces apart, no trailing spaces) that fits ``width``
    (None: no limit)."""
    if width is None:
        fit = [(i, 0) for i in range(len(columns))]
        cells = [[row[i] for i in range(len(columns))] for row in rows]
        headers = [c.header for c in columns]
    else:
        fit = fit_columns(columns, rows, width, gap=2)
        cells = fitted_rows(fit, rows)
        headers = [elide(columns[i].header, w) for i, w in fit]
    sizes = [max([cell_len(h), *(cell_len(r[k]) for r in cells)]) for k, h in enumerate(headers)]
    lines = []
    for line in (headers, *cells):
        out = []
        for k, cell in enumerate(line):
            pad = " " * (sizes[k] - cell_len(cell))
            right = columns[fit[k][0]].justify == "right"
            out.append(pad + cell if right else cell + pad)
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)
