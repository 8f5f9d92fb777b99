"""Image–text scorers loaded from their official release files (ImageReward, MPS)."""

from __future__ import annotations


def check_pairs(prompts: list, images: list) -> int:
    """Scorers take (prompt, image) pairs: the two lists must be equally long. Returns the count."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    return len(prompts)
