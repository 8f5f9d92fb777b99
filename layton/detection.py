"""GenEval's object detector: transformers' Mask2Former (COCO instance) producing `Detection`s.

GenEval runs mmdet's Mask2Former Swin-S (COCO instance segmentation); the design lets the project run
the same network through transformers (`facebook/mask2former-swin-small-coco-instance`, or the tiny
model of `layton.zoo.mask2former`). `Mask2FormerDetector(path).detect(images)` returns, per image, the
instances above a low score threshold with GenEval's class names, pixel boxes and boolean masks;
GenEval's own rules (threshold 0.3 / 0.9, 16 per class, ...) are applied afterwards by
`layton.geneval.evaluate`.

How the outputs line up with mmdet's (which GenEval used):
- scores: both take the top `num_queries` (query, class) pairs of the softmax class scores (no-object
  column dropped) and multiply each by the mean sigmoid mask probability inside its binary mask
  (mask logit > 0); transformers rounds the score to 6 decimals.
- boxes: mmdet derives them from the masks (`mask2bbox`: x0 = first mask column, x1 = last + 1);
  so does `mask_to_box` here.
- masks: transformers binarises the mask logits at 384 x 384 and resizes the binary mask to the image
  size (nearest); mmdet resizes the logits bilinearly to the image size before binarising. Mask
  edges (and so boxes) can differ by a few pixels; scores do not depend on this.
- labels: transformers' COCO names are mmdet's; GenEval renamed three ("mouse" -> "computer mouse",
  "remote" -> "tv remote", "keyboard" -> "computer keyboard"), mapped here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from layton.geneval import COCO_TO_GENEVAL, GENEVAL_CLASSES, Detection
from layton.model_files import check_model_dir

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def geneval_label(name: str) -> str:
    """GenEval's class name for a detector label."""
    return COCO_TO_GENEVAL.get(name, name)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight box of a boolean mask, as mmdet's mask2bbox: (x_min, y_min, x_max + 1, y_max + 1)."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(cols) or not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


class Mask2FormerDetector:
    """Mask2Former instance segmentation from a `save_pretrained` directory (or a cached hub id).

    `threshold` is transformers' score cut (kept when score >= threshold); it must not exceed
    GenEval's 0.3 so that GenEval's own thresholds decide (0.0 keeps every query, like mmdet's
    top-100 output). Masks are binarised at logit 0, as in both transformers and mmdet (transformers
    ignores its `mask_threshold` argument for instances). `device` and `dtype` place the model;
    post-processing runs in float32. `batch_size` images of one size go through the model at once.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 threshold: float = 0.3, batch_size: int = 8):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        if not 0.0 <= threshold <= 0.3:
            raise ValueError(f"detector threshold {threshold} must lie in [0, 0.3]: GenEval applies its own "
                             "0.3 (0.9 for counting) afterwards and needs every detection above it")
        directory = check_model_dir(path, "geneval.detector")
        check_model_dir(directory, "geneval.detector", marker="preprocessor_config.json")
        self.path = directory
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.threshold = threshold
        self.batch_size = batch_size
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(directory, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(directory)
        id2label = self.model.config.id2label
        self.labels = [geneval_label(id2label[i]) for i in range(len(id2label))]
        unknown = sorted(set(self.labels) - set(GENEVAL_CLASSES))
        if unknown:
            logger.warning("%s: labels %s are not GenEval classes; GenEval prompts never ask for them",
                           directory, unknown)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Per image, its instances (best score first) with GenEval labels, boxes and masks."""
        results: list[list[Detection] | None] = [None] * len(images)
        # Images of one size share a batch: mixed sizes would be padded, which the post-processing ignores.
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for (width, height), indices in by_size.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, dets in zip(chunk, self._detect_batch([images[i] for i in chunk], height, width)):
                    results[i] = dets
        return results  # type: ignore[return-value]

    def _detect_batch(self, images: list[Image.Image], height: int, width: int) -> list[list[Detection]]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        out = self.model(pixel_values=pixel_values)
        logits = SimpleNamespace(class_queries_logits=out.class_queries_logits.float(),
                                 masks_queries_logits=out.masks_queries_logits.float())
        processed = self.processor.post_process_instance_segmentation(
            logits, threshold=self.threshold, target_sizes=[(height, width)] * len(images), return_binary_maps=True)
        batch = []
        for result in processed:
            segments = result["segments_info"]
            if not segments:  # no instance: `segmentation` is then a label map, not binary masks
                batch.append([])
                continue
            masks = result["segmentation"].bool().cpu().numpy()
            dets = []
            for seg, mask in zip(segments, masks):
                dets.append(Detection(label=self.labels[seg["label_id"]], score=float(seg["score"]),
                                      box=mask_to_box(mask), mask=mask))
            dets.sort(key=lambda d: -d.score)
            batch.append(dets)
        return batch
