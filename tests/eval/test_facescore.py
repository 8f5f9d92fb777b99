"""FaceScore scorer: the tiny release loads, face scores equal an independent restatement of upstream's
`FaceScore.score` (ImageReward's BLIP + MLP on raw tensors, fixed text "A face.", no normalisation),
crops follow upstream's rule, and real photographs with and without a face are reported as such.

The BLIP restatement is the one the ImageReward parity test uses (plain tensor ops on the state dict).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from layton.faces import CascadeFaceDetector, crop_faces
from layton.model_files import ModelFileError
from layton.scorers.facescore import FaceScoreScorer
from layton.zoo.facescore import write_tiny_facescore
from tests.scorers.test_imagereward import _med_bert, _official_tokenizer, _official_transform, _vit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_facescore(tmp_path_factory.mktemp("facescore"))


@pytest.fixture(scope="module")
def scorer(release):
    return FaceScoreScorer(release["checkpoint"], release["med_config"], release["tokenizer"])


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    astronaut = data.astronaut()
    return {
        "astronaut": Image.fromarray(astronaut),
        "two": Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)),  # two faces
        "coffee": Image.fromarray(data.coffee()),
        "flat": Image.new("RGB", (320, 240), (128, 128, 128)),
    }


# ----------------------------------------------------------------- upstream, restated


class Reference:
    """FaceScore.score: the fixed prompt through BLIP's tokenizer, the 224 transform, ViT, med BERT with
    cross-attention, the [CLS] state as float through the MLP, and nothing after it."""

    def __init__(self, release):
        self.sd = torch.load(release["checkpoint"], map_location="cpu", weights_only=True)
        self.cfg = json.loads(release["med_config"].read_text())
        self.tok = _official_tokenizer(release["tokenizer"])
        self.transform = _official_transform(224)

    @torch.no_grad()
    def __call__(self, face: Image.Image, prompt: str = "A face.") -> float:
        sd = self.sd
        text = self.tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        embeds = _vit(sd, self.transform(face)[None], sd["blip.visual_encoder.cls_token"].shape[-1] // 64)
        atts = torch.ones(embeds.shape[:-1], dtype=torch.long)
        r = _med_bert(sd, self.cfg, text.input_ids, text.attention_mask, embeds, atts)[:, 0, :].float()
        for i in (0, 2, 4, 6, 7):
            r = F.linear(r, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
        return r.item()


def upstream_crop(image: Image.Image, box) -> Image.Image:
    """FaceScore.crop_face_image, restated: ToTensor * 255, slice from int(x0-1) for int(x1+1)-int(x0-1)."""
    import torchvision.transforms.functional as TF

    t = TF.to_tensor(image) * 255
    x, y = int(box[0] - 1), int(box[1] - 1)
    w, h = int(box[2] + 1) - x, int(box[3] + 1) - y
    return Image.fromarray(t[:, y : y + h, x : x + w].numpy().transpose(1, 2, 0).astype(np.uint8))


@pytest.fixture(scope="module")
def reference(release):
    return Reference(release)


# ----------------------------------------------------------------- tests


def test_release_layout_and_seed(tmp_path, release):
    from layton.zoo.imagereward import write_tiny_imagereward

    assert release["checkpoint"].name == "FS_model.pt" and release["med_config"].name == "med_config.json"
    files = sorted(p.name for p in release["checkpoint"].parent.iterdir())
    assert files == ["FS_model.pt", "med_config.json", "tokenizer"]
    fs = torch.load(release["checkpoint"], weights_only=True)
    ir = torch.load(write_tiny_imagereward(tmp_path / "ir", seed=0)["checkpoint"], weights_only=True)
    assert fs.keys() == ir.keys() and all(fs[k].shape == ir[k].shape for k in fs)  # ImageReward's format
    assert not torch.equal(fs["mlp.layers.0.weight"], ir["mlp.layers.0.weight"])  # its own weights
    again = torch.load(write_tiny_facescore(tmp_path / "again")["checkpoint"], weights_only=True)
    assert all(torch.equal(fs[k], again[k]) for k in fs)


def test_face_scores_match_upstream_computation(scorer, reference, photos):
    rng = np.random.default_rng(0)
    crops = [
        photos["astronaut"].crop((160, 50, 280, 180)),  # a real face
        photos["coffee"].crop((100, 40, 400, 200)),  # wide
        Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)),  # tall, smaller than 224
        Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8)),  # grey
    ]
    ours = scorer.score_faces(None, crops)
    ref = np.array([reference(c) for c in crops])
    assert ours.dtype == np.float64 and ours.shape == (len(crops),)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert ours.std() > 1e-3  # the tiny weights tell faces apart
    # The image's prompt does not enter (upstream scores every face with "A face.").
    np.testing.assert_allclose(scorer.score_faces(["a cat", "zzqx unknown wordz", "", "x"], crops), ours, atol=1e-6)
    assert scorer.score_faces(None, []).shape == (0,)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score_faces(["a"], crops)


def test_prompt_none_scores_against_given_prompts(release, reference, photos):
    s = FaceScoreScorer(release["checkpoint"], release["med_config"], release["tokenizer"], prompt=None)
    face = photos["astronaut"].crop((160, 50, 280, 180))
    prompts = ["an astronaut", "A face."]
    np.testing.assert_allclose(s.score_faces(prompts, [face, face]), [reference(face, p) for p in prompts], atol=1e-5)
    with pytest.raises(ValueError, match="one per face"):
        s.score_faces(None, [face])


def test_crop_rule_matches_upstream():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    boxes = [(10.0, 20.0, 60.0, 90.0), (33.7, 5.2, 101.9, 40.01), (150.5, 60.5, 199.0, 119.0), (1.5, 1.99, 30.2, 50.7)]
    for box, ours in zip(boxes, crop_faces(image, boxes)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(upstream_crop(image, box)))
    assert crop_faces(image, [(10.0, 20.0, 60.0, 90.0)])[0].size == (52, 72)  # 1 px margin, not squared
    # Upstream's slice would wrap at a negative start; here the window is clipped to the image.
    assert crop_faces(image, [(-5.0, -3.0, 20.0, 30.0)])[0].size == (21, 31)
    assert crop_faces(image, [(300.0, 10.0, 320.0, 20.0)]) == []
    assert crop_faces(image, [boxes[0]], size=64)[0].size == (64, 64)


def test_photo_with_a_face(scorer, reference, photos):
    [res] = scorer.score(["an astronaut"], [photos["astronaut"]])
    assert res["faces"] >= 1 and res["reason"] == ""
    assert np.isfinite(res["facescore"]) and res["facescore"] == pytest.approx(np.mean(res["face_scores"]))
    x0, y0, x1, y1 = res["boxes"][0]  # the face is near (170..270, 60..170) in skimage's astronaut
    assert 130 < (x0 + x1) / 2 < 300 and 40 < (y0 + y1) / 2 < 190
    ref = [reference(upstream_crop(photos["astronaut"], b)) for b in res["boxes"]]
    np.testing.assert_allclose(res["face_scores"], ref, atol=1e-5)


def test_several_faces_and_no_face_in_one_batch(scorer, reference, photos):
    names = ["coffee", "two", "flat"]
    res = scorer.score(["p"] * 3, [photos[n] for n in names])
    for r in (res[0], res[2]):
        assert r == {"facescore": None, "faces": 0, "reason": "no face detected", "face_scores": [], "boxes": []}
    two = res[1]
    assert two["faces"] == 2 and two["reason"] == ""
    assert two["facescore"] == pytest.approx(np.mean(two["face_scores"]), abs=1e-12)  # mean over faces
    centres = sorted((b[0] + b[2]) / 2 for b in two["boxes"])
    assert centres[0] < 512 < centres[1]  # one face in each half
    ref = [reference(upstream_crop(photos["two"], b)) for b in two["boxes"]]
    np.testing.assert_allclose(two["face_scores"], ref, atol=1e-5)


@pytest.mark.parametrize("which", ["checkpoint", "med_config", "tokenizer"])
def test_missing_file_names_the_path(tmp_path, release, which):
    paths = dict(release)
    paths[which] = tmp_path / "nowhere" / paths[which].name
    with pytest.raises(ModelFileError, match="nowhere"):
        FaceScoreScorer(paths["checkpoint"], paths["med_config"], paths["tokenizer"])


def test_detector_cascade_errors(tmp_path):
    with pytest.raises(ModelFileError, match="missing_cascade.xml"):
        CascadeFaceDetector(tmp_path / "missing_cascade.xml")
    haar = tmp_path / "haar.xml"
    haar.write_text("<opencv_storage><cascade><featureType>HAAR</featureType></cascade></opencv_storage>")
    with pytest.raises(ValueError, match="only LBP"):
        CascadeFaceDetector(haar)
    assert CascadeFaceDetector().detect(Image.new("RGB", (16, 16))) == []  # smaller than the 24 px window
