"""Shards of real photographs (scikit-image) and tokenizer training configs on the tiny zoo."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import apply_overrides

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def encoded(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_photo_shards(out: Path, *, odd: bool = False) -> Path:
    """Six colour photographs as JPEG shards; `odd` adds a grayscale, an RGBA, a tiny and a corrupt one."""
    from pipelines.shards import write_image_shards

    samples = [(f"photo{i}", name, encoded(Image.fromarray(photo(name)).convert("RGB")), "jpg") for i, name in enumerate(PHOTOS)]
    if odd:
        rgba = Image.fromarray(photo("astronaut")).convert("RGBA").resize((96, 96))
        samples += [
            ("gray", "camera", encoded(Image.fromarray(photo("camera"))), "jpg"),
            ("rgba", "astronaut with alpha", encoded(rgba, "PNG"), "png"),
            ("tiny", "a 20x12 image", encoded(Image.fromarray(photo("coffee")).resize((20, 12))), "jpg"),
            ("corrupt", "truncated jpeg", encoded(Image.fromarray(photo("rocket")))[:300], "jpg"),
        ]
    write_image_shards(out, samples, shard_size=4)
    return out


def tokenizer_config_dict(zoo: Path, shards: Path, storage: Path, **overrides) -> dict:
    """The demo tokenizer config pointed at a zoo, shards and a storage directory."""
    cfg = yaml.safe_load((ROOT / "workflows" / "tokenizer_demo.yaml").read_text())
    cfg["model"]["vq"] = str(zoo / "llamagen_vq" / "vq_ds16_t2i.pt")
    cfg["model"]["sdxl"] = str(zoo / "sdxl")
    cfg["data"]["shards"] = [str(shards)]
    cfg["run"]["storage_path"] = str(storage)
    cfg["stage2"]["consistency"]["lora"] = str(zoo / "consistency" / "Hyper-SDXL-1step-lora.safetensors")
    cfg["stage2"]["lpips"]["backbone"] = str(zoo / "lpips" / "alexnet-owt-7be5be79.pth")
    cfg["ray"]["dashboard"] = False
    return apply_overrides(cfg, overrides)


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    return write_photo_shards(tmp_path_factory.mktemp("photo_shards"))
