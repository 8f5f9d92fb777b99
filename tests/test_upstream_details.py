"""Upstream details (issue 16, finding 11): LlamaGen's image transform, GenEval's order of equal
scores, LlamaGen's CFG rule for scales <= 1, and FaceScore's RetinaFace detector.

Each reference below is restated here from the upstream code's description, not imported from the
module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------- (a) LlamaGen's center_crop_arr


def llamagen_transform(pil_image: Image.Image, image_size: int) -> torch.Tensor:
    """ADM's center_crop_arr, then ToTensor and Normalize(0.5, 0.5), in numpy/PIL."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    arr = arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]
    x = arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return torch.from_numpy((x - np.float32(0.5)) / np.float32(0.5))


def test_preprocess_is_llamagen_center_crop_arr():
    from skimage import data

    from layton.vq import preprocess

    astronaut, coffee = Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())
    cases = [
        (astronaut.resize((517, 300), Image.LANCZOS), 256),  # wide, one bicubic resize
        (coffee.resize((1024, 2048), Image.LANCZOS), 256),  # tall, two BOX halvings first
        (coffee.resize((300, 300), Image.LANCZOS), 256),
        (coffee, 224),  # 600x400: no halving (400 < 448)
        (astronaut, 288),
        (Image.fromarray(data.chelsea()).resize((90, 61)), 256),  # upscaled
        (astronaut.resize((1030, 700)), 256),  # halving once, odd sizes
    ]
    for image, size in cases:
        ours = preprocess([image], size)[0]
        ref = llamagen_transform(image.convert("RGB"), size)
        assert ours.shape == ref.shape == (3, size, size), image.size
        assert torch.equal(ours, ref), (image.size, size, (ours - ref).abs().max().item())
    # the same path for a uint8 tensor and for a grey image (LlamaGen's loaders: convert("RGB"))
    grey = Image.fromarray(data.camera()).resize((400, 260))
    assert torch.equal(preprocess(grey, 256)[0], llamagen_transform(grey.convert("RGB"), 256))
    tensor = torch.from_numpy(np.array(cases[0][0])).permute(2, 0, 1)
    assert torch.equal(preprocess(tensor, 256)[0], llamagen_transform(cases[0][0], 256))


# ----------------------------------------------------------------- (b) GenEval's order of equal scores


def geneval_order(scores: list[float], threshold: float, max_objects: int = 16) -> list[int]:
    """evaluate_images.py over one class's detections: float32 scores (mmdet's bbox[:, 4])."""
    s = np.asarray(scores, dtype=np.float32)
    ordering = np.argsort(s)[::-1]
    ordering = ordering[s[ordering] > threshold]
    return ordering[:max_objects].tolist()


def test_select_objects_orders_ties_like_geneval():
    from layton.geneval import Detection, select_objects

    def dets(scores):
        return [Detection("cat", s, (float(i), 0.0, float(i) + 10, 10.0)) for i, s in enumerate(scores)]

    cases = [
        ([0.5, 0.5], "two_object"),
        ([0.8, 0.4, 0.8, 0.8, 0.2, 0.4], "two_object"),
        ([0.5, 0.5 + 1e-9, 0.7], "two_object"),  # equal once in float32, as mmdet's scores are
        ([0.3000000001, 0.31, 0.95, 0.95], "two_object"),  # float32(0.3000000001) is not > 0.3
        ([0.95, 0.92, 0.95, 0.5, 0.92] * 4, "counting"),  # 20 detections, ties cut at 16
    ]
    differs = False
    for scores, tag in cases:
        threshold = 0.9 if tag == "counting" else 0.3
        want = geneval_order(scores, threshold)
        got = [int(d.box[0]) for d in select_objects(dets(scores), tag).get("cat", [])]
        assert got == want, (scores, got, want)
        stable = sorted((i for i, s in enumerate(scores) if s > threshold), key=lambda i: -scores[i])[:16]
        differs |= stable != want
    assert differs  # the cases do tell a stable sort from GenEval's


# ----------------------------------------------------------------- (c) LlamaGen's CFG rule


VOCAB, BLOCK, CAPTION_DIM = 128, 16, 16


@pytest.fixture(scope="module")
def gpt():
    from layton.gpt import GPT, GPTConfig

    cfg = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=VOCAB, caption_dim=CAPTION_DIM, block_size=BLOCK,
                    token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, caption_dropout_p=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = GPT(cfg)
        with torch.no_grad():  # large weights: peaked distributions, so guidance visibly moves the argmax
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name == "cls_embedding.uncond_embedding":
                    p.normal_(0.0, 1.0)
                elif p.ndim == 2:
                    p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
    return model.double().eval()


def _captions():
    g = torch.Generator().manual_seed(1)
    caption = torch.randn(3, 120, CAPTION_DIM, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 120, dtype=torch.bool)
    mask[0, :100] = False  # left padding
    mask[2, :60] = False
    return caption, mask


def greedy_reference(model, caption, mask, scale: float | None) -> torch.Tensor:
    """argmax of ℓ_c (scale None) or of ℓ_u + scale·(ℓ_c − ℓ_u), recomputed from scratch each step."""
    uncond = model.cls_embedding.uncond_embedding[None].expand_as(caption)
    tokens = torch.zeros(caption.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(BLOCK):
            c = model(tokens, caption, mask)[:, -1]
            logits = c if scale is None else (u := model(tokens, uncond, mask)[:, -1]) + scale * (c - u)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens


def test_cfg_scale_at_most_one_is_conditional_only(gpt):
    from layton.gpt_sampling import SamplingParams, generate_tokens

    caption, mask = _captions()

    def ours(scale, mode="batch", **kw):
        return generate_tokens(gpt, caption, mask, [0, 1, 2], SamplingParams(cfg_scale=scale, cfg_mode=mode, **kw))

    cond = greedy_reference(gpt, caption, mask, None)
    guided_half = greedy_reference(gpt, caption, mask, 0.5)
    assert not torch.equal(cond, guided_half)  # the two rules do give different tokens here
    for mode in ("batch", "two_pass"):
        assert torch.equal(ours(0.5, mode, temperature=0.0, top_k=0), cond), mode
        assert torch.equal(ours(4.0, mode, temperature=0.0, top_k=0), greedy_reference(gpt, caption, mask, 4.0)), mode
    # with sampling: scale 0.5 and 0 draw exactly what scale 1 and cfg_mode="off" draw
    one = ours(1.0, top_k=20)
    assert torch.equal(ours(0.5, top_k=20), one) and torch.equal(ours(0.0, top_k=20), one)
    assert torch.equal(ours(7.5, "off", top_k=20), one)
    assert not torch.equal(ours(4.0, top_k=20), one)
    from layton.gpt_sampling import guides  # the rule laytongen.py applies per row

    assert [guides(SamplingParams(cfg_scale=s)) for s in (0.0, 0.5, 1.0, 1.0 + 1e-6, 4.0)] == [False] * 3 + [True] * 2
    assert not guides(SamplingParams(cfg_scale=4.0, cfg_mode="off"))


# ----------------------------------------------------------------- (d) FaceScore's RetinaFace


def _random_retinaface(network: str, seed: int = 0):
    from layton.retinaface import RetinaFace

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RetinaFace(network)
        with torch.no_grad():  # non-trivial BatchNorm statistics, so that the running buffers matter
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
            for head in model.ClassHead:  # spread the face scores: some above 0.9, most below
                head.conv1x1.weight.mul_(40.0)
    return model.eval()


def _save_upstream(model, path, prefix="module.", drop_batches_tracked=True):
    """As upstream's releases are laid out: a bare state dict saved from DataParallel."""
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()
          if not (drop_batches_tracked and k.endswith("num_batches_tracked"))}
    torch.save(sd, path)
    return path


# Upstream key names and shapes (biubug6/Pytorch_Retinaface, batch-face): MobileNet0.25 cfg_mnet.
MNET_KEYS = {
    "body.stage1.0.0.weight": (8, 3, 3, 3),
    "body.stage1.1.0.weight": (8, 1, 3, 3),  # depthwise
    "body.stage1.1.3.weight": (16, 8, 1, 1),
    "body.stage2.0.3.weight": (128, 64, 1, 1),
    "body.stage3.1.4.running_var": (256,),
    "fpn.output1.0.weight": (64, 64, 1, 1),
    "fpn.output3.0.weight": (64, 256, 1, 1),
    "fpn.merge1.0.weight": (64, 64, 3, 3),
    "ssh1.conv3X3.0.weight": (32, 64, 3, 3),
    "ssh2.conv5X5_1.0.weight": (16, 64, 3, 3),
    "ssh3.conv7x7_3.1.bias": (16,),
    "ClassHead.0.conv1x1.weight": (4, 64, 1, 1),
    "BboxHead.1.conv1x1.weight": (8, 64, 1, 1),
    "LandmarkHead.2.conv1x1.bias": (20,),
}


def upstream_priors(h: int, w: int, min_sizes, steps) -> torch.Tensor:
    out = []
    for k, step in enumerate(steps):
        for i in range(math.ceil(h / step)):
            for j in range(math.ceil(w / step)):
                for m in min_sizes[k]:
                    out += [(j + 0.5) * step / w, (i + 0.5) * step / h, m / w, m / h]
    return torch.Tensor(out).view(-1, 4)


def upstream_detect(model, image: Image.Image, confidence=0.5):
    """batch-face's batch_detect + post_process (resize 1, top_k 5000, NMS 0.4, keep 750), restated,
    on a BGR image as FaceScore passes it (cv2.imread, cv=False)."""
    bgr = np.array(image.convert("RGB"))[:, :, ::-1]
    img = torch.from_numpy(np.float32([bgr])).permute(0, 3, 1, 2)
    img -= torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    _, _, h, w = img.shape
    with torch.no_grad():
        loc, conf, _ = model(img)
    priors = upstream_priors(h, w, [[16, 32], [64, 128], [256, 512]], [8, 16, 32])
    loc = loc[0]
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * 0.1 * priors[:, 2:], priors[:, 2:] * torch.exp(loc[:, 2:] * 0.2)), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    boxes = (boxes * torch.tensor([w, h, w, h], dtype=torch.float32)).numpy()
    scores = conf[0].numpy()[:, 1]
    inds = np.where(scores > confidence)[0]
    boxes, scores = boxes[inds], scores[inds]
    order = scores.argsort()[::-1][:5000]
    dets = np.hstack((boxes[order], scores[order][:, None])).astype(np.float32)
    x1, y1, x2, y2, s = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = s.argsort()[::-1], []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        ww = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        hh = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = ww * hh
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= 0.4)[0] + 1]
    dets = sorted(dets[keep][:750], key=lambda d: d[4], reverse=True)
    return [(tuple(float(v) for v in d[:4]), float(d[4])) for d in dets]


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def mnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("retinaface") / "mobilenet0.25_Final.pth"
    return _save_upstream(_random_retinaface("mobilenet0.25"), path)


def test_retinaface_upstream_state_dict_round_trips(mnet_file, tmp_path):
    from layton.model_files import load_torch_state_dict
    from layton.retinaface import RetinaFaceDetector, load_retinaface

    upstream = load_torch_state_dict(mnet_file, "RetinaFace")
    for key, shape in MNET_KEYS.items():
        assert tuple(upstream[key].shape) == shape, key
    model = load_retinaface(mnet_file)
    assert model.network == "mobilenet0.25"
    own = model.state_dict()
    assert set(own) - set(upstream) == {k for k in own if k.endswith("num_batches_tracked")}
    for k, v in upstream.items():
        assert torch.equal(own[k], v), k
    assert RetinaFaceDetector(mnet_file).model.state_dict().keys() == own.keys()
    # {"state_dict": ...} without a prefix loads too (upstream's load_model takes both)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": dict(upstream)}, wrapped)
    again = load_retinaface(wrapped).state_dict()
    assert all(torch.equal(again[k], v) for k, v in upstream.items())
    # torch's legacy (non-zip) format, as old releases were written, reads with weights_only too
    legacy = tmp_path / "legacy.pth"
    torch.save(dict(upstream), legacy, _use_new_zipfile_serialization=False)
    again = load_retinaface(legacy).state_dict()
    assert all(torch.equal(again[k], v) for k, v in upstream.items())
    # a wrong or incomplete file names itself
    torch.save({k: v for k, v in upstream.items() if not k.startswith("LandmarkHead")}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="cut.pth.*missing"):
        load_retinaface(tmp_path / "cut.pth")
    marker = tmp_path / "ran"
    torch.save({**upstream, "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth"):
        load_retinaface(tmp_path / "evil.pth")
    assert not marker.exists()  # read with weights_only: the pickled call never ran
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*not a RetinaFace"):
        load_retinaface(tmp_path / "other.pth")


def test_retinaface_resnet50_round_trips(tmp_path):
    from layton.retinaface import RetinaFaceDetector

    model = _random_retinaface("resnet50", seed=1)
    path = _save_upstream(model, tmp_path / "Resnet50_Final.pth")
    det = RetinaFaceDetector(path)
    assert det.model.network == "resnet50"
    assert "body.layer4.2.conv3.weight" in det.model.state_dict() and "fpn.output1.0.weight" in det.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(det.model.state_dict()[k], v), k
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    faces = [(b, s) for b, _, s in det.detect_faces(image)]
    assert faces and faces == upstream_detect(det.model, image)


def test_retinaface_detects_like_batch_face(mnet_file):
    from skimage import data

    from layton.retinaface import RetinaFaceDetector

    det = RetinaFaceDetector(mnet_file)
    image = Image.fromarray(data.astronaut()).resize((300, 220))  # sizes that are not multiples of 32
    faces = det.detect_faces(image)
    ref = upstream_detect(det.model, image)
    assert len(ref) > 3 and any(s >= 0.9 for _, s in ref) and any(s < 0.9 for _, s in ref)  # a non-trivial case
    assert len(faces) == len(ref)
    for (box, landmarks, score), (ref_box, ref_score) in zip(faces, ref):
        assert isinstance(box, tuple) and len(box) == 4 and all(isinstance(v, float) for v in box)
        assert landmarks.shape == (5, 2) and isinstance(score, float)
        assert (box, score) == (ref_box, ref_score)  # same arithmetic, same input strides: bit for bit
    # detect(): FaceScore's rule, confidence >= 0.9, upstream's order (best first)
    assert det.detect(image) == [b for b, _, s in faces if s >= 0.9]
    for tiny in (Image.new("RGB", (8, 8)), Image.new("L", (1, 1))):  # smaller than every anchor step
        assert [(b, s) for b, _, s in det.detect_faces(tiny)] == upstream_detect(det.model, tiny)


def test_facescore_detector_is_selected_by_config(mnet_file, tmp_path):
    from layton.faces import CascadeFaceDetector, default_cascade_path, make_face_detector
    from layton.retinaface import RetinaFaceDetector
    from layton.scorers.facescore import FaceScoreScorer
    from layton.zoo.facescore import write_tiny_facescore
    from stages.eval_coco.config import FaceScorePaths

    release = write_tiny_facescore(tmp_path / "fs")
    paths = {k: str(v) for k, v in release.items()}
    assert FaceScorePaths(**paths).detector is None
    cfg = FaceScorePaths(**paths, detector=str(mnet_file))
    scorer = FaceScoreScorer(cfg.checkpoint, cfg.med_config, cfg.tokenizer, detector=cfg.detector)
    assert isinstance(scorer.detector, RetinaFaceDetector)
    assert isinstance(FaceScoreScorer(cfg.checkpoint, cfg.med_config, cfg.tokenizer).detector, CascadeFaceDetector)
    assert isinstance(make_face_detector(None), CascadeFaceDetector)
    assert isinstance(make_face_detector(default_cascade_path()), CascadeFaceDetector)
    [res] = scorer.score(["p"], [Image.fromarray(np.full((64, 80, 3), 90, np.uint8))])
    assert set(res) == {"facescore", "faces", "reason", "face_scores", "boxes"}
    from layton.model_files import ModelFileError

    with pytest.raises(ModelFileError, match="nowhere.pth"):
        make_face_detector(tmp_path / "nowhere.pth")
