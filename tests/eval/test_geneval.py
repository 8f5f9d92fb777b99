"""GenEval: metadata reader, sample layout, the rule engine (every task, every rule), summary, detector.

The rule verdicts are checked on hand-built detections whose geometry puts them just inside or just
outside each of GenEval's thresholds (score 0.3, counting 0.9, 16 per class, position 0.1), so a
wrong comparison or a wrong formula flips a verdict. The colour classifier is injected; here it is a
stub returning fixed colours (a test double for the CLIP classifier, which is tested elsewhere).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from layton.geneval import (
    COLOR_TEMPLATES,
    GENEVAL_CLASSES,
    GENEVAL_COLORS,
    TAGS,
    Detection,
    GenEvalRules,
    colour_crop,
    colour_prompts,
    colour_templates,
    compute_iou,
    evaluate,
    read_metadata,
    read_sample_dirs,
    relative_position,
    result_row,
    result_table,
    select_objects,
    summarize,
    write_sample_dir,
)

# One line of each tag, in the official file's format (key order and spelling as create_prompts.py writes).
OFFICIAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "tv remote", "count": 1}],
     "prompt": "a photo of a cat and a tv remote"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a dog"},
    {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                      {"class": "dog", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red bench and a blue dog"},
]  # fmt: skip

IMAGE = Image.new("RGB", (512, 512), "gray")


def det(label, score=0.95, box=(100, 100, 150, 150), mask=None):
    return Detection(label=label, score=score, box=tuple(float(v) for v in box), mask=mask)


def fixed_colour(colour):
    """The stub classifier: always `colour`; records its calls."""

    def fn(image, detection, candidates):
        fn.calls.append((detection.label, tuple(candidates)))
        return colour

    fn.calls = []
    return fn


def colour_by_label(mapping):
    return lambda image, detection, candidates: mapping[detection.label]


def no_colour(image, detection, candidates):
    raise AssertionError("the colour classifier must not run for a prompt without colours")


def write_lines(path, objs_or_lines):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs_or_lines))
    return path


# ------------------------------------------------------------------------------------------ reader


def test_reader_accepts_every_tag_in_the_official_format(tmp_path):
    prompts = read_metadata(write_lines(tmp_path / "evaluation_metadata.jsonl", OFFICIAL_LINES))
    assert [p.tag for p in prompts] == list(TAGS)
    assert [p.index for p in prompts] == list(range(6))
    assert [p.raw for p in prompts] == OFFICIAL_LINES
    counting = prompts[2]
    assert counting.prompt == "a photo of two clocks" and counting.include == [{"class": "clock", "count": 2}]
    assert counting.exclude == [{"class": "clock", "count": 3}]
    assert prompts[0].exclude == []
    assert prompts[4].include[1]["position"] == ["left of", 0]


@pytest.mark.parametrize(
    "bad, complaint",
    [
        ({"tag": "shapes", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}, "unknown tag 'shapes'"),
        ("{not json", "not valid JSON"),
        ({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, "prompt"),
        ({"tag": "single_object", "prompt": "a cat"}, "include"),
        ({"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["beside", 0]}],
          "prompt": "a cat beside a dog"}, "bad position"),
        ({"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["left of"]}],
          "prompt": "a cat left of a dog"}, "bad position"),
        ({"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}],
          "prompt": "a dog left of itself"}, "bad position"),
        ({"tag": "colors", "include": [{"class": "car", "count": 1, "colour": "red"}], "prompt": "a red car"},
         "unknown key(s) ['colour']"),
        ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}], "prompt": "a teal car"},
         "unknown color 'teal'"),
        ({"tag": "single_object", "include": [{"class": "remote", "count": 1}], "prompt": "a remote"},
         "unknown class 'remote'"),
        ({"tag": "counting", "include": [{"class": "cat", "count": "2"}], "prompt": "two cats"}, "'count'"),
    ],
)  # fmt: skip
def test_reader_rejects_a_malformed_line_naming_it(tmp_path, bad, complaint):
    path = write_lines(tmp_path / "meta.jsonl", [OFFICIAL_LINES[0], OFFICIAL_LINES[1], bad])
    with pytest.raises(ValueError) as err:
        read_metadata(path)
    assert f"{path}:3" in str(err.value)
    assert complaint in str(err.value)


# ------------------------------------------------------------------------------------ layout


def test_sample_dir_round_trip(tmp_path):
    prompts = read_metadata(write_lines(tmp_path / "meta.jsonl", OFFICIAL_LINES))
    out = tmp_path / "samples"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(3)]
    for p in (prompts[4], prompts[0]):
        written = write_sample_dir(out, p, images, "f" * 16)
        assert written == str(out / f"{p.index:05d}")
    assert sorted(x.name for x in out.iterdir()) == ["00000", "00004"]  # no temporary folder left
    assert sorted(x.name for x in (out / "00004" / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    # metadata.jsonl holds the metadata line's object, as GenEval's generator writes it
    assert json.loads((out / "00004" / "metadata.jsonl").read_text()) == OFFICIAL_LINES[4]

    # a folder produced elsewhere: GenEval's reader skips non-digit folders and non-sample files
    (out / "notes").mkdir()
    (out / "00004" / "grid.png").write_bytes(b"")
    (out / "00004" / "samples" / "0000.png.bak").write_bytes(b"")
    found = read_sample_dirs(out)
    assert [m for m, _ in found] == [OFFICIAL_LINES[0], OFFICIAL_LINES[4]]
    assert found[1][1] == [str(out / "00004" / "samples" / f"{k:04d}.png") for k in range(3)]
    assert np.array_equal(np.asarray(Image.open(found[1][1][2])), np.asarray(images[2]))

    # rewriting a prompt replaces its folder whole
    write_sample_dir(out, prompts[4], images[:1], "f" * 16)
    assert read_sample_dirs(out)[1][1] == [str(out / "00004" / "samples" / "0000.png")]

    (out / "00007").mkdir()
    (out / "00007" / "metadata.jsonl").write_text('{"tag": "nope"}')
    with pytest.raises(ValueError, match=r"00007/metadata.jsonl:1: unknown tag"):
        read_sample_dirs(out)


# ------------------------------------------------------------------------------- single / two objects


def test_single_object_score_threshold_is_strictly_above_0_3():
    meta = OFFICIAL_LINES[0]
    assert evaluate(meta, [det("bench", 0.31)], IMAGE, no_colour) == (True, "")
    ok, reason = evaluate(meta, [det("bench", 0.3)], IMAGE, no_colour)
    assert not ok and reason == "expected bench>=1, found 0"
    assert not evaluate(meta, [det("bench", 0.29), det("dog", 0.99)], IMAGE, no_colour)[0]
    # extra objects of other classes do not hurt
    assert evaluate(meta, [det("bench", 0.5), det("dog", 0.99), det("bench", 0.4)], IMAGE, no_colour)[0]


def test_two_objects_need_both():
    meta = OFFICIAL_LINES[1]
    assert evaluate(meta, [det("cat", 0.8), det("tv remote", 0.35)], IMAGE, no_colour)[0]
    ok, reason = evaluate(meta, [det("cat", 0.8), det("tv remote", 0.25)], IMAGE, no_colour)
    assert not ok and "expected tv remote>=1, found 0" in reason
    ok, reason = evaluate(meta, [], IMAGE, no_colour)
    assert not ok and reason.count("expected") == 2


# -------------------------------------------------------------------------------------------- counting


def test_counting_exactly_n_above_0_9():
    meta = OFFICIAL_LINES[2]  # two clocks; exclude three
    boxes = [(0, 0, 10, 10), (50, 50, 60, 60), (100, 100, 110, 110)]
    two = [det("clock", 0.95, boxes[0]), det("clock", 0.92, boxes[1])]
    assert evaluate(meta, two, IMAGE, no_colour) == (True, "")
    # a third clock at 0.85 counts in other tasks (> 0.3) but not when counting (> 0.9)
    assert evaluate(meta, two + [det("clock", 0.85, boxes[2])], IMAGE, no_colour)[0]
    ok, reason = evaluate(meta, two + [det("clock", 0.91, boxes[2])], IMAGE, no_colour)
    assert not ok and reason == "expected clock<3, found 3"
    ok, reason = evaluate(meta, [two[0], det("clock", 0.9, boxes[1])], IMAGE, no_colour)
    assert not ok and reason == "expected clock>=2, found 1"
    # the counting threshold is for counting prompts only
    assert select_objects([det("clock", 0.85)], "two_object") and not select_objects([det("clock", 0.85)], "counting")


def test_at_most_16_objects_per_class_and_nms_off_by_default():
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 16}],
            "exclude": [{"class": "apple", "count": 17}], "prompt": "a photo of sixteen apples"}
    twenty = [det("apple", 0.99 - i * 0.001, (i, i, i + 10, i + 10)) for i in range(20)]  # heavily overlapping
    assert evaluate(meta, twenty, IMAGE, no_colour)[0]  # only the 16 best are kept, duplicates and all
    kept = select_objects(twenty, "counting")["apple"]
    assert len(kept) == 16 and [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    # GenEval's max_overlap option: greedy NMS with its pixel-inclusive IoU
    assert compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    pair = [det("apple", 0.9, (0, 0, 9, 9)), det("apple", 0.8, (5, 0, 14, 9)), det("apple", 0.7, (40, 40, 49, 49))]
    assert len(select_objects(pair, "two_object")["apple"]) == 3
    nms = select_objects(pair, "two_object", GenEvalRules(nms_threshold=0.3))["apple"]
    assert [d.score for d in nms] == [0.9, 0.7]
    assert len(select_objects(pair, "two_object", GenEvalRules(nms_threshold=0.34))["apple"]) == 3


# --------------------------------------------------------------------------------------------- colours


def test_colors_uses_the_injected_classifier_on_the_best_object():
    meta = OFFICIAL_LINES[3]  # a pink car
    pink = fixed_colour("pink")
    assert evaluate(meta, [det("car", 0.6)], IMAGE, pink) == (True, "")
    assert pink.calls == [("car", GENEVAL_COLORS)]  # every GenEval colour is a candidate
    ok, reason = evaluate(meta, [det("car", 0.6)], IMAGE, fixed_colour("red"))
    assert not ok and reason == "expected pink car>=1, found 0 pink; and 1 red"
    # only the best-scoring car is classified: a pink second car does not rescue a red first one
    by_score = lambda image, d, candidates: "red" if d.score > 0.7 else "pink"  # noqa: E731
    assert not evaluate(meta, [det("car", 0.8), det("car", 0.6, (300, 300, 350, 350))], IMAGE, by_score)[0]
    assert evaluate(meta, [det("car", 0.65), det("car", 0.9, (300, 300, 350, 350))], IMAGE,
                    lambda image, d, c: "pink" if d.score > 0.7 else "red")[0]
    # no car, no colour question
    assert evaluate(meta, [det("car", 0.2)], IMAGE, no_colour)[1] == "expected car>=1, found 0"


def test_color_attr_binds_each_colour_to_its_object():
    meta = OFFICIAL_LINES[5]  # a red bench and a blue dog
    objs = [det("bench", 0.7), det("dog", 0.8, (300, 300, 380, 380))]
    assert evaluate(meta, objs, IMAGE, colour_by_label({"bench": "red", "dog": "blue"}))[0]
    ok, reason = evaluate(meta, objs, IMAGE, colour_by_label({"bench": "blue", "dog": "red"}))
    assert not ok and "expected red bench>=1" in reason and "expected blue dog>=1" in reason
    assert not evaluate(meta, objs, IMAGE, colour_by_label({"bench": "red", "dog": "red"}))[0]
    assert not evaluate(meta, objs[:1], IMAGE, colour_by_label({"bench": "red"}))[0]


def test_colour_templates_and_crop():
    assert COLOR_TEMPLATES == ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}",
                               "a photo of a {c} object")
    assert colour_templates("tv remote")[1] == "a photo of a {c}-colored tv remote"
    assert colour_prompts("car", "pink") == ["a photo of a pink car", "a photo of a pink-colored car",
                                             "a photo of a pink object"]
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 5:15] = True
    crop = np.asarray(colour_crop(image, det("car", 0.9, (0, 5, 20, 25), mask)))
    assert crop.shape == (20, 20, 3)  # cropped to the box
    assert tuple(crop[10, 10]) == (255, 0, 0)  # inside the mask: the image
    assert tuple(crop[0, 0]) == (0x99, 0x99, 0x99)  # outside: GenEval's grey
    assert np.asarray(colour_crop(image, det("car", 0.9, (0, 5, 20, 25)))).min(axis=(0, 1)).tolist() == [255, 0, 0]


# -------------------------------------------------------------------------------------------- position


RELATION_OFFSETS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}


def placed(label, centre, size=50, score=0.9):
    cx, cy = centre
    return det(label, score, (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2))


@pytest.mark.parametrize("relation", list(RELATION_OFFSETS))
def test_position_each_relation_around_the_0_1_threshold(relation):
    # Two 50 px boxes: the offset is shrunk by 0.1 x (50 + 50) = 10 px and must keep more than half
    # its length, so the centres must be more than 20 px apart along the relation's axis.
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a cat {relation} a dog"}
    ux, uy = RELATION_OFFSETS[relation]
    dog = placed("dog", (256, 256))
    for distance, expected in ((21, True), (19, False), (80, True)):
        cat = placed("cat", (256 + ux * distance, 256 + uy * distance))
        ok, reason = evaluate(meta, [dog, cat], IMAGE, no_colour)
        assert ok is expected, (relation, distance, reason)
        if not ok:
            assert reason == f"expected cat {relation} target, found no relation to the target"
    # the opposite side fails with the opposite relation named
    cat = placed("cat", (256 - ux * 80, 256 - uy * 80))
    ok, reason = evaluate(meta, [dog, cat], IMAGE, no_colour)
    assert not ok and reason.startswith(f"expected cat {relation} target, found ")
    assert relation not in reason.split("found ")[1]
    # a position_threshold of 0 needs only half the offset's length along the axis
    cat = placed("cat", (256 + ux * 19, 256 + uy * 19))
    assert evaluate(meta, [dog, cat], IMAGE, no_colour, GenEvalRules(position_threshold=0.0))[0]


def test_relative_position_geometry():
    a, b = (0, 0, 50, 50), (100, 0, 150, 50)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 50, 50), (0, 0, 50, 50)) == set()
    # a diagonal 30 px each way between 50 px boxes: each axis keeps 20 of sqrt(1800) ~ 42 px, < half
    assert relative_position((0, 0, 50, 50), (30, 30, 80, 80)) == set()
    # far on a diagonal: both relations hold
    assert relative_position((0, 0, 10, 10), (200, 200, 210, 210)) == {"left of", "above"}
    # the same 19 px offset: too little between 50 px boxes (19 - 10 < 19 / 2), enough between 10 px ones
    assert relative_position((0, 0, 50, 10), (19, 0, 69, 10)) == set()
    assert relative_position((0, 0, 10, 10), (19, 0, 29, 10)) == {"left of"}


def test_position_needs_a_matched_target_and_every_object_placed():
    meta = OFFICIAL_LINES[4]  # a cat left of a dog
    ok, reason = evaluate(meta, [placed("cat", (100, 256))], IMAGE, no_colour)
    assert not ok and reason == "expected dog>=1, found 0\nno target for cat to be left of"
    two_cats = {**meta, "include": [meta["include"][0], {**meta["include"][1], "count": 2}]}
    dog = placed("dog", (256, 256))
    left, right = placed("cat", (100, 256), score=0.9), placed("cat", (400, 256), score=0.8)
    assert not evaluate(two_cats, [dog, left, right], IMAGE, no_colour)[0]
    assert evaluate(two_cats, [dog, left, placed("cat", (100, 400), score=0.8)], IMAGE, no_colour)[0]
    # with one cat asked for, only the best-scoring cat is placed
    assert evaluate(meta, [dog, left, right], IMAGE, no_colour)[0]


# ------------------------------------------------------------------------------------------- summary


def _results(tag, correct, wrong, prompt="p"):
    return [{"tag": tag, "correct": True, "prompt": f"{tag}-{prompt}"}] * correct + \
           [{"tag": tag, "correct": False, "prompt": f"{tag}-{prompt}"}] * wrong


def test_summarize_means_images_per_task_then_tasks():
    results = (_results("single_object", 3, 1) + _results("two_object", 1, 1) + _results("counting", 0, 1)
               + _results("colors", 1, 0) + _results("position", 0, 2) + _results("color_attr", 1, 3))
    s = summarize(results)
    assert s["tasks"] == {"single_object": 0.75, "two_object": 0.5, "counting": 0.0, "colors": 1.0,
                          "position": 0.0, "color_attr": 0.25}
    assert s["overall"] == pytest.approx(2.5 / 6)  # not 6 / 14, the per-image mean over all tasks
    assert s["image_accuracy"] == pytest.approx(6 / 14)
    assert s["counts"]["color_attr"] == {"correct": 1, "total": 4}
    assert s["missing_tasks"] == [] and s["images"] == 14
    assert s["prompts"] == 6 and s["prompt_accuracy"] == pytest.approx(4 / 6)  # any image right

    partial = summarize(_results("single_object", 1, 0) + _results("position", 1, 3))
    assert partial["tasks"]["counting"] is None
    assert partial["missing_tasks"] == ["two_object", "counting", "colors", "color_attr"]
    assert partial["overall"] == pytest.approx((1.0 + 0.25) / 2)  # over the tasks present
    assert summarize([])["overall"] is None
    with pytest.raises(ValueError, match="unknown tag 'shapes'"):
        summarize([{"tag": "shapes", "correct": True}])


def test_markdown_table_in_the_papers_layout():
    results = (_results("single_object", 99, 1) + _results("two_object", 3, 1) + _results("counting", 1, 2)
               + _results("colors", 4, 1) + _results("position", 1, 9) + _results("color_attr", 1, 1))
    table = result_table(summarize(results), "LaytonGen").to_markdown()
    assert table == (
        "| Method | Single Obj. | Two Obj. | Counting | Colors | Position | Color Attri. | Overall |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| LaytonGen | 0.99 | 0.75 | 0.33 | 0.80 | 0.10 | 0.50 | 0.58 |\n"
    )
    partial = result_table(summarize(_results("single_object", 1, 0)), "tiny").to_markdown()
    assert partial.splitlines()[2] == "| tiny | 1.00 | – | – | – | – | – | 1.00 |"


# -------------------------------------------------------------------------------------- the detector


@pytest.fixture(scope="module")
def detector(tmp_path_factory, one_torch_thread):
    from layton.detection import Mask2FormerDetector
    from layton.zoo.mask2former import write_tiny_mask2former

    path = write_tiny_mask2former(tmp_path_factory.mktemp("zoo") / "mask2former", seed=0)
    return Mask2FormerDetector(path, threshold=0.0)


def test_tiny_mask2former_release_layout(detector):
    from layton.geneval import COCO_INSTANCE_LABELS

    assert sorted(p.name for p in detector.path.iterdir()) == ["config.json", "model.safetensors",
                                                              "preprocessor_config.json"]
    config = json.loads((detector.path / "config.json").read_text())
    assert config["model_type"] == "mask2former" and config["backbone_config"]["model_type"] == "swin"
    assert [config["id2label"][str(i)] for i in range(80)] == list(COCO_INSTANCE_LABELS)
    # transformers' COCO names map onto GenEval's object_names.txt, index for index
    assert detector.labels == list(GENEVAL_CLASSES)
    assert detector.labels[64:67] == ["computer mouse", "tv remote", "computer keyboard"]


def test_tiny_mask2former_detects(detector):
    from skimage import data

    from layton.detection import mask_to_box

    photo = Image.fromarray(data.astronaut()).resize((256, 256))
    wide = Image.fromarray(data.coffee()).resize((200, 120))  # another size: its own batch
    found = detector.detect([photo, wide, photo])
    assert len(found) == 3
    for image, dets in zip((photo, wide, photo), found):
        assert dets and all(isinstance(d, Detection) for d in dets)
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert d.label in GENEVAL_CLASSES and 0.0 <= d.score <= 1.0
            assert d.mask.dtype == bool and d.mask.shape == (image.height, image.width) and d.mask.any()
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert d.box == mask_to_box(d.mask)
    assert [(d.label, d.score) for d in found[0]] == [(d.label, d.score) for d in found[2]]
    # the detections feed the rules as they are
    row = result_row("00000/samples/0000.png", OFFICIAL_LINES[5], found[0], photo, fixed_colour("red"))
    assert row["tag"] == "color_attr" and isinstance(row["correct"], bool)


def test_mask_to_box_follows_mmdet():
    from layton.detection import mask_to_box

    mask = np.zeros((20, 30), dtype=bool)
    mask[3:7, 10:25] = True
    assert mask_to_box(mask) == (10.0, 3.0, 25.0, 7.0)


def test_missing_detector_directory_is_named(tmp_path):
    from layton.detection import Mask2FormerDetector
    from layton.model_files import ModelFileError

    missing = tmp_path / "no-such-mask2former"
    with pytest.raises(ModelFileError, match=str(missing)):
        Mask2FormerDetector(missing)
