"""The Stage contract: what every stage of a workflow is, in one small class.

A stage has a name, a config class, the defaults it takes from the workflow's root and the earlier
stages, the inputs it reads and the outputs it writes (so a workflow's links are checked before
anything runs), `check()` (every file it will read, before Ray starts), `run()` (the work, on the
current Ray) and `is_complete()`. `execute()` ties them together: it skips complete work, runs the
rest and writes the one completion record (`layton.completion`) last, into `record_dir()`, with the
stage's settings fingerprint. The workflow runner, `layton workflow validate`, the per-stage CLI
commands and the report all go through the registry (`stages/registry.py`) and this contract.

A stage module imports its job code (torch, Ray, the models) inside `check()` and `run()`: that is
the one stated exception to imports at module top, so that the registry, `layton --help` and
`layton workflow validate` load no torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from layton.completion import fingerprint, is_complete, mark_complete
from layton.config import Section


@dataclass
class StageResult:
    stage: str
    skipped: bool  # complete already for these settings: nothing ran
    summary: dict = field(default_factory=dict)  # flat name -> number/string: workflow state, report, CLI
    outputs: dict[str, str] = field(default_factory=dict)  # what it wrote, by name
    lines: list[str] = field(default_factory=list)  # what the CLI prints about it
    seconds: float = 0.0


class Stage:
    name: ClassVar[str]  # as listed in workflow state and the report
    section: ClassVar[str]  # its section in a workflow file (two stages may share one)
    config: ClassVar[type[Section]]
    command: ClassVar[tuple[str, ...]]  # its CLI command (`layton train tokenizer CONFIG`); stages may share one
    help: ClassVar[str]  # the command's one-line help

    def __init__(self, on_event: Callable[[str], None] | None = None):
        self.on_event = on_event or (lambda line: None)  # progress lines (the CLI prints them)

    def defaults(self, root: str, earlier: dict[str, Section]) -> dict[str, object]:
        """Dotted field -> value for the fields that link this stage to the workflow's root and to
        the configs of the sections before it (set only where the file leaves them out)."""
        return {}

    def inputs(self, cfg) -> list[tuple[str, str]]:
        """(field, path) of every input that an earlier stage may write."""
        return []

    def outputs(self, cfg) -> list[str]:
        """What this stage writes, as the paths later stages' inputs name."""
        return []

    def check(self, cfg) -> None:
        """Every file the stage will read, checked before Ray starts; errors name the field and path."""

    def run(self, cfg) -> StageResult:
        raise NotImplementedError

    def record_dir(self, cfg) -> str:
        """Where the stage's completion record lives."""
        raise NotImplementedError

    def settings(self, cfg):
        """What decides this stage's outputs (the fingerprint hashes it without its Runtime fields)."""
        return cfg

    def is_complete(self, cfg) -> dict | None:
        return is_complete(self.record_dir(cfg), fingerprint(self.settings(cfg)))

    def execute(self, cfg) -> StageResult:
        """Run unless complete for these settings; the completion record is written last."""
        t0 = time.time()
        record = self.is_complete(cfg)
        if record is not None:
            summary = record.get("summary", {})
            at = f" at step {summary['step']}" if "step" in summary else ""
            return StageResult(self.name, True, summary, record.get("outputs", {}),
                               [f"{self.name}: already complete{at}: {self.record_dir(cfg)}"], time.time() - t0)
        result = self.run(cfg)
        result.seconds = time.time() - t0
        mark_complete(self.record_dir(cfg), fingerprint(self.settings(cfg)), stage=self.name, summary=result.summary,
                      outputs=result.outputs, seconds=result.seconds)
        return result
