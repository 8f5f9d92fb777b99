"""Workflow files: one YAML for a whole experiment, validated before anything runs.

```yaml
name: demo                       # a Ray Job per run of this name; reruns resume
root: runs/demo                  # storage root: a local path, or a URI (s3://, gs://, file://, ...)
tiny_zoo: runs/demo/zoo          # optional: write the tiny model zoo here first (the embedded default)
ray: {num_cpus: 4}               # the cluster (address) or the local instance, for every stage
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

from layton.config import ConfigError, PathStr, RayConfig, Section, parse_yaml, validate, validation_problems
from layton.storage import is_uri, open_uri, staging_dir
from stages.base import Stage
from stages.registry import SECTIONS, STAGES, stages_of


class WorkflowFile(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    root: str
    tiny_zoo: PathStr | None = None
    ray: RayConfig = RayConfig()
    stages: dict[str, dict | None] = Field(min_length=1)


@dataclass
class Workflow:
    name: str
    root: Path
    source: str  # the file (or "<env LAYTON_WORKFLOW>") named in errors
    raw: dict  # the file as written
    tiny_zoo: Path | None
    ray: RayConfig
    remote: str | None = None  # a cloud URI root; `root` is then its local staging copy
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
    remote = None
    if is_uri(wf.root):  # stages work in a local staging copy, mirrored to the URI (layton/storage.py)
        try:
            open_uri(wf.root)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{source}: {e}") from None
        remote, root = wf.root, staging_dir(wf.name, wf.root)
    else:
        root = Path(wf.root).resolve()
    out = Workflow(wf.name, root, source, raw, Path(wf.tiny_zoo) if wf.tiny_zoo else None, wf.ray, remote)
    problems = []
    for section, cls in SECTIONS.items():  # the registry's order, whatever the file's order
        if section not in wf.stages:
            continue
        data = stages_of(section)[0]().with_defaults(copy.deepcopy(wf.stages[section] or {}), str(root), out.configs)
        data["ray"] = wf.ray.model_dump(mode="json")  # one cluster for the whole workflow
        try:
            out.configs[section] = cls.model_validate(data)
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
    before the zoo, Ray or any stage starts."""
    produced: set[Path] = set()
    # The tiny zoo is written, and a URI root's contents pulled, when the run starts.
    provided = [p for p in (wf.tiny_zoo, wf.root if wf.remote else None) if p is not None]
    for stage, cfg in wf.stages():
        for name, path in stage.inputs(cfg):
            p = Path(path).resolve()
            if not (p.exists() or p in produced or any(p.is_relative_to(z) for z in provided)):
                raise FileNotFoundError(f"{wf.source}: stages.{stage.section}.{name}: {path} does not exist and no "
                                        "earlier stage of this workflow writes it")
        produced |= {Path(p).resolve() for p in stage.outputs(cfg)}


def preflight(wf: Workflow) -> None:
    """Every stage's `check()` (model files and inputs no earlier stage writes), before any stage
    starts; errors name the file, the stage and the field."""
    for stage, cfg in wf.stages():
        try:
            stage.check(cfg)
        except (FileNotFoundError, ValueError) as e:  # a ModelFileError is a FileNotFoundError
            raise type(e)(f"{wf.source}: stages.{stage.section}: {e}") from None
