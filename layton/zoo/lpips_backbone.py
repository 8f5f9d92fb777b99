"""Zoo stand-in for LPIPS's torchvision backbone file: real architecture, seeded random weights.

LPIPS (layton.perceptual) reads its backbone from a torchvision release file by path. The zoo
writes one with torchvision's own modules and key names, `features.N.{weight,bias}` only (what
LPIPS uses), under the release file name. Sizes are the real ones (AlexNet features are 2.5M
parameters, VGG16 features 14.7M); only the values are random, so the metric is not perceptual.

    net      release file                     tiny file
    alex     alexnet-owt-7be5be79.pth         same name, features.* only, seeded random
    vgg      vgg16-397923af.pth               same name, features.* only, seeded random
    squeeze  squeezenet1_1-b8a52dc0.pth       same name, features.* only, seeded random
"""

from __future__ import annotations

from pathlib import Path

import torch

from layton.perceptual import TORCHVISION_RELEASE_FILES as RELEASE_FILES


def _features(net: str) -> torch.nn.Module:
    from torchvision import models as tv

    if net == "alex":
        return tv.alexnet(weights=None).features
    if net == "squeeze":
        return tv.squeezenet1_1(weights=None).features
    if net == "vgg":
        # VGG16's features alone: building tv.vgg16() would also initialise its 120M-parameter classifier.
        features = tv.vgg.make_layers(tv.vgg.cfgs["D"])
        for m in features.modules():  # torchvision VGG's own initialisation
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)
        return features
    raise ValueError(f"net must be one of {sorted(RELEASE_FILES)}, got {net!r}")


def write_tiny_lpips_backbone(out_dir: Path, net: str = "alex", seed: int = 0) -> Path:
    """Write a seeded random torchvision `features.*` state dict for `net`; return the file path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = _features(net)
    state = {f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}
    path = out_dir / RELEASE_FILES[net]
    torch.save(state, path)
    return path
