"""A laid-out table, the unit the report's builders fill and its writers (Markdown, CSV, figures) read."""

from __future__ import annotations

from dataclasses import dataclass, field

from opd_exp.report.runs import Run
from opd_exp.report.stats import Stat


@dataclass
class Table:
    """A laid-out table: rows x columns of Stat, plus where each row came from."""

    name: str
    title: str
    metric: str
    columns: list[str]
    cells: dict[str, dict[str, Stat]] = field(default_factory=dict)  # row label -> column -> Stat
    row_runs: dict[str, list[Run]] = field(default_factory=dict)  # row label -> student_after runs (curves)
    notes: list[str] = field(default_factory=list)
    x_key: str | None = None
    marks: set = field(default_factory=set)  # (row, column) cells marked * (a pivot's best column)
