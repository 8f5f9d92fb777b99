"""Every stage, in the order a workflow runs them. Adding a stage: its package, and one line here."""

from __future__ import annotations

from stages.base import Stage
from stages.eval_coco.stage import CocoEvalStage
from stages.eval_geneval.stage import GenEvalStage
from stages.eval_recon.stage import ReconEvalStage
from stages.laytongen.stage import LaytonGenStage
from stages.synth.stage import SynthStage
from stages.tokenizer.stage import TokenizerStage1, TokenizerStage2

STAGES: list[type[Stage]] = [SynthStage, TokenizerStage1, TokenizerStage2, LaytonGenStage, ReconEvalStage, GenEvalStage,
                             CocoEvalStage]
# Workflow file sections, in run order; the tokenizer section runs as two stages.
SECTIONS: dict[str, type] = {s.section: s.config for s in STAGES}


def stages_of(section: str) -> list[type[Stage]]:
    return [s for s in STAGES if s.section == section]


def stage_named(name: str) -> type[Stage]:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)
