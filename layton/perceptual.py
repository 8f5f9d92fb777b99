"""LPIPS for the stage-2 perceptual loss, with its backbone read from a local torchvision file.

`lpips.LPIPS` ships its calibrated linear layers inside the package but fetches the ImageNet
backbone (VGG16 / AlexNet / SqueezeNet 1.1) from the torchvision hub when it is built, which a
cluster node without a hub cannot do and which would hide where the weights came from. Here the
backbone is built random (`pnet_rand=True`, nothing downloaded) and then filled from the torchvision
release file named in the config:

    net      torchvision release file          keys (torchvision)     lpips module
    vgg      vgg16-397923af.pth                features.N.{weight,bias}  net.sliceK.N
    alex     alexnet-owt-7be5be79.pth          features.N.{weight,bias}  net.sliceK.N
    squeeze  squeezenet1_1-b8a52dc0.pth        features.N.<fire>.*       net.sliceK.N.<fire>.*

lpips keeps torchvision's `features` index N as the child name inside each slice, so the mapping
is by index. The file may be the whole torchvision state dict (classifier keys are ignored) or
its `features.*` part; every backbone tensor must be found in it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from layton.model_files import ModelFileError, load_torch_file

# torchvision's release file of each backbone (download.pytorch.org/models/<name>)
TORCHVISION_RELEASE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
NETS = tuple(TORCHVISION_RELEASE_FILES)


def build_lpips(
    net: str = "vgg", backbone_weights: str | Path | None = None, *, random_backbone: bool = False
) -> torch.nn.Module:
    """A frozen, eval-mode `lpips.LPIPS(net)`: linear layers from the lpips package, backbone from
    `backbone_weights` (a torchvision release state dict read with `weights_only=True`).

    `backbone_weights=None` is accepted only with `random_backbone=True` (tests); a random backbone
    gives a metric with no perceptual meaning.
    """
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
    if backbone_weights is None and not random_backbone:
        raise ValueError(
            f"LPIPS needs the path of its {net} backbone weights (torchvision's {TORCHVISION_RELEASE_FILES[net]}); "
            "nothing is downloaded. Pass random_backbone=True only for tests."
        )
    if backbone_weights is not None and random_backbone:
        raise ValueError("LPIPS: give either backbone_weights or random_backbone=True, not both")
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if backbone_weights is not None:
        load_lpips_backbone(model, backbone_weights)
    return model.eval().requires_grad_(False)


def load_lpips_backbone(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a torchvision `features.*` state dict into `model.net` (an lpips backbone) in place."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"LPIPS backbone: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch_file(path, "LPIPS backbone")
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS backbone {path}: expected a state dict, got {type(state).__name__}")

    # torchvision's features index -> the lpips slice that holds it ("0" -> "net.slice1.0")
    where = {
        child: f"net.{slice_name}.{child}"
        for slice_name, block in model.net.named_children()
        for child, _ in block.named_children()
    }
    mapped, unknown = {}, []
    for key, tensor in state.items():
        if not key.startswith("features."):
            continue  # classifier.*: not part of the LPIPS backbone
        index, _, rest = key.removeprefix("features.").partition(".")
        if index in where:
            mapped[f"{where[index]}.{rest}"] = tensor
        else:
            unknown.append(key)
    if not mapped:
        raise ValueError(f"LPIPS backbone {path}: no torchvision 'features.*' tensors (keys: {list(state)[:3]})")

    wanted = {k for k in model.state_dict() if k.startswith("net.")}
    missing = sorted(wanted - mapped.keys())
    extra = sorted(mapped.keys() - wanted) + unknown
    if missing or extra:
        raise ValueError(
            f"LPIPS backbone {path} does not fit lpips' {model.pnet_type} backbone: "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as e:  # shape mismatches, e.g. a VGG file for AlexNet
        raise ValueError(f"LPIPS backbone {path} does not fit lpips' {model.pnet_type} backbone: {e}") from None


__all__ = ["NETS", "TORCHVISION_RELEASE_FILES", "build_lpips", "load_lpips_backbone"]
