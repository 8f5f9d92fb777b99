"""Tiny FaceScore release: FaceScore's file names, ImageReward's format and tiny sizes, own seeded weights.

    out_dir/FS_model.pt        torch.save(state_dict), ImageReward's key names (upstream loads it into
                               `ImageReward.ImageReward`), weights from a seed of their own
    out_dir/med_config.json    the tiny ImageReward's BertConfig JSON
    out_dir/tokenizer/         the tiny BLIP tokenizer (upstream takes bert-base-uncased from the hub)

`out_dir` plays the part of the release's `FaceScore_model/` folder.
"""

from __future__ import annotations

from pathlib import Path

from layton.zoo.imagereward import write_tiny_imagereward

CHECKPOINT = "FS_model.pt"
SEED_OFFSET = 0xFACE  # FaceScore's weights never coincide with the tiny ImageReward's of the same zoo seed


def write_tiny_facescore(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny FaceScore release; returns {'checkpoint', 'med_config', 'tokenizer'}."""
    out_dir = Path(out_dir)
    paths = write_tiny_imagereward(out_dir, seed=seed + SEED_OFFSET)
    checkpoint = paths["checkpoint"].replace(out_dir / CHECKPOINT)
    return {"checkpoint": checkpoint, "med_config": paths["med_config"], "tokenizer": paths["tokenizer"]}
