"""Device and dtype choice for model-holding actors."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` uses CUDA when this process can see a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but this process sees no GPU")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The configured dtype; half precision on CPU is slow and poorly supported, so CPU runs float32."""
    return _DTYPES[name] if device.type == "cuda" else torch.float32
