"""The GenEval stage (`workflows/eval_geneval.py`): generate with LaytonGen (optional), then score."""

from __future__ import annotations

from stages.base import StageResult
from stages.eval_geneval.config import GenEvalRunConfig
from stages.evaluation import GeneratingEvalStage


class GenEvalStage(GeneratingEvalStage):
    name = section = "eval_geneval"
    kind = "geneval"
    config = GenEvalRunConfig
    command = ("eval", "geneval")
    help = "GenEval: generate (optional) and score in GenEval's layout"

    def check(self, cfg: GenEvalRunConfig) -> None:
        from workflows.eval_geneval import check_geneval_models

        check_geneval_models(cfg)

    def run(self, cfg: GenEvalRunConfig) -> StageResult:
        from workflows.eval_geneval import run_geneval

        body = run_geneval(cfg)
        return self.result(cfg, body, {"overall": body["summary"].get("overall"), "images": body["images"]}, [],
                           f"{body['images']} image(s)")
