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
from abc import ABC, abstractmethod
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


class Stage(ABC):
    name: ClassVar[str]  # as listed in workflow state and the report
    section: ClassVar[str]  # its section in a workflow file (two stages may share one)
    config: ClassVar[type[Section]]
    command: ClassVar[tuple[str, ...]]  # its CLI command (`layton train tokenizer CONFIG`); stages may share one
    help: ClassVar[str]  # the command's one-line help
    # May run beside other such stages of a workflow (the runner's `side_by_side`): it reads what the
    # stages before it wrote and nothing a stage beside it writes (checked by `inputs`/`outputs`).
    side_by_side: ClassVar[bool] = False

    def __init__(self, on_event: Callable[[str], None] | None = None):
        self.on_event = on_event or (lambda line: None)  # progress lines (the CLI prints them)
        self._fingerprint: tuple[object, str] | None = None  # (config, its fingerprint): computed once per config

    def with_defaults(self, raw: dict, root: str, earlier: dict[str, Section]) -> dict:
        """The section as written, with the fields that link this stage to the workflow's root and
        to the configs of the sections before it filled in (only where the file leaves them out)."""
        return raw

    def inputs(self, cfg) -> list[tuple[str, str]]:
        """(field, path) of every input that an earlier stage may write."""
        return []

    def outputs(self, cfg) -> list[str]:
        """What this stage writes, as the paths later stages' inputs name."""
        return []

    def demand(self, cfg) -> dict[str, float]:
        """The Ray resources the stage holds at once at its peak (what side-by-side runs must fit)."""
        return {}

    def check(self, cfg) -> None:
        """Every file the stage will read, checked before Ray starts; errors name the field and path."""

    @abstractmethod
    def run(self, cfg) -> StageResult:
        """The work, on the current Ray."""

    @abstractmethod
    def record_dir(self, cfg) -> str:
        """Where the stage's completion record lives."""

    def settings(self, cfg):
        """What decides this stage's outputs (the fingerprint hashes it without its Runtime fields)."""
        return cfg

    def fingerprint(self, cfg) -> str:
        # `settings` may read the input (synthesis lists the prompt files' footers): once per config.
        if self._fingerprint is None or self._fingerprint[0] is not cfg:
            self._fingerprint = (cfg, fingerprint(self.settings(cfg)))
        return self._fingerprint[1]

    def is_complete(self, cfg) -> dict | None:
        return is_complete(self.record_dir(cfg), self.fingerprint(cfg))

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
        mark_complete(self.record_dir(cfg), self.fingerprint(cfg), stage=self.name, summary=result.summary,
                      outputs=result.outputs, seconds=result.seconds)
        return result


def setdefault_dotted(d: dict, dotted: str, value) -> None:
    """`d[a][b][c] = value` for "a.b.c" unless set; a non-mapping on the way is left for validation to name."""
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            return
    d.setdefault(last, value)
