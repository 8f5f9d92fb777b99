"""What the evaluation stages share: results under `output` (its completion record too), and for
those that can generate with LaytonGen, where the generator and the images come from."""

from __future__ import annotations

from typing import ClassVar

from layton.storage import Root, join
from stages.base import Stage, StageResult, setdefault_dotted
from stages.laytongen.stage import laytongen_export


# Ray Data's read and write tasks take 1 CPU each; a stage beside another needs one free for them,
# or its actors would sit waiting on input that no CPU is left to read.
TASK_CPUS = 1.0


class EvalStage(Stage):
    kind: ClassVar[str]  # eval/<kind> under the workflow root
    side_by_side = True

    def demand(self, cfg) -> dict[str, float]:
        """One actor pool (`resources`: generation and scoring take turns in it) and a task's CPU."""
        r = cfg.resources
        return {"CPU": r.num_actors * r.num_cpus + TASK_CPUS, "GPU": r.num_actors * r.num_gpus}

    def record_dir(self, cfg) -> str:
        return cfg.output

    def result(self, cfg, body: dict, summary: dict, notes: list[str], counted: str) -> StageResult:
        """The results table, notes, and where results.json is (with what was `counted` and the time);
        `output` a local path or a URI."""
        results = join(cfg.output, "results.json")
        lines = [(Root(cfg.output).read("results.md") or b"").decode().rstrip(), *notes,
                 f"results: {results} ({counted}{', ' if counted else ''}{body['seconds']:.1f}s)"]
        return StageResult(self.name, False, summary, {"results": results}, lines)


class GeneratingEvalStage(EvalStage):
    """Generates with LaytonGen (`generator`) into `images`, or scores `images` as found."""

    def with_defaults(self, raw: dict, root: str, earlier: dict) -> dict:
        if "laytongen" in earlier:
            setdefault_dotted(raw, "generator", laytongen_export(earlier["laytongen"]))
        setdefault_dotted(raw, "images", join(root, "eval", self.kind, "images"))
        setdefault_dotted(raw, "output", join(root, "eval", self.kind))
        return raw

    def inputs(self, cfg) -> list[tuple[str, str]]:
        return [("generator", cfg.generator)] if cfg.generator else [("images", cfg.images)]

    def outputs(self, cfg) -> list[str]:
        return [cfg.images] if cfg.generator else []
