"""GenEval's colour classifier: open_clip ViT-L-14 (OpenAI weights) zero-shot on the masked object crop.

What `geneval/evaluation/evaluate_images.py` does for an object whose colour a prompt asks for
(with its defaults `bgcolor=#999`, `crop=1`, and clip_benchmark's zero-shot helpers):

    image   = the generated image, RGB
    blank   = a plain image of the same size filled with #999 (153, 153, 153)
    if the detection has a segmentation mask (H x W bool):
        image = Image.composite(image, blank, mask)      object pixels kept, everything else gray
    crop    = image.crop(box)                            the detector's box, no padding (PIL rounds it)
    x       = open_clip's inference transform of the model (resize shortest side, bicubic, centre crop,
              RGB, OpenAI mean/std)
    classifier, per colour c (cached per object name):
        texts = ["a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object"]
        w_c   = normalize(mean(normalize(encode_text(texts))))
    logits  = 100 * normalize(encode_image(x)) @ [w_c ...]
    colour  = colours[argmax(logits)]

GenEval always classifies among all ten `GENEVAL_COLORS`, whatever colour the prompt names; callers
that follow it pass that list. Upstream runs under CUDA autocast (fp16); this module computes in the
model's float32, which can flip near-ties only.

Real weights: a local open_clip hub-style directory of ViT-L-14 with QuickGELU (the OpenAI weights, e.g.
a snapshot of `timm/vit_large_patch14_clip_224.openai` with its open_clip files), or
`ClipColourClassifier("ViT-L-14-quickgelu", weights=".../open_clip_pytorch_model.bin")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from layton.geneval import COLOR_BACKGROUND, COLOR_TEMPLATES, GENEVAL_COLORS, colour_crop, colour_prompts
from layton.open_clip_io import load_open_clip




class Detection(Protocol):
    label: str
    box: Sequence[float]  # (x0, y0, x1, y1) in pixels
    mask: np.ndarray | None  # (H, W) bool, the whole image's size


class ClipColourClassifier:
    def __init__(self, model_path: str | Path, device="cpu", *, weights: str | Path | None = None,
                 background: str = COLOR_BACKGROUND):
        self.device = torch.device(device)
        self.background = background
        self.model, self.preprocess, self.tokenizer = load_open_clip(model_path, weights=weights, device=self.device)
        self._text_cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    @torch.inference_mode()
    def text_classifier(self, label: str, colors: Sequence[str]) -> torch.Tensor:
        """(D, C): one unit vector per colour, the normalised mean of its normalised template embeddings."""
        key = (label, tuple(colors))
        if key not in self._text_cache:
            if not colors:
                raise ValueError("no candidate colours given")
            texts = [p for c in colors for p in colour_prompts(label, c)]
            emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
            emb = F.normalize(emb, dim=-1).view(len(colors), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._text_cache[key] = F.normalize(emb, dim=-1).T.contiguous()
        return self._text_cache[key]

    @torch.inference_mode()
    def image_embeddings(self, image: Image.Image, detections: Sequence[Detection]) -> torch.Tensor:
        """(N, D) unit vectors of the detections' masked crops."""
        crops = [colour_crop(image, d, self.background) for d in detections]
        pixels = torch.stack([self.preprocess(c) for c in crops]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.inference_mode()
    def logits(self, image: Image.Image, detections: Sequence[Detection], colors: Sequence[str]) -> torch.Tensor:
        """(N, C) = 100 * cos(crop, colour), all detections of one object name in one batch."""
        labels = {d.label for d in detections}
        if len(labels) != 1:
            raise ValueError(f"detections of one object name expected, got {sorted(labels)}")
        return 100.0 * self.image_embeddings(image, detections) @ self.text_classifier(labels.pop(), colors)

    def classify(self, image: Image.Image, detections: Sequence[Detection],
                 colors: Sequence[str] = GENEVAL_COLORS) -> list[str]:
        """The colour of each detection (all of one object name), batched as GenEval's DataLoader does."""
        if not detections:
            return []
        return [colors[i] for i in self.logits(image, detections, colors).argmax(dim=1).tolist()]

    def __call__(self, image: Image.Image, detection: Detection,
                 candidate_colors: Sequence[str] = GENEVAL_COLORS) -> str:
        """The candidate colour whose text embedding best matches the detection's masked crop."""
        return self.classify(image, [detection], list(candidate_colors))[0]
