"""The reconstruction evaluation stage (`workflows/eval_recon.py`): complete when its output holds
the completion record for these settings."""

from __future__ import annotations

from layton.storage import join
from stages.base import StageResult, setdefault_dotted
from stages.eval_recon.config import ReconEvalConfig
from stages.evaluation import EvalStage
from stages.tokenizer.stage import tokenizer_outputs

METRICS = ("rfid", "psnr", "ssim", "lpips")


class ReconEvalStage(EvalStage):
    name = section = "eval_recon"
    kind = "recon"
    config = ReconEvalConfig
    command = ("eval", "recon")
    help = "rFID / PSNR / SSIM / LPIPS of tokenizers and baselines"

    def with_defaults(self, raw: dict, root: str, earlier: dict) -> dict:
        setdefault_dotted(raw, "data.path", join(root, "shards"))
        setdefault_dotted(raw, "output", join(root, "eval", self.kind))
        for m in raw.get("models") or []:
            if isinstance(m, dict) and m.get("kind") == "layton":
                m.setdefault("path", tokenizer_outputs(root, earlier)[1])
        return raw

    def inputs(self, cfg: ReconEvalConfig) -> list[tuple[str, str]]:
        return [("data.path", cfg.data.path)] + [(f"models[{i}].path", m.path) for i, m in enumerate(cfg.models)
                                                 if m.kind == "layton"]

    def check(self, cfg: ReconEvalConfig) -> None:
        from workflows.eval_recon import check_recon_models

        check_recon_models(cfg, linked=False)

    def run(self, cfg: ReconEvalConfig) -> StageResult:
        from workflows.eval_recon import run_recon_eval

        body = run_recon_eval(cfg)
        notes = [f"{name}: skipped {r['skipped']}" for name, r in body["results"].items() if r["skipped"]]
        summary = {f"{name}.{k}": r.get(k) for name, r in body["results"].items() for k in METRICS}
        return self.result(cfg, body, summary, notes, "")
