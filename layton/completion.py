"""The one completion record: what a finished piece of work writes last, with its settings' fingerprint.

Every unit of work that a rerun may skip records its end the same way: a synthesis shard, the
synthesis run, the dedup and precompute passes, a training stage's export, an evaluation's results,
a generation run, the tiny zoo. The record is a JSON file (by default `_complete.json`) written
whole and last (`Root.write`: a temp name and a rename locally, an object that appears only when
its upload is done on an object store), so a reader that finds it finds everything before it.

`fingerprint(config)` is the one settings hash: the config's fields without the `Runtime` ones
(`layton.config`), hashed as sorted JSON. Work is complete for a config when its record exists and
carries that config's fingerprint; other settings mean the work is redone (or refused), not reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pydantic import BaseModel

from layton.config import RUNTIME
from layton.storage import Root

RECORD = "_complete.json"


def settings_of(value):
    """A config as JSON-able data, without its `Runtime` fields (recursively)."""
    if isinstance(value, BaseModel):
        return {name: settings_of(getattr(value, name)) for name, info in type(value).model_fields.items()
                if RUNTIME not in info.metadata}
    if isinstance(value, (list, tuple)):
        return [settings_of(v) for v in value]
    if isinstance(value, dict):
        return {str(k): settings_of(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def fingerprint(settings) -> str:
    """16 hex digits of sha256 over the settings (a config or JSON-able data)."""
    blob = json.dumps(settings_of(settings), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _root(where: Root | str | Path) -> Root:
    return where if isinstance(where, Root) else Root(where)


def mark_complete(where: Root | str | Path, fingerprint: str, name: str = RECORD, **body) -> dict:
    """Write the record (last, whole). `body` is what readers want without redoing the work."""
    record = {**body, "fingerprint": fingerprint, "completed_at": round(time.time(), 3)}
    _root(where).write(name, json.dumps(record, indent=1, default=str).encode())
    return record


def read_complete(where: Root | str | Path, name: str = RECORD) -> dict | None:
    """The record, or None when there is none (or it cannot be parsed: a torn copy is no record)."""
    try:
        blob = _root(where).read(name)
        record = json.loads(blob) if blob else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def is_complete(where: Root | str | Path, fingerprint: str, name: str = RECORD) -> dict | None:
    """The record when the work is complete for these settings, else None."""
    record = read_complete(where, name)
    return record if record is not None and record["fingerprint"] == fingerprint else None
