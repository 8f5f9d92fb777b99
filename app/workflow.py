"""Workflow files: one YAML for a whole experiment, validated before anything runs.

```yaml
name: demo                       # a Ray Job per run of this name; reruns resume
root: runs/demo                  # storage root: a local path, or a URI (s3://, gs://, ...) used directly
tiny_zoo: runs/demo/zoo          # optional: write the tiny model zoo here first (the embedded default)
ray: {num_cpus: 4}               # the cluster (address) or the local instance, for every stage
side_by_side: true               # independent evaluation stages at once when the cluster holds them
stages:                          # any subset, run in the registry's order (stages/registry.py):
  synth: {...}                   #   SynthConfig
  tokenizer: {...}               #   TokenizerTrainConfig (runs as tokenizer_stage1, tokenizer_stage2)
  laytongen: {...}               #   GenTrainConfig
  eval_recon: {...}              #   ReconEvalConfig
  eval_geneval: {...}            #   GenEvalRunConfig
  eval_coco: {...}               #   CocoEvalConfig
```
A stage section is the stage's own config with the paths that link stages left out: each stage
fills them from `root` and the earlier stages (`Stage.with_defaults`). Anything given explicitly
wins. `ray` is the workflow's for every stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from layton.config import ConfigError, PathStr, RayConfig, Section, from_file, parse_yaml, validate, validation_problems
from layton.storage import Root, absolute, check_scheme, is_uri, within
from stages.base import Stage
from stages.registry import SECTIONS, STAGES, stages_of


class WorkflowFile(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    root: str
    tiny_zoo: PathStr | None = None
    ray: RayConfig = RayConfig()
    # Evaluation stages that read nothing the others write run at once when the cluster holds them all.
    side_by_side: bool = True
    stages: dict[str, dict | None] = Field(min_length=1)


@dataclass
class Workflow:
    name: str
    root: str  # a local path (absolute) or a URI: every stage reads and writes it directly
    source: str  # the file (or "<env LAYTON_WORKFLOW>") named in errors
    raw: dict  # the file as written
    tiny_zoo: Path | None
    ray: RayConfig
    side_by_side: bool = True  # independent evaluation stages at once, when the cluster holds them
    configs: dict[str, BaseModel] = field(default_factory=dict)  # section -> validated stage config

    def stages(self) -> list[tuple[Stage, BaseModel]]:
        """(stage, its config) for every stage this workflow runs, in order."""
        return [(cls(), self.configs[cls.section]) for cls in STAGES if cls.section in self.configs]

    def stage_names(self) -> list[str]:
        return [s.name for s, _ in self.stages()]


def parse_workflow(text: str, source: str) -> Workflow:
    """Validate a workflow's YAML text; every problem raises ConfigError naming `source` and the field."""
    raw = parse_yaml(text, source)
    wf = validate(raw, WorkflowFile, source)
    unknown = [s for s in wf.stages if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: stages.{unknown[0]}: unknown stage (stages are {', '.join(SECTIONS)})")
    if is_uri(wf.root):
        try:
            check_scheme(wf.root)
        except ValueError as e:
            raise ConfigError(f"{source}: root: {e}") from None
    root = absolute(wf.root)
    out = Workflow(wf.name, root, source, raw, Path(wf.tiny_zoo) if wf.tiny_zoo else None, wf.ray, wf.side_by_side)
    problems = []
    for section, cls in SECTIONS.items():  # the registry's order, whatever the file's order
        if section not in wf.stages:
            continue
        data = stages_of(section)[0]().with_defaults(copy.deepcopy(wf.stages[section] or {}), root, out.configs)
        data["ray"] = wf.ray.model_dump(mode="json")  # one cluster for the whole workflow
        try:
            out.configs[section] = from_file(data, cls)
        except ValidationError as e:
            problems += validation_problems(e, f"stages.{section}.")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return out


def load_workflow(path: str | Path) -> Workflow:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: workflow file not found")
    return parse_workflow(path.read_text(), str(path))


def check_links(wf: Workflow) -> None:
    """A stage whose input neither exists nor is written by an earlier stage fails here, naming it —
    before the zoo, Ray or any stage starts. Inputs may be local paths or URIs alike."""
    produced: set[str] = set()
    provided = [str(wf.tiny_zoo.resolve())] if wf.tiny_zoo else []  # written when the run starts
    for stage, cfg in wf.stages():
        for name, path in stage.inputs(cfg):
            p = absolute(path)
            if p in produced or any(within(p, z) for z in provided):
                continue
            try:
                found = Root(p).exists()
            except (OSError, ValueError) as e:
                raise OSError(f"{wf.source}: stages.{stage.section}.{name}: {path}: cannot be read ({e})") from None
            if not found:
                raise FileNotFoundError(f"{wf.source}: stages.{stage.section}.{name}: {path} does not exist and no "
                                        "earlier stage of this workflow writes it")
        produced |= {absolute(p) for p in stage.outputs(cfg)}


def preflight(wf: Workflow) -> None:
    """Every stage's `check()` (model files and inputs no earlier stage writes), before any stage
    starts; errors name the file, the stage and the field."""
    for stage, cfg in wf.stages():
        try:
            stage.check(cfg)
        except (FileNotFoundError, ValueError) as e:  # a ModelFileError is a FileNotFoundError
            raise type(e)(f"{wf.source}: stages.{stage.section}: {e}") from None
