"""Face detection and FaceScore's face crops, with a detector that runs offline.

FaceScore (OPPO-Mente-Lab/FaceScore) detects faces with batch-face's RetinaFace (MobileNet-0.25,
weights fetched from a URL at first use), keeps detections with confidence >= 0.9, and crops each
box with a one-pixel margin: rows int(y0 - 1) : int(y1 + 1), columns int(x0 - 1) : int(x1 + 1) of
the RGB image (no squaring, no resize: the crop then goes through ImageReward's 224 px
Resize + CenterCrop preprocessing). Given those weights as a file (`mobilenet0.25_Final.pth`, or
`Resnet50_Final.pth`), `make_face_detector` returns upstream's detector (`layton.retinaface`).
Without them — they cannot be had offline, and OpenCV 5 no longer ships its cascade classifier nor
the Haar cascade files — the default detector here is the LBP frontal-face cascade that
scikit-image bundles (OpenCV's own `lbpcascade_frontalface.xml`, in OpenCV's XML format), run by
`skimage.feature.Cascade`. It has no confidence score:
`min_neighbors` (overlapping raw detections needed to keep a face) plays the role of the 0.9
threshold. Any OpenCV-format LBP cascade file can be given instead.

The cascade runs on a grey copy whose short side is `detect_size` px (never upscaled), which keeps
it fast on 1024 px images and sets the smallest face found to 24/detect_size of the short side
(12.5 % at the default 192): FaceScore enlarges every crop to 224 px, so tiny faces say little.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from layton.model_files import ModelFileError

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels of the input image, x1/y1 exclusive


def default_cascade_path() -> Path:
    """The LBP frontal-face cascade shipped inside scikit-image (a real data file of the wheel)."""
    from skimage import data

    return Path(data.lbp_frontal_face_cascade_filename())


def _cascade_feature_type(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path}: not an OpenCV cascade XML file ({err})") from None
    node = root.find("./cascade/featureType")
    if node is None or not (node.text or "").strip():
        raise ValueError(f"{path}: not an OpenCV cascade XML file (no cascade/featureType)")
    return node.text.strip().upper()


class CascadeFaceDetector:
    """Frontal faces with an OpenCV-format LBP cascade (default: scikit-image's bundled one)."""

    def __init__(
        self,
        cascade: str | Path | None = None,
        detect_size: int = 192,
        scale_factor: float = 1.2,
        min_neighbors: int = 6,
        step_ratio: float = 1.0,
    ):
        from skimage.feature import Cascade

        self.cascade_path = Path(cascade) if cascade is not None else default_cascade_path()
        if not self.cascade_path.is_file():
            raise ModelFileError(f"face detector cascade: {self.cascade_path} does not exist")
        kind = _cascade_feature_type(self.cascade_path)
        if kind != "LBP":
            raise ValueError(
                f"{self.cascade_path}: a {kind} cascade; only LBP cascades are supported "
                "(scikit-image's Cascade reads OpenCV's LBP format, and OpenCV 5 has no cascade classifier)"
            )
        self._cascade = Cascade(str(self.cascade_path))
        self.window = (self._cascade.window_height, self._cascade.window_width)
        self.detect_size = detect_size
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.step_ratio = step_ratio

    def detect(self, image: Image.Image) -> list[Box]:
        """Face boxes (x0, y0, x1, y1) in `image`'s pixels, largest first."""
        grey = image.convert("L")
        scale = min(1.0, self.detect_size / min(grey.size))
        if scale < 1.0:
            grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.BILINEAR)
        # The two scales differ a little after rounding the small size; map boxes back per axis.
        sx, sy = image.width / grey.width, image.height / grey.height
        pixels = np.asarray(grey, dtype=np.float32) / 255.0
        if pixels.shape[0] < self.window[0] or pixels.shape[1] < self.window[1]:
            return []
        found = self._cascade.detect_multi_scale(
            img=pixels,
            scale_factor=self.scale_factor,
            step_ratio=self.step_ratio,
            min_size=self.window,
            max_size=pixels.shape,
            min_neighbor_number=self.min_neighbors,
        )
        boxes = [
            (d["c"] * sx, d["r"] * sy, (d["c"] + d["width"]) * sx, (d["r"] + d["height"]) * sy) for d in found
        ]
        return sorted(boxes, key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b[1], b[0]))


def make_face_detector(path: str | Path | None = None, device="cpu"):
    """The detector a configured path names: None -> scikit-image's LBP cascade, an `.xml` -> that
    OpenCV LBP cascade, anything else -> RetinaFace release weights (`layton.retinaface`)."""
    if path is None or Path(path).suffix.lower() == ".xml":
        return CascadeFaceDetector(path)
    from layton.retinaface import RetinaFaceDetector

    return RetinaFaceDetector(path, device=device)


def crop_box(box: Box, width: int, height: int, margin: int = 1) -> tuple[int, int, int, int]:
    """FaceScore's crop window for a float box: int(x0 - margin) .. int(x1 + margin), likewise in y.

    `int` truncates toward zero, as upstream's does. Upstream slices a tensor with these numbers, so
    a start below zero would wrap around; here the window is clipped to the image instead.
    """
    x0, y0, x1, y1 = box
    left, top = int(x0 - margin), int(y0 - margin)
    right, bottom = int(x1 + margin), int(y1 + margin)
    return max(0, left), max(0, top), min(width, right), min(height, bottom)


def crop_faces(image: Image.Image, boxes: list[Box], margin: int = 1, size: int | None = None) -> list[Image.Image]:
    """RGB face crops, one per box, by FaceScore's rule (1 px margin, the box's own aspect ratio).

    `size=None` is FaceScore's behaviour (the scorer's 224 px Resize + CenterCrop does the rest);
    an int gives the same Resize (short side, bicubic) + CenterCrop here, e.g. for saving crops.
    Boxes that leave nothing inside the image are skipped, as upstream skips crops it cannot convert.
    """
    rgb = image.convert("RGB")
    crops = []
    for box in boxes:
        left, top, right, bottom = crop_box(box, rgb.width, rgb.height, margin)
        if right <= left or bottom <= top:
            continue
        crop = rgb.crop((left, top, right, bottom))
        if size is not None:
            import torchvision.transforms.functional as TF
            from torchvision.transforms import InterpolationMode

            crop = TF.center_crop(TF.resize(crop, size, interpolation=InterpolationMode.BICUBIC), size)
        crops.append(crop)
    return crops
