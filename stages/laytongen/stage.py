"""The LaytonGen stage: GPT training over the tokenizer's tokens (`workflows/train_gen.py`).

Its completion record lies in the export (`<run.storage_path>/<run.name>/laytongen`).
"""

from __future__ import annotations

from stages.base import Stage, StageResult, setdefault_dotted
from stages.laytongen.config import GenTrainConfig
from stages.tokenizer.stage import tokenizer_outputs
from stages.training import training_result

RUN_NAME = "laytongen"


def laytongen_export(cfg: GenTrainConfig) -> str:
    return cfg.export_dir()


class LaytonGenStage(Stage):
    name = section = "laytongen"
    config = GenTrainConfig
    command, help = ("train", "gen"), "train LaytonGen on Ray Train (resumes when rerun)"

    def with_defaults(self, raw: dict, root: str, earlier: dict) -> dict:
        tokens, export = tokenizer_outputs(root, earlier)
        setdefault_dotted(raw, "data.tokens", tokens)
        setdefault_dotted(raw, "model.tokenizer", export)
        setdefault_dotted(raw, "run.storage_path", f"{root}/train")
        setdefault_dotted(raw, "run.name", RUN_NAME)
        return raw

    def inputs(self, cfg: GenTrainConfig) -> list[tuple[str, str]]:
        return [("data.tokens", cfg.data.tokens), ("model.tokenizer", cfg.model.tokenizer)]

    def outputs(self, cfg: GenTrainConfig) -> list[str]:
        return [laytongen_export(cfg)]

    def check(self, cfg: GenTrainConfig) -> None:
        from workflows.train_resources import check_cluster_cpus
        from workflows.train_gen import check_gen_models

        check_gen_models(cfg)
        check_cluster_cpus(cfg)

    def record_dir(self, cfg: GenTrainConfig) -> str:
        return laytongen_export(cfg)

    def run(self, cfg: GenTrainConfig) -> StageResult:
        from workflows.train_gen import run_gen_training

        r = run_gen_training(cfg)
        m = r.metrics
        return training_result(self.name, r, label="laytongen", precompute=("text precompute", "caption"),
                               detail=f" (uniform {m.get('uniform_ce', float('nan')):.4f}), "
                                      f"{m.get('skipped_rows', 0)} row(s) skipped",
                               grids=("samples", "sample grid"), output="laytongen")
