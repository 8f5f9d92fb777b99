"""The COCO-5K stage (`workflows/eval_coco.py`): generate (optional), then preference-score means."""

from __future__ import annotations

from stages.base import StageResult
from stages.eval_coco.config import CocoEvalConfig
from stages.evaluation import GeneratingEvalStage


class CocoEvalStage(GeneratingEvalStage):
    name = section = "eval_coco"
    kind = "coco"
    config = CocoEvalConfig
    command = ("eval", "coco")
    help = "COCO-5K captions: generate (optional), ImageReward / MPS / HPSv2 / FaceScore means"

    def check(self, cfg: CocoEvalConfig) -> None:
        from pipelines.coco import read_captions
        from workflows.eval_coco import check_scorer_files

        read_captions(cfg.captions, cfg.limit)
        check_scorer_files(cfg.scorers)

    def run(self, cfg: CocoEvalConfig) -> StageResult:
        from workflows.eval_coco import run_coco_eval

        body = run_coco_eval(cfg)
        notes = [f"skipped: {body['skipped']}"] if body["skipped"] else []
        if body["without_face"]:
            notes.append(f"{body['without_face']} image(s) without a detected face (no FaceScore)")
        summary = {**{m: v["mean"] for m, v in body["summary"].items()}, "images": body["images"]}
        return self.result(cfg, body, summary, notes, f"{body['images']} of {body['captions']} caption(s) scored")
