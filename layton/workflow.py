"""Workflow files: one YAML for a whole experiment, validated before anything runs.

```yaml
name: demo                       # a Ray Job per run of this name; reruns resume
root: runs/demo                  # storage root: a local path, or a URI (s3://, gs://, file://, ...)
tiny_zoo: runs/demo/zoo          # optional: write the tiny model zoo here first (the embedded default)
ray: {num_cpus: 4}               # the cluster (address) or the local instance, for every stage
stages:                          # any subset, run in this order:
  synth: {...}                   #   SynthConfig
  tokenizer: {...}               #   TokenizerTrainConfig (runs as tokenizer_stage1, tokenizer_stage2)
  laytongen: {...}               #   GenTrainConfig
  eval_recon: {...}              #   ReconEvalConfig
  eval_geneval: {...}            #   GenEvalRunConfig
  eval_coco: {...}               #   CocoEvalConfig
```
A stage section is the stage's own config with the paths that link stages left out: the loader
fills them from `root` and the earlier stages (synth → `<root>/shards`; tokenizer trains on those
shards into `<root>/train`; LaytonGen reads the tokenizer's precompute pass and stage-2 export;
recon scores a `kind: layton` model without a path as that export; GenEval/COCO generate with
LaytonGen's export into `<root>/eval/<kind>`). Anything given explicitly wins. `ray` is the
workflow's for every stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from layton.storage import is_uri, open_uri, staging_dir
from layton.config import (CocoEvalConfig, ConfigError, GenEvalRunConfig, GenTrainConfig, RayConfig, ReconEvalConfig,
                           Section, SynthConfig, TokenizerTrainConfig, _field_path)

STAGE_SECTIONS = {"synth": SynthConfig, "tokenizer": TokenizerTrainConfig, "laytongen": GenTrainConfig,
                  "eval_recon": ReconEvalConfig, "eval_geneval": GenEvalRunConfig, "eval_coco": CocoEvalConfig}
# What runs, in order: the tokenizer section runs as two stages.
STAGE_NAMES = ["synth", "tokenizer_stage1", "tokenizer_stage2", "laytongen", "eval_recon", "eval_geneval", "eval_coco"]


class WorkflowFile(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    root: str
    tiny_zoo: str | None = None
    ray: RayConfig = RayConfig()
    stages: dict[str, dict] = Field(min_length=1)


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

    def stages(self) -> list[str]:
        """The stage names this workflow runs, in order."""
        names = []
        for section in self.configs:
            names += ["tokenizer_stage1", "tokenizer_stage2"] if section == "tokenizer" else [section]
        return names


def _setdefault(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            return  # a wrong type is left for validation to name
    d.setdefault(last, value)


def _tokenizer_outputs(root: Path, earlier: dict[str, BaseModel]) -> tuple[str, str]:
    """(precompute pass, stage-2 export) of this workflow's tokenizer stage, or where a tokenizer
    stage with the default run name writes them under `root` (an earlier run of a workflow)."""
    from pipelines.tokenizer_data import precompute_dir
    from workflows.train_tokenizer import stage_dir

    if "tokenizer" in earlier:
        tok = earlier["tokenizer"]
        return str(precompute_dir(tok)), str(stage_dir(tok, 2) / "tokenizer")
    return str(root / "train" / "tokenizer-precompute"), str(root / "train" / "tokenizer-stage2" / "tokenizer")


def _with_defaults(section: str, raw: dict, root: Path, wf_ray: dict, earlier: dict[str, BaseModel]) -> dict:
    """The stage section with the linking paths filled in (only where absent)."""
    d = copy.deepcopy(raw)
    d["ray"] = wf_ray  # one cluster for the whole workflow
    train = str(root / "train")
    if section == "synth":
        _setdefault(d, "output.dir", str(root / "shards"))
    elif section == "tokenizer":
        _setdefault(d, "data.shards", [str(root / "shards")])
        _setdefault(d, "run.storage_path", train)
        _setdefault(d, "run.name", "tokenizer")
    elif section == "laytongen":
        tokens, export = _tokenizer_outputs(root, earlier)
        _setdefault(d, "data.tokens", tokens)
        _setdefault(d, "model.tokenizer", export)
        _setdefault(d, "run.storage_path", train)
        _setdefault(d, "run.name", "laytongen")
    elif section == "eval_recon":
        _setdefault(d, "data.path", str(root / "shards"))
        _setdefault(d, "output", str(root / "eval" / "recon"))
        for m in d.get("models") or []:
            if isinstance(m, dict) and m.get("kind") == "layton":
                m.setdefault("path", _tokenizer_outputs(root, earlier)[1])
    elif section in ("eval_geneval", "eval_coco"):
        kind = section.removeprefix("eval_")
        if "laytongen" in earlier:
            from workflows.train_gen import job_dir

            _setdefault(d, "generator", str(job_dir(earlier["laytongen"]) / "laytongen"))
        _setdefault(d, "images", str(root / "eval" / kind / "images"))
        _setdefault(d, "output", str(root / "eval" / kind))
    return d


def parse_workflow(text: str, source: str) -> Workflow:
    """Validate a workflow's YAML text; every problem raises ConfigError naming `source` and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        wf = WorkflowFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(f"{_field_path(err['loc']) or '<root>'}: {err['msg']}"
                                                     for err in e.errors())) from None
    unknown = [s for s in wf.stages if s not in STAGE_SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: stages.{unknown[0]}: unknown stage (stages are {', '.join(STAGE_SECTIONS)})")
    remote = None
    if is_uri(wf.root):  # stages work in a local staging copy, mirrored to the URI (layton/storage.py)
        try:
            open_uri(wf.root)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{source}: {e}") from None
        remote, root = wf.root, staging_dir(wf.name, wf.root)
    else:
        root = Path(wf.root).resolve()
    out = Workflow(wf.name, root, source, raw, Path(wf.tiny_zoo).resolve() if wf.tiny_zoo else None, wf.ray, remote)
    wf_ray = wf.ray.model_dump(mode="json")
    problems = []
    for section in STAGE_SECTIONS:  # the fixed order, whatever the file's order
        if section not in wf.stages:
            continue
        data = _with_defaults(section, wf.stages[section] or {}, root, wf_ray, out.configs)
        try:
            out.configs[section] = STAGE_SECTIONS[section].model_validate(data)
        except ValidationError as e:
            problems += [f"stages.{section}.{_field_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return out


def load_workflow(path: str | Path) -> Workflow:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: workflow file not found")
    return parse_workflow(path.read_text(), str(path))


# --- What each stage reads that an earlier stage may write --------------------------------------


def _linked_inputs(section: str, cfg) -> list[tuple[str, str]]:
    """(field, path) of every input of a stage that is another stage's output."""
    if section == "tokenizer":
        return [(f"data.shards[{i}]", s) for i, s in enumerate(cfg.data.shards)]
    if section == "laytongen":
        return [("data.tokens", cfg.data.tokens), ("model.tokenizer", cfg.model.tokenizer)]
    if section == "eval_recon":
        return [("data.path", cfg.data.path)] + [(f"models[{i}].path", m.path) for i, m in enumerate(cfg.models)
                                                 if m.kind == "layton"]
    if section in ("eval_geneval", "eval_coco"):
        return [("generator", cfg.generator)] if cfg.generator else [("images", cfg.images)]
    return []


def _outputs(section: str, cfg) -> list[Path]:
    """What a stage writes, as the paths later stages' inputs name."""
    if section == "synth":
        return [Path(cfg.output.dir)]
    if section == "tokenizer":
        from pipelines.tokenizer_data import precompute_dir
        from workflows.train_tokenizer import stage_dir

        return [precompute_dir(cfg), stage_dir(cfg, 1) / "tokenizer", stage_dir(cfg, 2) / "tokenizer"]
    if section == "laytongen":
        from workflows.train_gen import job_dir

        return [job_dir(cfg) / "laytongen"]
    if section in ("eval_geneval", "eval_coco") and cfg.generator:
        return [Path(cfg.images)]
    return []


def check_links(wf: Workflow) -> None:
    """A stage whose input neither exists nor is written by an earlier stage fails here, naming it —
    before the zoo, Ray or any stage starts."""
    produced: set[Path] = set()
    # The tiny zoo is written, and a URI root's contents pulled, when the run starts.
    provided = [p for p in (wf.tiny_zoo, wf.root if wf.remote else None) if p is not None]
    for section, cfg in wf.configs.items():
        for name, path in _linked_inputs(section, cfg):
            p = Path(path).resolve()
            if not (p.exists() or p in produced or any(p.is_relative_to(z) for z in provided)):
                raise FileNotFoundError(f"{wf.source}: stages.{section}.{name}: {path} does not exist and no earlier "
                                        "stage of this workflow writes it")
        produced |= {p.resolve() for p in _outputs(section, cfg)}
