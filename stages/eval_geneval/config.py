"""The GenEval stage's config: generate (optional) and score in GenEval's layout."""

from __future__ import annotations

from pydantic import Field

from layton.config import PathStr, RayConfig, Resources, Runtime, SamplingConfig, Section


class GenEvalRunConfig(Section):
    metadata: PathStr  # GenEval's evaluation_metadata.jsonl
    images: Runtime[PathStr]  # GenEval folder layout: written when `generator` is set, else scored as found
    generator: PathStr | None = None  # a LaytonGen directory
    images_per_prompt: int = Field(4, ge=1)
    limit: int | None = Field(None, ge=1)  # the first N prompts (a quick subset)
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    detector: PathStr  # Mask2Former COCO instance segmentation directory
    clip: PathStr  # open_clip ViT-L-14 directory (colour classification)
    batch_size: Runtime[int] = Field(4, ge=1)
    resources: Runtime[Resources] = Resources()
    output: Runtime[PathStr]
    ray: Runtime[RayConfig] = RayConfig()
