"""The one way the project derives seeds: a hash of named parts, so a seed depends only on what
identifies the work (a prompt id, a sample index, a training step and rank), never on the order
or the machine it runs on."""

from __future__ import annotations

import hashlib


def digest(*parts: object) -> bytes:
    """sha256 of the parts' text, separated by a unit separator (so ("a", "bc") != ("ab", "c"))."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def derive_seed(*parts: object) -> int:
    """A 31-bit seed (what every RNG the project uses accepts) from the parts."""
    return int.from_bytes(digest(*parts)[:4], "little") & 0x7FFFFFFF
