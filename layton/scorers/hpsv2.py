"""HPSv2 (tgxs002/HPSv2) scorer: open_clip ViT-H-14 with the HPSv2 state dict, scored as `hpsv2.img_score`.

Release (what the constructor takes):

    checkpoint              HPS_v2_compressed.pt (v2.0) or HPS_v2.1_compressed.pt (v2.1):
                            torch.save({"state_dict": sd}) of open_clip's ViT-H-14 (read weights_only)
    architecture_or_config  "ViT-H-14" for the release (open_clip's built-in config, as upstream's
                            create_model_and_transforms('ViT-H-14', 'laion2B-s32B-b79K') builds it), or
                            an open_clip config file / directory for the tiny zoo model

Score for one (prompt, image), as `hpsv2/img_score.py::score` computes it:

    image = preprocess_val(image)          HPSv2's vendored open_clip val transform (below)
    text  = get_tokenizer('ViT-H-14')([prompt])      open_clip SimpleTokenizer, 77 tokens
    out   = model(image, text)             open_clip forward: encode_image/encode_text with normalize=True
    score = diagonal(out["image_features"] @ out["text_features"].T)
          = cosine(image, text)            logit_scale is NOT applied (scores are ~0.2-0.3 for real weights)

HPSv2's vendored `image_transform(is_train=False)` differs from open_clip's own in its order: it converts
to a tensor first, then resizes the *tensor* (bicubic, shortest side) and centre-crops, then normalises
(OpenAI mean/std for ViT-H-14 laion2B). `torchvision.transforms.Resize` on tensors antialiases by default
since torchvision 0.17 (before: no antialiasing), which is what this module does explicitly.
Upstream keeps RGBA images as 4 channels (which the 3-channel patch embedding cannot take); here every
image is converted to RGB. Upstream runs under `torch.cuda.amp.autocast()` with fp32 weights
(`precision='amp'`); `dtype=torch.float16` reproduces that, the default float32 runs without autocast.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from layton.open_clip_io import load_open_clip
from layton.scorers import check_pairs

HPSV2_ARCHITECTURE = "ViT-H-14"


def hpsv2_val_transform(size, mean, std) -> T.Compose:
    """HPSv2's inference transform: RGB -> tensor -> bicubic resize (shortest side) -> centre crop -> normalise."""
    if isinstance(size, (tuple, list)) and size[0] == size[1]:
        size = size[0]  # square: resize the shortest side, as upstream does
    return T.Compose([
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        T.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(size),
        T.Normalize(mean=mean, std=std),
    ])


class HPSv2Scorer:
    def __init__(
        self,
        checkpoint: str | Path,
        architecture_or_config: str | Path = HPSV2_ARCHITECTURE,
        device="cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        # Weights stay float32 (upstream's precision='amp'); `dtype` is the autocast dtype.
        self.model, _, self.tokenizer = load_open_clip(architecture_or_config, weights=checkpoint, device=self.device)
        cfg = self.model.visual.preprocess_cfg
        self.preprocess = hpsv2_val_transform(cfg["size"], cfg["mean"], cfg["std"])

    @torch.inference_mode()
    def score(self, prompts: list[str], images: list[Image.Image]) -> list[float]:
        """One HPSv2 score per (prompt, image) pair, in one batched forward."""
        if not check_pairs(prompts, images):
            return []
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
            # Upstream's formula; the diagonal pairs image i with prompt i (same numbers as one pair at a time).
            scores = torch.diagonal(image_features @ text_features.T)
        return scores.float().cpu().tolist()
