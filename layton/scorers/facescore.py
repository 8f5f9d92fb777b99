"""FaceScore (OPPO-Mente-Lab) scorer: ImageReward's model with FaceScore's weights, applied to faces.

The release is loaded by `ImageRewardScorer.from_release`, and each batch of face crops goes through
that scorer's tokenizer, preprocessing and forward (`ImageRewardScorer.rewards(normalise=False)`);
this module adds only the face detection, the fixed text and the per-image aggregation.

Release layout (Hugging Face `OPPOer/FaceScore`, folder `FaceScore_model/`):

    FS_model.pt        torch.save(state_dict) loaded by upstream into `ImageReward.ImageReward`
                       (the same module, hence the same key names as `ImageReward.pt`)
    med_config.json    BLIP's BertConfig JSON
    tokenizer/         not part of the release: upstream uses BLIP's bert-base-uncased tokenizer
                       (with [DEC]/[ENC]) exactly as ImageReward does, so the same directory serves

What upstream's `FaceScore.get_reward` computes for one image:
    faces  = batch-face RetinaFace boxes with confidence >= 0.9 (`layton.retinaface` when its
             weights are given as `detector=`, else the LBP cascade of `layton.faces`)
    crop   = RGB image[int(y0-1):int(y1+1), int(x0-1):int(x1+1)]     (`layton.faces.crop_faces`)
    pixels = ImageReward's Resize(224, bicubic) -> CenterCrop(224) -> CLIP mean/std
    ids    = tokenizer("A face.", padding="max_length", truncation=True, max_length=35)
             (a fixed text: the image's own prompt is not used)
    reward = mlp(text_encoder(ids, cross-attending to visual_encoder(pixels))[:, 0].float())
             (raw: ImageReward's (r - 0.16717) / 1.03334 normalisation is NOT applied)
and it returns one reward per face, or nothing when no face passes. Per image, this scorer
reports the mean over the faces (with each face's score and box), or None with a reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from layton.faces import Box, crop_box, crop_faces, make_face_detector
from layton.model_files import check_file, check_model_dir
from layton.scorers import check_pairs
from layton.scorers.imagereward import ImageRewardScorer

FACE_PROMPT = "A face."  # upstream's `default_prompt`
NO_FACE = "no face detected"


class FaceDetector(Protocol):
    def detect(self, image: Image.Image) -> list[Box]: ...


class FaceScoreScorer:
    def __init__(
        self,
        checkpoint: str | Path,
        med_config: str | Path,
        tokenizer: str | Path,
        device="cpu",
        dtype=torch.float32,
        detector: FaceDetector | str | Path | None = None,
        prompt: str | None = FACE_PROMPT,
        margin: int = 1,
        batch_size: int = 32,
    ):
        """Load the release. `detector`: a detector object, or a path for `make_face_detector`
        (RetinaFace weights, as upstream, run on the CPU as upstream's; or an LBP cascade `.xml`);
        None: the LBP cascade. `prompt=None` scores each face against the caller's prompt instead of
        upstream's fixed text. Every path is checked before anything is read."""
        checkpoint = check_file(checkpoint, "FaceScore checkpoint")
        med_config = check_file(med_config, "FaceScore med_config")
        tokenizer = check_model_dir(tokenizer, "FaceScore tokenizer", marker="tokenizer_config.json")
        if detector is None or isinstance(detector, (str, Path)):
            detector = make_face_detector(detector)
        self.detector = detector
        self.imagereward = ImageRewardScorer.from_release(checkpoint, med_config, tokenizer, device=device, dtype=dtype,
                                                          what="FaceScore checkpoint")
        self.prompt = prompt
        self.margin = margin
        self.batch_size = batch_size

    def score_faces(self, prompts: list[str] | None, face_crops: list[Image.Image]) -> np.ndarray:
        """Raw FaceScore of each face crop (no detection). `prompts` is only read when the scorer was
        made with `prompt=None`; otherwise it may be None. -> (N,) float64"""
        if self.prompt is None:
            if prompts is None:
                raise ValueError("this FaceScoreScorer scores against the given prompts: pass one per face")
            check_pairs(prompts, face_crops)
            texts = list(prompts)
        else:
            if prompts is not None:
                check_pairs(prompts, face_crops)
            texts = [self.prompt] * len(face_crops)
        n = self.batch_size
        # FaceScore's reward is the head's raw output: ImageReward's normalisation is not applied.
        out = [self.imagereward.rewards(texts[i : i + n], face_crops[i : i + n], normalise=False).double().cpu()
               for i in range(0, len(face_crops), n)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float64)

    def faces(self, image: Image.Image) -> tuple[list[Box], list[Image.Image]]:
        """Detected boxes that leave a non-empty crop, and their crops."""
        boxes = [
            b for b in self.detector.detect(image)
            if (w := crop_box(b, image.width, image.height, self.margin))[2] > w[0] and w[3] > w[1]
        ]
        return boxes, crop_faces(image, boxes, margin=self.margin)

    def score(self, prompts: list[str], images: list[Image.Image]) -> list[dict]:
        """Per image: {"facescore": mean over faces | None, "faces": n, "reason": "" | "no face detected",
        "face_scores": [per face], "boxes": [(x0, y0, x1, y1) per face]}. All faces in one batched pass."""
        check_pairs(prompts, images)
        per_image = [self.faces(image) for image in images]
        all_crops = [crop for _, crops in per_image for crop in crops]
        all_prompts = [p for p, (_, crops) in zip(prompts, per_image) for _ in crops]
        scores = self.score_faces(all_prompts, all_crops).tolist()
        results, k = [], 0
        for boxes, crops in per_image:
            face_scores, k = scores[k : k + len(crops)], k + len(crops)
            results.append({
                "facescore": float(np.mean(face_scores)) if face_scores else None,
                "faces": len(face_scores),
                "reason": "" if face_scores else NO_FACE,
                "face_scores": face_scores,
                "boxes": [tuple(float(v) for v in b) for b in boxes],
            })
        return results
