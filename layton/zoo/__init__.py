"""Tiny models with the upstream architectures, written in the upstream release formats.

`write_tiny_zoo(DIR)` is what `layton models tiny DIR` runs; the demo and the tests load the
result with the same loaders that load real weights.
"""

from __future__ import annotations

import time
from pathlib import Path


def write_tiny_zoo(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Every tiny model, each in its own sub-directory. Returns the paths a config names."""
    from layton.zoo.flux import write_tiny_flux
    from layton.zoo.imagereward import write_tiny_imagereward
    from layton.zoo.mps import write_tiny_mps
    from layton.zoo.qwen2vl import write_tiny_qwen2vl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"flux": write_tiny_flux(out / "flux", seed=seed)}
    paths |= {f"imagereward_{k}": v for k, v in write_tiny_imagereward(out / "imagereward", seed=seed).items()}
    paths |= {f"mps_{k}": v for k, v in write_tiny_mps(out / "mps", seed=seed).items()}
    paths["qwen2vl"] = write_tiny_qwen2vl(out / "qwen2vl", seed=seed)
    (out / "ZOO_COMPLETE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return paths


def zoo_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "ZOO_COMPLETE").exists()
