"""GenEval (Ghosh et al. 2023): prompt metadata, the sample-folder layout, the scoring rules, the summary.

GenEval scores a text-to-image model by detecting objects in its images: every prompt of the official
`prompts/evaluation_metadata.jsonl` (553 prompts, six tasks) says which COCO objects must appear, how
many, in which colour and where relative to each other. This module is the library half of it,
free of any model: a detector (`layton.detection.Mask2FormerDetector`) produces `Detection`s and a
colour classifier (CLIP zero-shot, injected as `colour_fn`) names colours; `evaluate` applies
GenEval's rules to them and `summarize` turns per-image verdicts into the paper's numbers.

The rules follow djghosh13/geneval `evaluation/evaluate_images.py` with its default options:

- keep a detection when its score is > 0.3 (> 0.9 for every class when the prompt's tag is
  `counting`); per class, sort by score, keep at most 16, then greedy NMS at IoU 1.0, i.e. none
  (GenEval's `max_overlap` option; its IoU counts pixels inclusively, `(x1 - x0 + 1)`);
- `include` clauses are ANDed: class `c` with count `n` needs >= n kept detections of `c`, and
  only the n best-scoring ones are examined further: with a `color`, each is classified among
  the ten colours and at least n must be that colour; with a `position` `[relation, k]`, every
  one of them must stand in `relation` to every object of include group k (which must itself
  have matched). `exclude` clauses are ORed: a class with >= count kept detections fails the
  image (counting prompts exclude count + 1, so "three cats" means exactly three);
- relative position of A to B: the centre offset A - B, shrunk towards zero per axis by
  0.1 x (size of A + size of B) along that axis, divided by the length of the unshrunk offset;
  "left of" if x < -0.5, "right of" if x > 0.5, "above" if y < -0.5, "below" if y > 0.5 (no
  relation at all when the shrunk offset is below 1e-3 on both axes);
- colour: open_clip ViT-L-14 (OpenAI weights) zero-shot over `GENEVAL_COLORS` with the three
  `colour_templates(class)`, on the image composited over grey (#999) outside the object's mask
  and cropped to its box (`colour_crop` builds exactly that input);
- scores (`summary_scores.py`): accuracy per task is the mean over *images* (not prompts) of the
  per-image verdict; the overall score is the mean of the task accuracies.

Deliberate differences: a sample file must match `<digits>.png` whole (GenEval's `re.match` also
takes e.g. `0000.png.bak`); a position's target index must name an earlier include item (GenEval
would raise IndexError); unknown classes/colours/keys are rejected when reading, not scored as misses.

The folder layout is GenEval's (README, `generation/diffusers_generate.py`):
`<outdir>/<index:05d>/metadata.jsonl` holds the prompt's metadata object (the index-th line of the
metadata file) and `<outdir>/<index:05d>/samples/<k:04d>.png` its images; GenEval's evaluator reads
every all-digit folder and every `<digits>.png` in its `samples/`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from layton.completion import RECORD, mark_complete
from layton.storage import Root, join
from layton.tables import Table

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# The paper's table columns (Layton and GenEval papers), in TAGS order.
TASK_COLUMNS = {
    "single_object": "Single Obj.",
    "two_object": "Two Obj.",
    "counting": "Counting",
    "colors": "Colors",
    "position": "Position",
    "color_attr": "Color Attri.",
}

# The 80 COCO instance classes in COCO order, with mmdet's names: the id2label of transformers'
# Mask2Former COCO instance checkpoints (huggingface/label-files coco-detection-mmdet-id2label.json).
COCO_INSTANCE_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# GenEval's `object_names.txt` renames three of them, which are ambiguous in a prompt.
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}

# GenEval's `object_names.txt`: the COCO classes in COCO order, under GenEval's names.
GENEVAL_CLASSES = tuple(COCO_TO_GENEVAL.get(name, name) for name in COCO_INSTANCE_LABELS)

# The colour list of evaluate_images.py (and of create_prompts.py), in classifier order.
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

# Zero-shot templates of the colour classifier. GenEval builds one classifier per object class:
# `{classname}` is filled with the class first, `{c}` is then filled with each colour (clip_benchmark's
# `template.format(c=colour)`); each colour's text embedding is the normalised mean of the three
# normalised template embeddings, and the colour with the largest image-text similarity wins.
COLOR_TEMPLATES = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)
COLOR_BACKGROUND = "#999"  # GenEval's default `bgcolor`: the fill outside an object's mask

POSITION_RELATIONS = ("left of", "right of", "above", "below")

_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


def colour_templates(classname: str) -> list[str]:
    """GenEval's templates for one object class, each still holding `{c}` for the colour."""
    return [t.replace("{classname}", classname) for t in COLOR_TEMPLATES]


def colour_prompts(classname: str, colour: str) -> list[str]:
    """The three texts whose embeddings GenEval averages for `colour` on a `classname`."""
    return [t.format(c=colour) for t in colour_templates(classname)]


# ----------------------------------------------------------------------------------------------
# Metadata


@dataclass
class GenEvalPrompt:
    """One line of `evaluation_metadata.jsonl`; `index` is its 0-based line number (its folder name)."""

    index: int
    tag: str
    prompt: str
    include: list[dict]
    exclude: list[dict]
    raw: dict = field(repr=False)  # the line's object as read: what metadata.jsonl gets


def _check_count(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}: 'count' must be an integer >= 1, got {value!r}")


def _check_class(value, what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what}: 'class' must be a string, got {value!r}")
    if value not in GENEVAL_CLASSES:
        raise ValueError(f"{what}: unknown class {value!r} (GenEval's classes are the 80 COCO names of "
                         "its object_names.txt, e.g. 'tv remote', 'dining table')")


def validate_metadata(obj, where: str) -> dict:
    """Check one metadata object against GenEval's format; errors start with `where` (path:line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    tag = obj.get("tag")
    if tag not in TAGS:
        raise ValueError(f"{where}: unknown tag {tag!r} (GenEval's tags: {', '.join(TAGS)})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: missing or empty 'prompt'")
    include = obj.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: missing 'include' (a non-empty list of {{class, count, ...}} objects)")
    for i, item in enumerate(include):
        what = f"{where}: include[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{what}: expected an object, got {item!r}")
        unknown = sorted(set(item) - _INCLUDE_KEYS)
        if unknown:
            raise ValueError(f"{what}: unknown key(s) {unknown} (allowed: {sorted(_INCLUDE_KEYS)})")
        if "class" not in item or "count" not in item:
            raise ValueError(f"{what}: needs 'class' and 'count'")
        _check_class(item["class"], what)
        _check_count(item["count"], what)
        if "color" in item and item["color"] not in GENEVAL_COLORS:
            raise ValueError(f"{what}: unknown color {item['color']!r} "
                             f"(GenEval's colours: {', '.join(GENEVAL_COLORS)})")
        if "position" in item:
            pos = item["position"]
            ok = (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in POSITION_RELATIONS
                  and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < i)
            if not ok:
                raise ValueError(f"{what}: bad position {pos!r}: must be [relation, index] with relation one of "
                                 f"{list(POSITION_RELATIONS)} and index an earlier include item (< {i})")
    exclude = obj.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: 'exclude' must be a list of {{class, count}} objects")
    for i, item in enumerate(exclude):
        what = f"{where}: exclude[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{what}: expected an object, got {item!r}")
        unknown = sorted(set(item) - _EXCLUDE_KEYS)
        if unknown or set(item) != _EXCLUDE_KEYS:
            raise ValueError(f"{what}: must have exactly the keys 'class' and 'count', got {sorted(item)}")
        _check_class(item["class"], what)
        _check_count(item["count"], what)
    return obj


def read_metadata(path: str | Path) -> list[GenEvalPrompt]:
    """Every prompt of a GenEval metadata file (one JSON object a line, GenEval's own format).

    Other top-level keys (some forks add rewritten prompts) are kept in `raw`. A malformed line
    raises ValueError naming `path:line`; blank lines are only allowed at the end of the file
    (a line's 0-based position is its sample folder's index, so one cannot be skipped).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    prompts = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise ValueError(f"{where}: blank line (every line must be one prompt's JSON object)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        validate_metadata(obj, where)
        prompts.append(GenEvalPrompt(index=number - 1, tag=obj["tag"], prompt=obj["prompt"], include=obj["include"],
                                     exclude=obj.get("exclude", []), raw=obj))
    return prompts


# ----------------------------------------------------------------------------------------------
# Sample folders


def sample_dir(outdir: str | Path, index: int) -> str:
    """`<outdir>/<index:05d>` (a local path or a URI)."""
    return join(outdir, f"{index:05d}")


def write_sample_dir(outdir: str | Path, prompt: GenEvalPrompt, images: Sequence[Image.Image],
                     fingerprint: str) -> str:
    """Write one prompt's folder in GenEval's layout under `outdir` (a local path or a URI); returns
    `<outdir>/<index:05d>`. An existing folder for the same index is replaced.

    The folder, with its completion record (the generation settings' `fingerprint`), is assembled in
    a local temp directory and put in place with `Root.put_dir`, record last: a folder cut by a kill
    is never taken for complete.
    """
    if not images:
        raise ValueError(f"prompt {prompt.index} ({prompt.prompt!r}): no images to write")
    root, name = Root(outdir), f"{prompt.index:05d}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        (folder / "samples").mkdir(parents=True)
        # GenEval writes the metadata object with json.dump (one line, no newline).
        (folder / "metadata.jsonl").write_text(json.dumps(prompt.raw), encoding="utf-8")
        for k, image in enumerate(images):
            image.save(folder / "samples" / f"{k:04d}.png")
        mark_complete(folder, fingerprint, images=len(images))
        root.put_dir(folder, name, last=(RECORD,))
    return sample_dir(outdir, prompt.index)


_SAMPLE_NAME = re.compile(r"\d+\.png")


def read_sample_dirs(outdir: str | Path) -> list[tuple[dict, list[str]]]:
    """Every prompt folder of a GenEval output directory (a local path or a URI), in index order:
    (metadata, image locations).

    Reads what GenEval's evaluator reads (all-digit folder names, `samples/<digits>.png`); the
    metadata is validated like a metadata line (errors name the metadata.jsonl file). One listing
    of the directory, then one read per folder's metadata.
    """
    root = Root(outdir)
    if not root.is_dir():
        raise FileNotFoundError(f"GenEval sample directory {outdir} does not exist")
    folders: dict[str, list[str]] = {}
    for rel in root.list(recursive=True):
        parts = rel.split("/")
        if parts[0].isdigit():
            samples = folders.setdefault(parts[0], [])
            if len(parts) == 3 and parts[1] == "samples" and _SAMPLE_NAME.fullmatch(parts[2]):
                samples.append(parts[2])
    found = []
    for folder in sorted(folders, key=int):
        meta_path = join(outdir, folder, "metadata.jsonl")
        blob = root.read(f"{folder}/metadata.jsonl")
        if blob is None:
            raise ValueError(f"{meta_path}: missing (every GenEval sample folder holds its metadata)")
        try:
            metadata = json.loads(blob.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}:1: not valid JSON ({e})") from None
        validate_metadata(metadata, f"{meta_path}:1")
        found.append((metadata, [join(outdir, folder, "samples", f) for f in sorted(folders[folder], key=lambda f: int(f[:-4]))]))
    return found


def load_image(path: str | Path) -> Image.Image:
    """An image as GenEval's evaluator sees it (EXIF orientation applied)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).copy()


# ----------------------------------------------------------------------------------------------
# Rules


@dataclass
class Detection:
    """One detected object: a GenEval class name, a score in [0, 1], a pixel box (x0, y0, x1, y1)
    and, when the detector segments, a boolean mask of the image's (height, width)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class GenEvalRules:
    """GenEval's evaluator options (`--options key=value`) with its defaults."""

    threshold: float = 0.3  # `threshold`
    counting_threshold: float = 0.9  # `counting_threshold`, for every class of a `counting` prompt
    max_objects: int = 16  # `max_objects` per class
    nms_threshold: float = 1.0  # `max_overlap`; 1.0 turns NMS off
    position_threshold: float = 0.1  # `position_threshold`


DEFAULT_RULES = GenEvalRules()

ColourFn = Callable[[Image.Image, Detection, list[str]], str]


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """GenEval's IoU: pixel-inclusive areas, (x1 - x0 + 1) x (y1 - y0 + 1)."""

    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """The relations of box A to box B ("left of", "right of", "above", "below"), as GenEval computes them."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)  # [[x0, y0], [x1, y1]]
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    size_a, size_b = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def select_objects(detections: Sequence[Detection], tag: str,
                   rules: GenEvalRules = DEFAULT_RULES) -> dict[str, list[Detection]]:
    """The detections GenEval keeps, per class, best score first: score threshold, at most
    `max_objects`, then greedy NMS (off at the default `nms_threshold` 1.0).

    Ordered as evaluate_images.py orders mmdet's float32 scores, `np.argsort(scores)[::-1]` over the
    class's detections in the given order: equal scores (in float32) come later one first, and the
    threshold is compared in float32 too."""
    threshold = np.float32(rules.counting_threshold if tag == "counting" else rules.threshold)
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        by_class.setdefault(d.label, []).append(d)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        scores = np.array([d.score for d in dets], dtype=np.float32)
        ranked = np.argsort(scores)[::-1]
        ranked = ranked[scores[ranked] > threshold][: rules.max_objects]
        order = [dets[i] for i in ranked.tolist()]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if rules.nms_threshold != 1:
                order = [d for d in order if compute_iou(best.box, d.box) < rules.nms_threshold]
        if chosen:
            kept[label] = chosen
    return kept


def evaluate(metadata: dict, detections: Sequence[Detection], image: Image.Image, colour_fn: ColourFn,
             rules: GenEvalRules = DEFAULT_RULES) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, reason); the reason lists every failed clause."""
    objects = select_objects(detections, metadata["tag"], rules)
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []  # per include clause: its examined objects, None if unmatched
    for req in metadata.get("include", []):
        classname, count = req["class"], req["count"]
        found = objects.get(classname, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colours = [colour_fn(image, obj, list(GENEVAL_COLORS)) for obj in found]
                n_right = colours.count(req["color"])
                if n_right < count:
                    matched = False
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in GENEVAL_COLORS if c in colours)
                    reasons.append(f"expected {req['color']} {classname}>={count}, "
                                   f"found {n_right} {req['color']}; and {seen}")
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {classname} to be {relation}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            actual = relative_position(obj.box, other.box, rules.position_threshold)
                            if relation not in actual:
                                matched = False
                                reasons.append(f"expected {classname} {relation} target, found "
                                               f"{' and '.join(sorted(actual)) or 'no relation to the'} target")
                                break
                        if not matched:
                            break
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def colour_crop(image: Image.Image, detection: Detection, bgcolor: str = COLOR_BACKGROUND) -> Image.Image:
    """The colour classifier's input for one object, as GenEval builds it: the RGB image with
    everything outside the object's mask set to `bgcolor` (no masking without a mask), cropped to
    the object's box (PIL rounds the box to whole pixels)."""
    rgb = image.convert("RGB")
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (rgb.height, rgb.width):
            raise ValueError(f"mask of shape {mask.shape} does not match the image's {(rgb.height, rgb.width)}")
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, color=bgcolor), Image.fromarray(mask))
    return rgb.crop(tuple(detection.box[:4]))


def result_row(filename: str | Path, metadata: dict, detections: Sequence[Detection], image: Image.Image,
               colour_fn: ColourFn, rules: GenEvalRules = DEFAULT_RULES) -> dict:
    """One line of GenEval's results.jsonl (filename, tag, prompt, correct, reason, metadata, details)."""
    correct, reason = evaluate(metadata, detections, image, colour_fn, rules)
    kept = select_objects(detections, metadata["tag"], rules)
    return {
        "filename": str(filename),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({c: [[*map(float, d.box), float(d.score)] for d in ds] for c, ds in kept.items()}),
    }


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(results: Sequence[dict]) -> dict:
    """GenEval's summary of per-image results (dicts with at least `tag` and `correct`).

    Returns `tasks` (accuracy per tag: the fraction of that task's *images* judged correct, as
    summary_scores.py computes it; None for a task without images), `counts` (correct/total per
    tag), `overall` (the mean of the task accuracies; a task without images is left out of the
    mean and listed in `missing_tasks`, so a partial run's overall is over fewer than six tasks;
    None when there are no results), and GenEval's extra lines: `images`, `image_accuracy`,
    `prompts` and `prompt_accuracy` (a prompt counts as correct when any of its images is; prompts
    are told apart by their `metadata`, else `prompt`).
    """
    counts = {tag: {"correct": 0, "total": 0} for tag in TAGS}
    per_prompt: dict[str, bool] = {}
    for i, r in enumerate(results):
        tag = r.get("tag")
        if tag not in counts:
            raise ValueError(f"result {i}: unknown tag {tag!r} (GenEval's tags: {', '.join(TAGS)})")
        counts[tag]["total"] += 1
        counts[tag]["correct"] += bool(r["correct"])
        key = r.get("metadata") or r.get("prompt")
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        per_prompt[key] = per_prompt.get(key, False) or bool(r["correct"])
    tasks = {tag: (c["correct"] / c["total"] if c["total"] else None) for tag, c in counts.items()}
    present = [acc for acc in tasks.values() if acc is not None]
    n = len(results)
    return {
        "tasks": tasks,
        "counts": counts,
        "overall": float(np.mean(present)) if present else None,
        "missing_tasks": [tag for tag, acc in tasks.items() if acc is None],
        "images": n,
        "image_accuracy": sum(bool(r["correct"]) for r in results) / n if n else None,
        "prompts": len(per_prompt),
        "prompt_accuracy": sum(per_prompt.values()) / len(per_prompt) if per_prompt else None,
    }


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def result_table(summary: dict, name: str) -> Table:
    """The paper's GenEval table row (Layton Table: Single Obj., Two Obj., Counting, Colors,
    Position, Color Attri., Overall), two decimals, "–" for a task without images."""
    return Table(["Method", *TASK_COLUMNS.values(), "Overall"],
                 [[name, *(_fmt(summary["tasks"].get(tag)) for tag in TAGS), _fmt(summary["overall"])]])
