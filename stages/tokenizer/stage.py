"""The tokenizer stages: stage 1 (diffusion loss) and stage 2 (consistency + LPIPS), one workflow section.

The work is `workflows/train_tokenizer.py` on Ray Train; a stage's completion record lies in its
export (`<run.storage_path>/<run.name>-stage<N>/tokenizer`). Stage 1's fingerprint leaves out the
stage-2 section, so tuning stage 2 does not retrain stage 1.
"""

from __future__ import annotations

from layton.storage import join
from stages.base import Stage, StageResult, setdefault_dotted
from stages.tokenizer.config import TokenizerTrainConfig
from stages.training import training_result

RUN_NAME = "tokenizer"  # the default run name: where later stages look for its outputs under the root


def tokenizer_outputs(root: str, earlier: dict) -> tuple[str, str]:
    """(precompute pass, stage-2 export) of the workflow's tokenizer section, or where a tokenizer
    section with the default run name writes them under `root` (an earlier run of the workflow)."""
    if "tokenizer" in earlier:
        tok = earlier["tokenizer"]
        return tok.precompute_path(), tok.export_dir(2)
    train = join(root, "train")
    return join(train, f"{RUN_NAME}-precompute"), join(train, f"{RUN_NAME}-stage2", "tokenizer")


class TokenizerStage(Stage):
    section = "tokenizer"
    config = TokenizerTrainConfig
    n: int
    command = ("train", "tokenizer")

    def with_defaults(self, raw: dict, root: str, earlier: dict) -> dict:
        setdefault_dotted(raw, "data.shards", [f"{root}/shards"])
        setdefault_dotted(raw, "run.storage_path", f"{root}/train")
        setdefault_dotted(raw, "run.name", RUN_NAME)
        return raw

    def inputs(self, cfg: TokenizerTrainConfig) -> list[tuple[str, str]]:
        return [(f"data.shards[{i}]", s) for i, s in enumerate(cfg.data.shards)]

    def outputs(self, cfg: TokenizerTrainConfig) -> list[str]:
        export = cfg.export_dir(self.n)
        return [cfg.precompute_path(), export] if self.n == 1 else [export]

    def check(self, cfg: TokenizerTrainConfig) -> None:
        from layton.tokenizer import check_tokenizer_models

        from workflows.train_resources import check_cluster_cpus

        check_tokenizer_models(cfg.model, cfg.stage2.consistency if self.n == 2 else None,
                               cfg.stage2.lpips if self.n == 2 else None)
        check_cluster_cpus(cfg)

    def record_dir(self, cfg: TokenizerTrainConfig) -> str:
        return cfg.export_dir(self.n)

    def settings(self, cfg: TokenizerTrainConfig):
        if self.n == 2:
            return cfg
        return {name: getattr(cfg, name) for name in type(cfg).model_fields if name != "stage2"}

    def run(self, cfg: TokenizerTrainConfig) -> StageResult:
        from workflows.train_tokenizer import run_tokenizer_stage

        r = run_tokenizer_stage(cfg, self.n)
        return training_result(self.name, r, label=f"stage {self.n}", precompute=("precompute", "image"),
                               detail=f", {r.metrics.get('skipped_images', 0)} image(s) skipped",
                               grids=("grids", "reconstruction grid"), output="tokenizer")


class TokenizerStage1(TokenizerStage):
    name, n, help = "tokenizer_stage1", 1, "tokenizer stage 1 (diffusion loss) on Ray Train"


class TokenizerStage2(TokenizerStage):
    name, n, help = "tokenizer_stage2", 2, "tokenizer stage 2 (consistency LoRA + LPIPS) on Ray Train"
