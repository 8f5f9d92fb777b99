"""Result tables: one type that evaluations write and the report reads back (no markdown parsing).

A table is stored in `results.json` as data (`to_dict`) and rendered from it as markdown
(`results.md`, the CLI) or HTML (the report).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field


def cell(value, digits: int) -> str:
    """A number with `digits` decimals; "–" where there is none."""
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        if not isinstance(d, dict) or not isinstance(d.get("columns"), list) or not isinstance(d.get("rows"), list):
            raise ValueError("not a table (expected 'columns' and 'rows' lists)")
        return cls([str(c) for c in d["columns"]], [[str(c) for c in r] for r in d["rows"]], str(d.get("title", "")),
                   [str(n) for n in d.get("notes", [])])

    def to_markdown(self) -> str:
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        out = ([self.title, ""] if self.title else []) + [line(self.columns), "|" + "---|" * len(self.columns)]
        out += [line(r) for r in self.rows] + ([""] + self.notes if self.notes else [])
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        return ((f"<p>{esc(self.title)}</p>" if self.title else "") + f"<table><tr>{head}</tr>{body}</table>"
                + "".join(f"<p>{esc(n)}</p>" for n in self.notes))
