"""Tiny Mask2Former (COCO instance): GenEval's object detector, with the real transformers class.

GenEval detects objects with Mask2Former Swin-S trained on COCO instances (mmdet's
mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco); the project runs the same network through
transformers (`facebook/mask2former-swin-small-coco-instance`). `write_tiny_mask2former(dir)` writes a
directory in that release's layout (config.json with the 80 COCO instance labels, model.safetensors,
preprocessor_config.json), which `Mask2FormerForUniversalSegmentation.from_pretrained(dir)` and
`AutoImageProcessor.from_pretrained(dir)` load as they load the release. Only sizes differ:

    part               real (swin-small-coco-instance)            tiny
    backbone           Swin-S: embed 96, depths (2, 2, 18, 2),    Swin: embed 16, depths (1, 1, 1, 1),
                       heads (3, 6, 12, 24), window 7             heads (1, 1, 2, 2), window 7
    pixel decoder      256 channels, 6 deformable-attention       32 channels, 1 layer, FFN 64
                       layers, FFN 1024
    mask features      256                                        32
    transformer dec.   hidden 256, 10 layers, 8 heads, FFN 2048   hidden 32, 2 layers, 2 heads, FFN 64
    queries            100                                        20
    classes            80 COCO instance labels (+ no-object)      the same 80 labels
    image processor    384 x 384 input, ImageNet mean/std,        the same
                       size_divisor 32

Kept because the detector's arithmetic depends on them: the Swin backbone's four stages at strides
4-32 (no pretrained or timm backbone, nothing to download), multi-scale deformable attention over
three levels, masked attention in the decoder, 80 classes + "no object" in the class head, and the
release's image processor (384 x 384, which transformers' instance post-processing assumes). The
query count is cut to 20 because the post-processing loops over every query at the image's size:
with 100 queries it alone takes longer than the network. One detect on a 256 x 256 image takes
well under a second on one CPU core.

The labels are transformers' COCO instance names (`layton.geneval.COCO_INSTANCE_LABELS`, mmdet's
names: "mouse", "remote", "keyboard", ...); `layton.detection` maps them to GenEval's class names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layton.geneval import COCO_INSTANCE_LABELS

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=7, hidden=32, num_queries=20)
IMAGE_SIZE = 384  # the release processor's fixed input size


def build_tiny_mask2former(seed: int = 0):
    """The tiny model and its image processor in memory (CPU, float32). Same seed -> same weights."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=TINY["embed_dim"],
        depths=list(TINY["depths"]),
        num_heads=list(TINY["num_heads"]),
        window_size=TINY["window_size"],
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    h = TINY["hidden"]
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=h,
        mask_feature_size=h,
        hidden_dim=h,
        encoder_feedforward_dim=2 * h,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=2 * h,
        num_queries=TINY["num_queries"],
        feature_strides=[4, 8, 16, 32],
        common_stride=4,
        ignore_value=255,
        id2label=dict(enumerate(COCO_INSTANCE_LABELS)),
        label2id={name: i for i, name in enumerate(COCO_INSTANCE_LABELS)},
    )
    config.architectures = ["Mask2FormerForUniversalSegmentation"]
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Mask2FormerImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        size_divisor=32,
        resample=2,  # bilinear
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        ignore_index=255,
        do_reduce_labels=False,
        num_labels=len(COCO_INSTANCE_LABELS),
    )
    return model, processor


def write_tiny_mask2former(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny detector in the layout of facebook/mask2former-swin-small-coco-instance."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_mask2former(seed)
    model.save_pretrained(out)  # transformers 5 writes model.safetensors
    processor.save_pretrained(out)
    return out
