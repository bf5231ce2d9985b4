"""The COCO data layer: conversion, label mapping, and a corpus of bad or odd inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from detector.core.errors import DatasetError
from detector.data.coco import CocoDetection, CocoIndex, LabelMap
from detector.evaluation.cocoeval import evaluate_coco
from tests.conftest import run_tool_in_process, shared_data, write_coco

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def base() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        ],
        "categories": copy.deepcopy(CATS),
    }


def load(tmp_path, data, **kw) -> CocoIndex:
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return CocoIndex(p, **kw)


def test_xywh_to_xyxy_and_labels(tmp_path):
    idx = load(tmp_path, base())
    boxes, labels, crowd = idx.annotations(0)
    np.testing.assert_allclose(boxes, [[10, 20, 40, 60]])
    assert labels.tolist() == [1] and crowd.tolist() == [False]
    assert idx.annotations(1)[1].tolist() == [2]
    assert idx.label_map.names == ("cat", "dog")


def test_label_map_gaps_zero_and_placeholder(tmp_path):
    d = base()
    d["categories"] = [
        {"id": 0, "name": "animals", "supercategory": "none"},
        {"id": 7, "name": "cat", "supercategory": "animals"},
        {"id": 3, "name": "dog", "supercategory": "animals"},
        {"id": 9, "name": "bird", "supercategory": "animals"},  # unused, but a real class: kept
    ]
    d["annotations"][0]["category_id"] = 7
    d["annotations"][1]["category_id"] = 3
    idx = load(tmp_path, d)
    lm = idx.label_map
    assert lm.category_ids == (3, 7, 9) and lm.names == ("dog", "cat", "bird")
    assert idx.dropped_categories == [(0, "animals")]
    assert lm.to_labels(np.array([7, 3, 9])).tolist() == [2, 1, 3]
    assert lm.to_category_ids(np.array([2, 1, 3])).tolist() == [7, 3, 9]
    assert LabelMap.from_dict(lm.to_dict()) == lm
    with pytest.raises(ValueError):
        lm.to_category_ids(np.array([0]))


def _same_name_twice() -> dict:
    d = base()
    d["images"][1]["file_name"] = "b.jpg"
    d["categories"] = [{"id": 1, "name": "car"}, {"id": 2, "name": "car"}]
    return d


def test_two_categories_with_one_name_are_refused_naming_both_ids(tmp_path):
    # class 1 found perfectly and class 2 missed would be reported as one 'car' result
    with pytest.raises(DatasetError, match=r"ann\.json: categories share a name \('car' is category 1 and 2\)"):
        load(tmp_path, _same_name_twice())
    d = _same_name_twice()  # a second, unused 'car' would still be a second class of that name
    d["annotations"][1]["category_id"] = 1
    with pytest.raises(DatasetError, match="'car' is category 1 and 2"):
        load(tmp_path, d, on_invalid="repair")


def test_evaluate_and_check_dataset_refuse_two_categories_with_one_name(tmp_path, capsys):
    d = _same_name_twice()
    gt = tmp_path / "ann.json"
    gt.write_text(json.dumps(d))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "score": 0.9}]))
    for tool, args in (("evaluate.py", ["--predictions", preds, "--annotations", gt]),
                       ("check_dataset.py", [gt, tmp_path])):  # fmt: skip
        capsys.readouterr()
        assert run_tool_in_process(tool, *args) == 2, tool
        err = capsys.readouterr().err
        assert "error:" in err and str(gt) in err and "'car' is category 1 and 2" in err, (tool, err)


def test_a_label_map_with_one_name_twice_is_refused(tmp_path):
    # e.g. a checkpoint trained before such files were refused, evaluated on a fixed json
    old = LabelMap((1, 2), ("cat", "cat"))
    with pytest.raises(DatasetError, match=r"^best\.pt: categories share a name \('cat' is category 1 and 2\)") as err:
        load(tmp_path, base(), label_map=old, label_source="best.pt")
    assert "train it again" in str(err.value) and "relabel" not in str(err.value)  # a checkpoint cannot be relabelled


def test_roboflow_placeholder_named_as_its_only_class(tmp_path):
    # a one-class Roboflow export: placeholder 0 'car' (unused) and class 1 'car' under it
    d = base()
    d["categories"] = [
        {"id": 0, "name": "car", "supercategory": "none"},
        {"id": 1, "name": "car", "supercategory": "car"},
    ]
    d["annotations"][1]["category_id"] = 1
    idx = load(tmp_path, d)
    assert idx.label_map.category_ids == (1,) and idx.label_map.names == ("car",)
    assert idx.dropped_categories == [(0, "car")]
    # COCO's own 'person' is its own supercategory: unused, it stays a class
    d["categories"] = [{"id": 1, "name": "car", "supercategory": "vehicle"},
                       {"id": 2, "name": "person", "supercategory": "person"}]  # fmt: skip
    assert load(tmp_path, d).label_map.names == ("car", "person")


def test_zero_based_category_used(tmp_path):
    d = base()
    d["categories"] = [{"id": 0, "name": "car"}, {"id": 1, "name": "bike"}]
    d["annotations"][0]["category_id"] = 0
    d["annotations"][1]["category_id"] = 1
    idx = load(tmp_path, d)
    assert idx.label_map.category_ids == (0, 1)
    assert idx.annotations(0)[1].tolist() == [1]


def test_empty_images_are_negatives_unless_dropped(tmp_path):
    d = base()
    d["images"].append({"id": 3, "file_name": "c.jpg", "width": 10, "height": 10})
    idx = load(tmp_path, d)
    assert len(idx) == 3
    boxes, labels, _ = idx.annotations(2)
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    idx2 = load(tmp_path, d, drop_empty=True)
    assert len(idx2) == 2
    assert idx2.repairs["images without annotations dropped (data.drop_empty)"] == 1


def test_crowd_kept_for_eval_not_for_training(tmp_path):
    d = base()
    d["annotations"].append({"id": 3, "image_id": 1, "category_id": 2, "bbox": [50, 10, 20, 20], "iscrowd": 1})
    idx = load(tmp_path, d)
    assert idx.iscrowd.sum() == 1
    Image.new("RGB", (100, 80)).save(tmp_path / "a.jpg")
    ds = CocoDetection(idx, tmp_path)
    _, target = ds[0]
    assert target["labels"].tolist() == [1]  # the crowd box is not a training target
    gt = idx.to_coco_gt()
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1


# -- the corpus of bad inputs: (mutation, expected message in "error" mode, repair count key) ---------


def _set(path, value):
    def f(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value

    return f


def _del(path):
    def f(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]

    return f


def _append(key, item):
    return lambda d: d[key].append(item)


BAD = [
    ("missing images", _del(["images"]), "'images' must be a list (missing)", None),
    ("annotations not a list", _set(["annotations"], {}), "'annotations' must be a list (dict)", None),
    ("categories missing", _del(["categories"]), "'categories' must be a list (missing)", None),
    ("image id string", _set(["images", 0, "id"], "1"), "images[0] (id 1): needs an integer 'id'", None),
    ("image without file_name", _del(["images", 0, "file_name"]), "images[0] (id 1): needs a 'file_name' string", None),
    ("image width missing", _del(["images", 0, "width"]), "width/height must be positive numbers", None),
    ("image height zero", _set(["images", 1, "height"], 0), "images[1] (id 2): width/height must be positive", None),
    ("absolute file_name", _set(["images", 0, "file_name"], "/etc/passwd"), "is absolute or contains '..'", None),
    ("dotdot file_name", _set(["images", 0, "file_name"], "../x.jpg"), "is absolute or contains '..'", None),
    (
        "duplicate image id",
        _append("images", {"id": 1, "file_name": "z.jpg", "width": 5, "height": 5}),
        "images[2] (id 1): image id 1 appears more than once",
        "duplicate image entries dropped (first kept)",
    ),
    (
        "duplicate annotation id",
        _set(["annotations", 1, "id"], 1),
        "annotations[1] (id 1): annotation id 1 appears more than once",
        "duplicate annotation ids (kept, renumbered)",
    ),
    (
        "annotation without id",
        _del(["annotations", 0, "id"]),
        "annotations[0] (id None): has no 'id'",
        "annotations without id (kept)",
    ),
    (
        "unknown image",
        _set(["annotations", 0, "image_id"], 99),
        "annotations[0] (id 1): image_id 99 is not in 'images'",
        "annotations of unknown images dropped",
    ),
    (
        "unknown category",
        _set(["annotations", 0, "category_id"], 5),
        "annotations[0] (id 1): category_id 5 is not in 'categories'",
        "annotations of unknown categories dropped",
    ),
    (
        "bbox of 3 numbers",
        _set(["annotations", 0, "bbox"], [1, 2, 3]),
        "bbox must be 4 finite numbers [x, y, w, h], got [1, 2, 3]",
        "annotations with a malformed bbox dropped",
    ),
    (
        "bbox with string",
        _set(["annotations", 0, "bbox"], [1, 2, "3", 4]),
        "bbox must be 4 finite numbers",
        "annotations with a malformed bbox dropped",
    ),
    ("bbox missing", _del(["annotations", 0, "bbox"]), "got None", "annotations with a malformed bbox dropped"),
    (
        "bbox NaN",
        _set(["annotations", 0, "bbox"], [1, 2, float("nan"), 4]),
        "bbox must be 4 finite numbers",
        "annotations with a malformed bbox dropped",
    ),
    (
        "bbox infinite",
        _set(["annotations", 0, "bbox"], [1, 2, float("inf"), 4]),
        "bbox must be 4 finite numbers",
        "annotations with a malformed bbox dropped",
    ),
    (
        "zero width",
        _set(["annotations", 0, "bbox"], [10, 10, 0, 5]),
        "bbox width and height must be > 0",
        "annotations with zero or negative width/height dropped",
    ),
    (
        "negative height",
        _set(["annotations", 0, "bbox"], [10, 10, 5, -5]),
        "bbox width and height must be > 0",
        "annotations with zero or negative width/height dropped",
    ),
    (
        "box overhangs right edge",
        _set(["annotations", 0, "bbox"], [90, 10, 30, 10]),
        "leaves the 100x80 image",
        "boxes overhanging the image clipped for training (evaluated as written)",
    ),
    (
        "box entirely outside",
        _set(["annotations", 0, "bbox"], [200, 200, 10, 10]),
        "lies outside the 100x80 image",
        "boxes outside the image (nothing left after clipping) dropped",
    ),
    (
        "negative origin",
        _set(["annotations", 0, "bbox"], [-20, 5, 30, 10]),
        "leaves the 100x80 image",
        "boxes overhanging the image clipped for training (evaluated as written)",
    ),
    ("category without id", _set(["categories", 0], {"name": "x"}), "categories[0]: needs an integer 'id'", None),
    (
        "duplicate category id",
        _append("categories", {"id": 1, "name": "again"}),
        "categories[2]: category id 1 appears twice",
        None,
    ),
    ("annotation not an object", _append("annotations", [1, 2]), "annotations[2]: must be an object", None),
]


@pytest.mark.parametrize("name, mutate, message, repair_key", BAD, ids=[b[0] for b in BAD])
def test_bad_input_error_names_location(tmp_path, name, mutate, message, repair_key):
    d = base()
    mutate(d)
    with pytest.raises(DatasetError) as err:
        load(tmp_path, d, on_invalid="error")  # the strict mode: every case is an error
    text = str(err.value)
    assert str(tmp_path / "ann.json") in text
    assert message in text


@pytest.mark.parametrize("name, mutate, message, repair_key", [b for b in BAD if b[3]], ids=[b[0] for b in BAD if b[3]])
def test_bad_input_repaired_and_counted(tmp_path, name, mutate, message, repair_key):
    d = base()
    mutate(d)
    idx = load(tmp_path, d, on_invalid="repair")
    assert idx.repairs[repair_key] == 1
    assert np.all(idx.boxes[:, 2:] > idx.boxes[:, :2])
    assert np.all(idx.boxes >= 0) and np.all(idx.boxes[:, 2] <= 100)
    assert "repaired: " + repair_key in idx.summary()


def test_repair_clips_to_image(tmp_path):
    d = base()
    d["annotations"][0]["bbox"] = [90, 10, 30, 10]
    idx = load(tmp_path, d, on_invalid="repair")
    np.testing.assert_allclose(idx.annotations(0)[0], [[90, 10, 100, 20]])


def test_small_overhang_clipped_and_counted_in_error_mode(tmp_path):
    d = base()
    d["annotations"][0]["bbox"] = [70.5, 10, 30, 10]  # 0.5 px past the right edge
    idx = load(tmp_path, d, on_invalid="error")
    assert idx.repairs["boxes overhanging the image by <= 1 px clipped for training"] == 1


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoIndex(tmp_path / "x.json")
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoIndex(tmp_path / "missing.json")
    (tmp_path / "l.json").write_text("[]")
    with pytest.raises(DatasetError, match="top level must be an object"):
        CocoIndex(tmp_path / "l.json")


def test_error_lists_every_problem_and_counts(tmp_path):
    d = base()
    for i in range(30):
        d["annotations"].append({"id": 100 + i, "image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1]})
    with pytest.raises(DatasetError) as err:
        load(tmp_path, d)
    assert "30 problem(s) (empty bbox: 30)" in str(err.value)
    assert "and 10 more" in str(err.value)


def test_subfolders_and_backslashes(tmp_path):
    d = base()
    d["images"][0]["file_name"] = "sub\\dir\\a.jpg"
    idx = load(tmp_path, d)
    assert idx.file_name(0) == "sub/dir/a.jpg"
    d["images"][0]["file_name"] = "/abs/a.jpg"
    assert load(tmp_path, d, allow_outside_root=True).file_name(0) == "/abs/a.jpg"


def test_val_split_with_train_label_map(tmp_path):
    train = load(tmp_path, base())
    d = base()
    d["categories"].append({"id": 3, "name": "cow"})
    d["annotations"][1]["category_id"] = 3
    p = tmp_path / "val.json"
    p.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"category 3 'cow' \(in the training split: no such id\)"):
        CocoIndex(p, label_map=train.label_map)
    val = CocoIndex(p, label_map=train.label_map, on_invalid="repair")
    assert val.label_map == train.label_map
    assert val.repairs["annotations of category 3 'cow' (not a training class) dropped"] == 1


def test_index_is_numpy_not_python_objects(tmp_path):
    idx = load(tmp_path, base())
    for name, value in vars(idx).items():
        if isinstance(value, np.ndarray):
            assert value.dtype != object, name
    assert not any(isinstance(v, list) and len(v) == len(idx) for v in vars(idx).values())


# -- ground truth fed back as predictions scores mAP 1.0, whatever the ids -------------------------


def _gt_as_predictions(idx: CocoIndex) -> list[dict]:
    gt = idx.to_coco_gt()
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def test_gt_as_predictions_scores_one_with_zero_ids(tmp_path):
    d = base()
    # image ids and annotation ids starting at 0, category id 0 used: pycocotools' trap
    d["images"][0]["id"], d["images"][1]["id"] = 0, 1
    d["categories"] = [{"id": 0, "name": "car"}, {"id": 1, "name": "bike"}]
    d["annotations"] = [
        {"id": 0, "image_id": 0, "category_id": 0, "bbox": [10, 20, 30, 40]},
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]},
        {"id": 2, "image_id": 0, "category_id": 1, "bbox": [60, 10, 30, 30]},
    ]
    idx = load(tmp_path, d)
    res = evaluate_coco(idx.to_coco_gt(), _gt_as_predictions(idx))
    assert res.stats["mAP"] == pytest.approx(1.0)
    assert res.stats["mAP50"] == pytest.approx(1.0)


def test_gt_as_predictions_on_demo_data(tiny_dataset):
    idx = CocoIndex(tiny_dataset["val"])
    res = evaluate_coco(idx.to_coco_gt(), _gt_as_predictions(idx))
    assert res.stats["mAP"] == pytest.approx(1.0)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_roboflow_export(split):
    path = shared_data("rbc_roboflow", split, "_annotations.coco.json")
    idx = CocoIndex(path)
    assert idx.label_map.names == ("rbc", "wbc")
    assert idx.dropped_categories == [(0, "RBC-WBC")]
    res = evaluate_coco(idx.to_coco_gt(), _gt_as_predictions(idx))
    assert res.stats["mAP"] == pytest.approx(1.0)  # annotation ids start at 0 there


def test_no_predictions_gives_zero(tmp_path):
    idx = load(tmp_path, base())
    res = evaluate_coco(idx.to_coco_gt(), [])
    assert res.stats["mAP"] == 0.0 and res.num_detections == 0


def test_write_coco_helper_roundtrip(tmp_path):
    p = write_coco(tmp_path / "x.json", base()["images"], base()["annotations"], CATS)
    assert len(CocoIndex(p)) == 2


def test_fast_and_item_by_item_parsers_agree(tiny_dataset, tmp_path, monkeypatch):
    d = base()
    d["annotations"][0]["bbox"] = [70.5, 10, 30, 10]  # a small overhang: clipped and counted by both
    d["annotations"][1]["iscrowd"] = 1
    del d["annotations"][1]["area"]
    paths = [tiny_dataset["train"], tmp_path / "ann.json"]
    paths[1].write_text(json.dumps(d))
    for path in paths:
        fast = CocoIndex(path)
        monkeypatch.setattr(CocoIndex, "_parse_annotations_fast", lambda *a, **k: None)
        slow = CocoIndex(path)
        monkeypatch.undo()
        for attr in ("image_ids", "ann_start", "boxes", "category_ids", "labels", "iscrowd", "areas"):
            np.testing.assert_array_equal(getattr(fast, attr), getattr(slow, attr), err_msg=attr)
        assert fast.repairs == slow.repairs
