"""open_clip-based evaluation scorers: GenEval's colour classifier and HPSv2, on tiny zoo models.

The references below are restated from upstream with open_clip's public API and PIL/torchvision only
(no project module): GenEval's masked crop + clip_benchmark's zero-shot classifier, and HPSv2's
`img_score.score` loop (its vendored val transform, `model(image, text)`, diagonal of the product).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from layton.geneval import GENEVAL_COLORS, colour_crop
from layton.model_files import ModelFileError
from layton.open_clip_io import load_open_clip
from layton.scorers.clip_colour import ClipColourClassifier
from layton.scorers.hpsv2 import HPSv2Scorer
from layton.zoo.open_clip_models import (
    CONFIG_NAME,
    HPSV2_CHECKPOINT,
    WEIGHTS_NAME,
    write_tiny_hpsv2,
    write_tiny_open_clip,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "a photo of a cat",
    "a cup of coffee on a wooden table",
    "an astronaut in a white suit",
    "a rocket in the sky at sunset, highly detailed, cinematic lighting, trending on artstation, sharp focus, "
    "depth of field, bokeh, oil painting by several artists, 8k, colorful and vivid, " * 3,  # > 77 tokens
    "zzqx unknown wordz",
]


@dataclass
class Det:
    label: str
    box: tuple
    mask: np.ndarray | None = None


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("open_clip")
    return {
        "vit-l-14": write_tiny_open_clip(out / "vit-l-14", "vit-l-14"),
        "vit-h-14": write_tiny_open_clip(out / "vit-h-14", "vit-h-14"),
        "hpsv2": write_tiny_hpsv2(out / "hpsv2"),
    }


@pytest.fixture(scope="module")
def images():
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea")]
    rng = np.random.default_rng(0)
    odd = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))  # wide, smaller than the model input
    gray = Image.fromarray(rng.integers(0, 256, (120, 70), dtype=np.uint8))  # mode "L", tall
    return photos + [odd, gray]


@pytest.fixture(scope="module")
def colour(zoo):
    return ClipColourClassifier(zoo["vit-l-14"])


# ----------------------------------------------------------------- zoo and loader


def test_tiny_models_are_open_clip_releases(zoo):
    import open_clip
    from open_clip.transformer import QuickGELU

    for kind, embed, quick in (("vit-l-14", 32, True), ("vit-h-14", 40, False)):
        directory = zoo[kind]
        assert {p.name for p in directory.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
        # open_clip itself reads the directory (its own format), and our loader gives the same model
        ref, _ = open_clip.create_model_from_pretrained(f"local-dir:{directory}")
        model, preprocess, tokenizer = load_open_clip(directory)
        assert type(model) is open_clip.CLIP and model.text_projection.shape[1] == embed
        assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU) is quick
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
        assert tuple(model.visual.preprocess_cfg["mean"]) == (0.48145466, 0.4578275, 0.40821073)
        assert preprocess(Image.new("RGB", (90, 40))).shape == (3, 56, 56)
        assert isinstance(tokenizer, open_clip.SimpleTokenizer) and tokenizer(["a red dog"]).shape == (1, 77)
    hps = zoo["hpsv2"]
    assert {p.name for p in hps.iterdir()} == {CONFIG_NAME, HPSV2_CHECKPOINT}
    assert list(torch.load(hps / HPSV2_CHECKPOINT, weights_only=True)) == ["state_dict"]


def test_writers_are_deterministic(zoo, tmp_path):
    again = write_tiny_open_clip(tmp_path / "a", "vit-l-14", seed=0)
    other = write_tiny_open_clip(tmp_path / "b", "vit-l-14", seed=1)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (again / name).read_bytes() == (zoo["vit-l-14"] / name).read_bytes()
    assert (other / WEIGHTS_NAME).read_bytes() != (again / WEIGHTS_NAME).read_bytes()
    hps = write_tiny_hpsv2(tmp_path / "hps", seed=0)
    assert (hps / HPSV2_CHECKPOINT).read_bytes() == (zoo["hpsv2"] / HPSV2_CHECKPOINT).read_bytes()


def test_loader_reads_a_bin_snapshot(zoo, tmp_path):
    """Hub snapshots (laion/CLIP-ViT-*) often carry open_clip_pytorch_model.bin only."""
    from safetensors.torch import load_file

    snap = tmp_path / "snapshot"
    snap.mkdir()
    shutil.copy(zoo["vit-h-14"] / CONFIG_NAME, snap / CONFIG_NAME)
    sd = load_file(str(zoo["vit-h-14"] / WEIGHTS_NAME))
    torch.save(sd, snap / "open_clip_pytorch_model.bin")
    model, _, _ = load_open_clip(snap)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_missing_and_wrong_files(zoo, tmp_path):
    with pytest.raises(ModelFileError, match="nowhere"):
        load_open_clip(tmp_path / "nowhere")
    with pytest.raises(ModelFileError, match="nowhere"):
        ClipColourClassifier(tmp_path / "nowhere")
    bare = tmp_path / "config_only"
    bare.mkdir()
    shutil.copy(zoo["vit-l-14"] / CONFIG_NAME, bare / CONFIG_NAME)
    with pytest.raises(ModelFileError, match="config_only.*no weights"):
        load_open_clip(bare)
    with pytest.raises(ModelFileError, match="nowhere.pt"):
        HPSv2Scorer(tmp_path / "nowhere.pt", zoo["hpsv2"] / CONFIG_NAME)
    with pytest.raises(ModelFileError, match="noconfig"):
        HPSv2Scorer(zoo["hpsv2"] / HPSV2_CHECKPOINT, tmp_path / "noconfig" / CONFIG_NAME)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_open_clip("ViT-Q-99", weights=zoo["hpsv2"] / HPSV2_CHECKPOINT)
    with pytest.raises(ValueError, match=HPSV2_CHECKPOINT):  # ViT-H weights into the ViT-L architecture
        load_open_clip(zoo["vit-l-14"], weights=zoo["hpsv2"] / HPSV2_CHECKPOINT)


# ----------------------------------------------------------------- HPSv2


def _hpsv2_reference(directory, prompts, images):
    """`hpsv2.img_score.score`, one (prompt, image) at a time, with open_clip and torchvision only."""
    import open_clip
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{directory}", output_dict=True)
    checkpoint = torch.load(directory / HPSV2_CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    size = model.visual.image_size[0]
    preprocess_val = Compose([  # HPSv2's vendored open_clip image_transform(is_train=False)
        lambda im: im.convert("RGB"), ToTensor(),
        Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
        Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    ])
    result = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            result.append(float(torch.diagonal(logits_per_image)[0]))
    return result


def test_hpsv2_matches_img_score(zoo, images):
    scorer = HPSv2Scorer(zoo["hpsv2"] / HPSV2_CHECKPOINT, zoo["hpsv2"])
    prompts = PROMPTS[: len(images)]
    scores = scorer.score(prompts, images)
    reference = _hpsv2_reference(zoo["hpsv2"], prompts, images)
    np.testing.assert_allclose(scores, reference, atol=1e-5, rtol=0)
    assert all(abs(s) <= 1 for s in scores)  # cosine, no logit_scale
    assert len(set(np.round(scores, 6))) == len(scores)  # the pairs are told apart
    assert scorer.score(prompts[1:2], images[1:2]) == pytest.approx(scores[1:2], abs=1e-6)
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(prompts, images[:2])


def test_hpsv2_reads_a_half_precision_release(zoo, tmp_path, images):
    """A release may store float16 tensors; they load into the float32 model as upstream's load_state_dict does."""
    sd = torch.load(zoo["hpsv2"] / HPSV2_CHECKPOINT, weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v.half() for k, v in sd.items()}}, tmp_path / HPSV2_CHECKPOINT)
    half = HPSv2Scorer(tmp_path / HPSV2_CHECKPOINT, zoo["hpsv2"] / CONFIG_NAME).score(PROMPTS[:2], images[:2])
    full = HPSv2Scorer(zoo["hpsv2"] / HPSV2_CHECKPOINT, zoo["hpsv2"] / CONFIG_NAME).score(PROMPTS[:2], images[:2])
    np.testing.assert_allclose(half, full, atol=2e-2)


# ----------------------------------------------------------------- GenEval colour classifier


def _geneval_reference(directory, image, detections, classname):
    """GenEval's color_classification with open_clip + clip_benchmark's zero-shot steps restated."""
    import open_clip

    model, transform = open_clip.create_model_from_pretrained(f"local-dir:{directory}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    templates = [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}",
                 "a photo of a {c} object"]
    with torch.no_grad():
        weights = []
        for c in GENEVAL_COLORS:
            emb = F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])), dim=-1).mean(dim=0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)
        rgb = image.convert("RGB")
        blank = Image.new("RGB", rgb.size, color="#999")
        crops = []
        for det in detections:
            im = Image.composite(rgb, blank, Image.fromarray(det.mask)) if det.mask is not None else rgb
            crops.append(transform(im.crop(det.box[:4])))
        features = F.normalize(model.encode_image(torch.stack(crops)), dim=-1)
        logits = 100.0 * features @ classifier
    return logits, [GENEVAL_COLORS[i] for i in logits.argmax(1).tolist()]


def _ellipse_mask(h, w, box):
    yy, xx = np.mgrid[:h, :w]
    cx, cy, rx, ry = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def test_colour_matches_geneval_zero_shot(zoo, colour, images):
    image = images[0]
    boxes = [(100.4, 20.0, 380.6, 300.2), (0, 0, 512, 512), (300, 350, 470, 505)]
    h, w = image.height, image.width
    masks = [_ellipse_mask(h, w, boxes[0]), None, _ellipse_mask(h, w, boxes[2])]  # one detection without a mask
    dets = [Det("person", b, m) for b, m in zip(boxes, masks)]
    ref_logits, ref_colours = _geneval_reference(zoo["vit-l-14"], image, dets, "person")
    torch.testing.assert_close(colour.logits(image, dets, GENEVAL_COLORS), ref_logits, atol=1e-4, rtol=0)
    assert colour.classify(image, dets) == ref_colours
    assert [colour(image, d, list(GENEVAL_COLORS)) for d in dets] == ref_colours


def test_colour_picks_the_best_matching_text(colour, images, monkeypatch):
    image, det = images[1], Det("cup", (50, 40, 300, 260))
    emb = colour.image_embeddings(image, [det])[0]
    colours = ["red", "green", "blue", "white"]
    gen = torch.Generator().manual_seed(0)
    for k in range(len(colours)):
        w = F.normalize(torch.randn(len(colours), emb.numel(), generator=gen), dim=-1)
        w[k] = emb  # colour k's text embedding is the crop's own embedding: cosine 1, the maximum
        monkeypatch.setattr(colour, "text_classifier", lambda label, colors, w=w: w.T)
        assert colour(image, det, colours) == colours[k]
    monkeypatch.undo()
    assert colour(image, det, ["pink", "brown"]) in ("pink", "brown")


def test_colour_caches_text_embeddings(colour, images, monkeypatch):
    calls = []
    encode_text = colour.model.encode_text
    monkeypatch.setattr(colour.model, "encode_text", lambda *a, **k: calls.append(1) or encode_text(*a, **k))
    image, det = images[2], Det("giraffe", (10, 10, 200, 150))
    first = colour(image, det, GENEVAL_COLORS)
    assert len(calls) == 1  # all colours x templates in one batch
    assert colour(image, det, GENEVAL_COLORS) == first and len(calls) == 1
    colour(image, Det("zebra", det.box), GENEVAL_COLORS)
    colour(image, det, ["red", "blue"])
    assert len(calls) == 3


def test_mask_hides_the_background(colour, images):
    image = images[0]
    box = (120, 60, 360, 330)
    mask = _ellipse_mask(image.height, image.width, box)
    masked, plain = Det("person", box, mask), Det("person", box, None)
    changed = np.asarray(image).copy()
    changed[~mask] = 255 - changed[~mask]  # every background pixel, inside the box and outside it
    changed = Image.fromarray(changed)
    # the classifier sees the object only: background pixels do not matter at all when the mask is given
    assert torch.equal(colour.logits(image, [masked], GENEVAL_COLORS), colour.logits(changed, [masked], GENEVAL_COLORS))
    assert not torch.equal(colour.logits(image, [plain], GENEVAL_COLORS),
                           colour.logits(changed, [plain], GENEVAL_COLORS))
    # outside the box nothing matters even without a mask (the crop has no padding)
    outside = np.asarray(image).copy()
    outside[:, box[2] + 1:] = 0
    assert torch.equal(colour.logits(image, [plain], GENEVAL_COLORS),
                       colour.logits(Image.fromarray(outside), [plain], GENEVAL_COLORS))
    # what it sees outside the mask is GenEval's gray
    crop = np.asarray(colour_crop(image, Det("person", box, np.zeros_like(mask))))
    assert crop.shape == (270, 240, 3) and (crop == 153).all()
    with pytest.raises(ValueError, match="mask of shape"):
        colour(image, Det("person", box, mask[:-1]), GENEVAL_COLORS)
