"""Filling a stage section's linking fields from the workflow's root and the earlier stages."""

from __future__ import annotations


def setdefault_dotted(d: dict, dotted: str, value) -> None:
    """`d[a][b][c] = value` for "a.b.c" unless set; a non-mapping on the way is left for validation to name."""
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            return
    d.setdefault(last, value)
