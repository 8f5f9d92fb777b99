"""Zoo stand-in for pytorch-fid's FID Inception weights: the real architecture, seeded random weights.

`layton.fid.FIDInception.from_file` reads `pt_inception-2015-12-05-6726825d.pth`, a plain state dict
of pytorch-fid's module tree. The FID Inception has no width setting, so the tiny file is the whole
network with random values; only the values differ from the release:

                      real (pytorch-fid release)              tiny (this module)
    file name         pt_inception-2015-12-05-6726825d.pth    same
    format            plain state dict (torch.save)           same
    architecture      torchvision Inception3, 1008 classes,   same (built by layton.fid's
                      FIDInceptionA/C/E_1/E_2 blocks          build_fid_inception_tree)
    parameters        ~23.9M incl. fc 2048×1008, ~95 MB        same
    conv weights      TF inception-2015-12-05, ported          seeded normal clipped at ±2σ, σ = 1/√fan_in
    BatchNorm stats   from TF training                        calibrated: one train-mode pass over
                                                              a seeded synthetic image, 299²
    features          ImageNet-semantic pool3 features,        finite, O(1) on photographs (mean ~2),
                      FIDs comparable with papers             larger on white noise (~20); no meaning,
                                                              FID values comparable with nothing

BatchNorm calibration: with momentum 1 one forward pass in train mode sets every BN's running mean and
variance to the batch statistics of its input (each layer sees already-normalised inputs, so a single
pass suffices); in eval mode the activations then stay O(1) through all 94 convolutions on images like it, instead
of growing or vanishing layer by layer, and the 2048 features are finite and differ between images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from layton.fid import RELEASE_FILE, build_fid_inception_tree

CALIBRATION_IMAGES = 1  # each costs one 299² forward (~0.5 s on one core); 64+ values per channel even at 8×8


def _calibration_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in (-1, 1) with some of a photograph's statistics: smooth multi-scale noise at
    full contrast, flat patches with sharp edges, and a little pixel noise. (Calibrating on smooth
    noise alone left photographs' pool3 features ~30x larger than the calibration image's.)"""
    x = torch.zeros(n, 3, size, size)
    for cells, weight in ((2, 1.0), (4, 1.0), (16, 0.5), (64, 0.25)):
        x += weight * F.interpolate(torch.randn(n, 3, cells, cells, generator=generator), size=(size, size),
                                    mode="bicubic", align_corners=False)
    x = x / x.std()
    cells = 12
    flat = F.interpolate(torch.randn(n, 3, cells, cells, generator=generator), size=(size, size), mode="nearest")
    keep = F.interpolate((torch.rand(n, 1, cells, cells, generator=generator) > 0.5).float(), size=(size, size),
                         mode="nearest").bool()
    x = torch.where(keep, x, flat) + 0.1 * torch.randn(n, 3, size, size, generator=generator)
    return torch.tanh(x)


def build_tiny_fid_inception(seed: int = 0) -> nn.Module:
    """The FID Inception tree with seeded random weights and calibrated BatchNorm statistics (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # skip torchvision's default init, every value is set below
        inception = build_fid_inception_tree()
    inception = inception.to_empty(device="cpu")
    with torch.no_grad():
        for m in inception.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g).clamp_(-2, 2) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.reset_running_stats()
                m.momentum = 1.0  # running stats := this batch's
        inception.train()
        x = _calibration_images(CALIBRATION_IMAGES, 299, g)
        for name, child in inception.named_children():  # the pool3 path of Inception3.forward
            if name in ("avgpool", "dropout", "fc"):
                break
            x = child(x)
        for m in inception.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.zero_()
    return inception.eval()


def write_tiny_inception(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `pt_inception-2015-12-05-6726825d.pth` (full FID Inception, random weights); return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in build_tiny_fid_inception(seed).state_dict().items()}
    path = out_dir / RELEASE_FILE
    torch.save(state, path)
    return path


__all__ = ["build_tiny_fid_inception", "write_tiny_inception"]
