"""The COCO-5K stage's config: generate (optional), then ImageReward / MPS / HPSv2 / FaceScore means."""

from __future__ import annotations

from pydantic import Field, model_validator

from layton.config import (Dtype, ImageRewardPaths, MPSPaths, PathStr, RayConfig, Resources, Runtime, SamplingConfig,
                           Section)


class HPSv2Paths(Section):
    checkpoint: PathStr  # HPS_v2_compressed.pt ({"state_dict": ...})
    architecture: str = "ViT-H-14"  # an open_clip model name or an open_clip_config.json


class FaceScorePaths(Section):
    checkpoint: PathStr  # FS_model.pt
    med_config: PathStr  # med_config.json
    tokenizer: PathStr  # bert-base-uncased tokenizer directory
    # Face detector: RetinaFace weights as FaceScore uses (mobilenet0.25_Final.pth, or Resnet50_Final.pth),
    # or an OpenCV LBP cascade .xml; None: scikit-image's LBP cascade (not upstream's detector)
    detector: PathStr | None = None


class PreferenceScorers(Section):
    """The COCO-5K columns; a scorer left out is not computed (at least one is needed)."""

    imagereward: ImageRewardPaths | None = None
    mps: MPSPaths | None = None
    hpsv2: HPSv2Paths | None = None
    facescore: FaceScorePaths | None = None
    dtype: Dtype = "float32"

    @model_validator(mode="after")
    def _any(self):
        if not self.names():
            raise ValueError("configure at least one of imagereward, mps, hpsv2, facescore")
        return self

    def names(self) -> list[str]:
        return [n for n in ("imagereward", "mps", "hpsv2", "facescore") if getattr(self, n) is not None]


class CocoEvalConfig(Section):
    captions: PathStr  # COCO's captions_val2017.json (first caption of each image) or a .txt/.jsonl/.parquet prompt file
    limit: int | None = Field(None, ge=1)  # the first N captions (by image id)
    images: Runtime[PathStr]  # `<images>/images/<id>.png` + metadata.jsonl when `generator` is set; else scored as found
    generator: PathStr | None = None  # a LaytonGen directory
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    scorers: PreferenceScorers
    batch_size: Runtime[int] = Field(8, ge=1)
    resources: Runtime[Resources] = Resources()  # per actor, for generation and scoring alike
    output: Runtime[PathStr]
    ray: Runtime[RayConfig] = RayConfig()
