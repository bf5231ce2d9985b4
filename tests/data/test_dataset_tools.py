"""tools/convert_dataset.py, split_dataset.py, merge_datasets.py: round trips through YOLO, VOC,
CVAT and labelme, and splits that keep every image once, groups whole and class shares close."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.core.errors import DatasetError
from detector.data.coco import CocoIndex
from detector.evaluation.cocoeval import evaluate_coco
from tests.conftest import run_tool_in_process, write_coco

pytestmark = [pytest.mark.xdist_group("dataset_tools")]  # its module fixtures are built once, on one xdist worker

NAMES = ["cat", "dog", "zebra"]  # "zebra" unused by some images; YOLO index order differs from sorted order below


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> dict:
    """12 small images of various sizes (some in a subfolder, two without objects, one with an
    EXIF rotation whose labels are on the displayed image, so YOLO's normalised boxes only come
    back right with the size after EXIF) and their boxes on integer pixel edges (so VOC's
    integer coordinates can hold them exactly)."""
    root = tmp_path_factory.mktemp("convert")
    images_dir = root / "images"
    rng = random.Random(3)
    images, anns = [], []
    for i in range(12):
        w, h = rng.randint(64, 128), rng.randint(64, 128)
        name = f"{'sub/' if i % 4 == 0 else ''}img_{i:02d}.jpg"
        (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
        if i == 5:  # stored h x w with EXIF "rotate 90": displayed (and labelled) w x h
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.new("RGB", (h, w), (i * 20, 40, 90)).save(images_dir / name, exif=exif)
        else:
            Image.new("RGB", (w, h), (i * 20, 40, 90)).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for _ in range(0 if i in (3, 7) else rng.randint(1, 3)):
            bw, bh = rng.randint(8, w // 2), rng.randint(8, h // 2)
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": rng.randint(1, 3),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})  # fmt: skip
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]
    gt = write_coco(root / "truth.json", images, anns, cats)
    return {"root": root, "images": images_dir, "gt": gt, "data": json.loads(gt.read_text())}


def refused(capsys, tool: str, *args) -> str:
    """Run a tool that must refuse its input: exit code 2, the error message returned."""
    capsys.readouterr()
    assert run_tool_in_process(tool, *args) == 2
    return capsys.readouterr().err


def _by_image(data: dict) -> dict[str, list[tuple[str, list[float]]]]:
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list] = {f: [] for f in files.values()}
    for a in data["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return out


def _assert_round_trip(truth: dict, converted: Path) -> None:
    """The converted file loads strictly, holds the same images, class names and boxes, and
    scored as predictions against the truth gives mAP 1.0."""
    CocoIndex(converted, on_invalid="error", images_root=truth["images"])
    data = json.loads(converted.read_text())
    want, got = _by_image(truth["data"]), _by_image(data)
    assert set(got) == set(want)  # every image, negatives included
    for f in want:
        w = sorted((n, b) for n, b in want[f])
        g = sorted((n, b) for n, b in got[f])
        assert [n for n, _ in g] == [n for n, _ in w], f
        np.testing.assert_allclose([b for _, b in g], [b for _, b in w], atol=1e-6, err_msg=f)
    # GT as predictions: image and category matched by file name and class name
    img_id = {im["file_name"]: im["id"] for im in truth["data"]["images"]}
    cat_id = {c["name"]: c["id"] for c in truth["data"]["categories"]}
    rows = [{"image_id": img_id[f], "category_id": cat_id[n], "bbox": b, "score": 1.0}
            for f, boxes in got.items() for n, b in boxes]  # fmt: skip
    result = evaluate_coco(CocoIndex(truth["gt"]).to_coco_gt(), rows)
    assert result.stats["mAP"] == pytest.approx(1.0)


def test_yolo_round_trip(truth, tmp_path, capsys):
    labels = tmp_path / "labels"
    yolo_order = ["zebra", "cat", "dog"]  # index order differs from the COCO ids: names must follow
    (tmp_path / "data.yaml").write_text("names:\n" + "".join(f"  {k}: {n}\n" for k, n in enumerate(yolo_order)))
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in truth["data"]["images"]}
    for f, boxes in _by_image(truth["data"]).items():
        if not boxes and f.endswith("07.jpg"):
            continue  # a negative without a label file at all; img_03 gets an empty one
        w, h = sizes[f]
        lines = [f"{yolo_order.index(n)} {(x + bw / 2) / w!r} {(y + bh / 2) / h!r} {bw / w!r} {bh / h!r}"
                 for n, (x, y, bw, bh) in boxes]  # fmt: skip
        (labels / f).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
        (labels / f).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "yolo.json"
    assert run_tool_in_process("convert_dataset.py", "yolo", labels, "--images", truth["images"], "--output", out) == 0
    _assert_round_trip(truth, out)
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == yolo_order  # class names kept

    (labels / "sub" / "img_00.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.95 0.5 0.3 0.2\n7 0.5 0.5 0.1 0.1\n")
    err = refused(capsys, "convert_dataset.py", "yolo", labels, "--images", truth["images"], "--output", out)
    assert "img_00.txt:2: box leaves the image" in err
    assert "img_00.txt:3: class '7' is not an index 0..2" in err


def _voc_xml(name: str, w: int, h: int, boxes) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
        f"<xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox></object>"
        for n, (x, y, bw, bh) in boxes
    )
    return f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"


def test_voc_round_trip(truth, tmp_path, capsys):
    """VOC devkit coordinates (1-based, inclusive) come back as the COCO boxes they were made from."""
    xmls = tmp_path / "Annotations"
    xmls.mkdir()
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in truth["data"]["images"]}
    for f, boxes in _by_image(truth["data"]).items():
        (xmls / (Path(f).stem + ".xml")).write_text(_voc_xml(f, *sizes[f], boxes))
    first = xmls / "img_00.xml"
    first.write_text(first.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    out = tmp_path / "voc.json"
    capsys.readouterr()
    assert run_tool_in_process("convert_dataset.py", "voc", xmls, "--images", truth["images"], "--output", out) == 0
    assert "VOC objects marked difficult (kept as ordinary annotations): 1" in capsys.readouterr().out
    _assert_round_trip(truth, out)
    # the other convention on the same files: every box moves by one pixel, so the strict boxes differ
    run_tool_in_process("convert_dataset.py", "voc", xmls, "--images", truth["images"], "--output", out,
                        "--voc-origin", "0")  # fmt: skip
    first = json.loads(out.read_text())["annotations"][0]["bbox"]
    assert first[2] == _by_image(truth["data"])[json.loads(out.read_text())["images"][0]["file_name"]][0][1][2] - 1

    (xmls / "broken.xml").write_text("<annotation><filename>x.jpg</filename>")
    err = refused(capsys, "convert_dataset.py", "voc", xmls, "--images", truth["images"], "--output", out)
    assert "broken.xml: not a Pascal VOC annotation" in err


def test_voc_origin_1_on_a_zero_based_export_warns(truth, tmp_path, capsys):
    """A 0-based VOC export (CVAT, Label Studio) read as 1-based moves every box 1 px: a
    coordinate of 0, which 1-based indices cannot have, says so."""
    im = next(i for i in truth["data"]["images"] if "/" not in i["file_name"])
    xmls = tmp_path / "Annotations"
    xmls.mkdir()
    obj = "<object><name>cat</name><bndbox><xmin>0</xmin><ymin>5</ymin><xmax>10</xmax><ymax>15</ymax></bndbox></object>"
    xmls.joinpath("a.xml").write_text(_voc_xml(im["file_name"], im["width"], im["height"], []).replace(
        "</annotation>", obj + "</annotation>"))  # fmt: skip
    out = tmp_path / "voc.json"
    args = ["voc", xmls, "--images", truth["images"], "--output", out]
    capsys.readouterr()
    assert run_tool_in_process("convert_dataset.py", *args) == 0
    err = capsys.readouterr().err
    assert f"warning: 1 VOC object(s) have a coordinate of 0 (e.g. {xmls / 'a.xml'} object 1)" in err
    assert "--voc-origin 0" in err
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [-1, 4, 11, 11]  # what the warning is about
    assert run_tool_in_process("convert_dataset.py", *args, "--voc-origin", "0") == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [0, 5, 10, 10]


def test_labelme_include_poly_and_classes_order(truth, tmp_path, capsys):
    """--include-poly turns polygons into their boxes (left out, counted, without it); --classes
    sets the category order (sorted by name otherwise) and refuses a label it does not list."""
    root = tmp_path / "lm"
    root.mkdir()
    im = next(i for i in truth["data"]["images"] if "/" not in i["file_name"])
    (root / "a.jpg").write_bytes((truth["images"] / im["file_name"]).read_bytes())
    shapes = [{"label": "zebra", "points": [[1, 2], [11, 12]], "shape_type": "rectangle"},
              {"label": "cat", "points": [[20, 5], [30, 9], [25, 30]], "shape_type": "polygon"}]  # fmt: skip
    (root / "a.json").write_text(json.dumps({"imagePath": "a.jpg", "imageWidth": im["width"],
                                             "imageHeight": im["height"], "imageData": None, "shapes": shapes}))  # fmt: skip
    out = tmp_path / "o.json"
    args = ["labelme", root, "--images", root, "--output", out]
    capsys.readouterr()
    assert run_tool_in_process("convert_dataset.py", *args) == 0
    assert "labelme shapes other than rectangles ignored: 1" in capsys.readouterr().out
    assert [a["bbox"] for a in json.loads(out.read_text())["annotations"]] == [[1, 2, 10, 10]]
    assert run_tool_in_process("convert_dataset.py", *args, "--include-poly") == 0
    data = json.loads(out.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert list(names.values()) == ["cat", "zebra"]  # sorted by name without --classes
    assert sorted((names[a["category_id"]], a["bbox"]) for a in data["annotations"]) == [
        ("cat", [20, 5, 10, 25]), ("zebra", [1, 2, 10, 10])]  # fmt: skip
    classes = tmp_path / "classes.txt"
    classes.write_text("zebra\ndog\ncat\n")
    assert run_tool_in_process("convert_dataset.py", *args, "--include-poly", "--classes", classes) == 0
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["zebra", "dog", "cat"]  # the given order, unused kept
    assert {a["category_id"] for a in data["annotations"]} == {1, 3}
    classes.write_text("zebra\ndog\n")
    err = refused(capsys, "convert_dataset.py", *args, "--include-poly", "--classes", classes)
    assert "a.json shape 2: class 'cat' is not one of the given class names ['zebra', 'dog']" in err


def test_cvat_and_labelme_round_trip(truth, tmp_path, capsys):
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in truth["data"]["images"]}
    by_image = _by_image(truth["data"])
    labels = "".join(f"<label><name>{n}</name></label>" for n in NAMES)
    imgs = "".join(
        f'<image id="{k}" name="{f}" width="{sizes[f][0]}" height="{sizes[f][1]}">'
        + "".join(
            f'<box label="{n}" xtl="{x}" ytl="{y}" xbr="{x + bw}" ybr="{y + bh}" occluded="0"/>'
            for n, (x, y, bw, bh) in boxes
        )  # fmt: skip
        + "</image>"
        for k, (f, boxes) in enumerate(by_image.items())
    )
    xml = tmp_path / "annotations.xml"
    xml.write_text(
        f"<annotations><version>1.1</version><meta><task><labels>{labels}</labels></task></meta>{imgs}</annotations>"
    )
    out = tmp_path / "cvat.json"
    assert run_tool_in_process("convert_dataset.py", "cvat", xml, "--images", truth["images"], "--output", out) == 0
    _assert_round_trip(truth, out)
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == NAMES  # CVAT's label order

    lm = truth["images"]  # labelme writes its json beside the image: imagePath relative to it
    written = []
    for f, boxes in by_image.items():
        shapes = [{"label": n, "points": [[x, y], [x + bw, y + bh]], "shape_type": "rectangle"}
                  for n, (x, y, bw, bh) in boxes]  # fmt: skip
        js = (lm / f).with_suffix(".json")
        js.write_text(json.dumps({"imagePath": Path(f).name, "imageWidth": sizes[f][0], "imageHeight": sizes[f][1],
                                  "shapes": shapes, "imageData": None}))  # fmt: skip
        written.append(js)
    out = tmp_path / "labelme.json"
    try:
        assert run_tool_in_process("convert_dataset.py", "labelme", lm, "--images", lm, "--output", out) == 0
        _assert_round_trip(truth, out)
        written.append(lm / "broken.json")
        written[-1].write_text('{"shapes": []}')
        err = refused(capsys, "convert_dataset.py", "labelme", lm, "--images", lm, "--output", out)
        assert "broken.json: not a labelme file" in err
    finally:
        for js in written:
            js.unlink()
    xml.write_text(xml.read_text().replace('occluded="0"', 'occluded="0" rotation="30"', 1))
    err = refused(capsys, "convert_dataset.py", "cvat", xml, "--images", truth["images"], "--output", out)
    assert "box 1: rotated by 30 degrees" in err


def test_convert_result_is_checked_against_the_images(truth, tmp_path, capsys):
    """A VOC file whose size is not the image's is refused by the data layer's own check."""
    xmls = tmp_path / "Annotations"
    xmls.mkdir()
    xmls.joinpath("a.xml").write_text(_voc_xml("img_01.jpg", 300, 200, [("cat", (1, 1, 10, 10))]))
    xmls.joinpath("b.xml").write_text(_voc_xml("nope.jpg", 300, 200, []))
    err = refused(
        capsys, "convert_dataset.py", "voc", xmls, "--images", truth["images"], "--output", tmp_path / "o.json"
    )
    assert "img_01.jpg: decoded size" in err and "nope.jpg" in err
    assert f"{tmp_path / 'o.json'} (not written)" in err
    assert not list(tmp_path.glob("o.json*"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """120 frames of 40 'videos' (3 frames each, file names video_NN_fK.jpg): a main class per
    video (car 20 videos, bus 12, bike 8), some frames with a second class, a few negatives."""
    rng = random.Random(0)
    images, anns = [], []
    for v in range(40):
        cls = 1 if v < 20 else 2 if v < 32 else 3
        for k in range(3):
            iid = len(images) + 1
            images.append({"id": iid, "file_name": f"video_{v:02d}_f{k}.jpg", "width": 100, "height": 100})
            if v % 7 == 3 and k == 2:
                continue  # a negative frame
            extra = [1 + (cls % 3)] if rng.random() < 0.2 else []
            for c in [cls] * rng.randint(1, 2) + extra:
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": c, "bbox": [10, 10, 20, 20]})
    cats = [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}, {"id": 3, "name": "bike"}]
    return write_coco(tmp_path_factory.mktemp("split") / "all.json", images, anns, cats)


SHARE_TOLERANCE = 0.05  # stated: each class's share of annotations per split is within 0.05 of its ratio (worst seen over 30 seeds and 3 ratio sets: 0.03)


@pytest.mark.parametrize("ratios", [(0.8, 0.2), (0.6, 0.2, 0.2)])
def test_split_keeps_images_once_groups_whole_and_class_shares(videos, tmp_path, ratios):
    args = [videos, "--output-dir", tmp_path, "--ratios", *ratios, "--seed", "5", "--group-regex", r"^(video_\d+)_"]
    assert run_tool_in_process("split_dataset.py", *args) == 0
    names = ["train", "val", "test"][: len(ratios)]
    parts = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    full = json.loads(videos.read_text())
    files = [im["file_name"] for p in parts.values() for im in p["images"]]
    assert sorted(files) == sorted(im["file_name"] for im in full["images"])  # every image exactly once
    assert sum(len(p["annotations"]) for p in parts.values()) == len(full["annotations"])
    video_split = {}
    for n, p in parts.items():
        CocoIndex(tmp_path / f"{n}.json", on_invalid="error")
        for im in p["images"]:
            assert video_split.setdefault(im["file_name"][:8], n) == n, f"{im['file_name']} leaks across splits"
    for cid in (1, 2, 3):
        total = sum(a["category_id"] == cid for a in full["annotations"])
        for (n, p), r in zip(parts.items(), ratios):
            share = sum(a["category_id"] == cid for a in p["annotations"]) / total
            assert abs(share - r) <= SHARE_TOLERANCE, (cid, n, share, r)
    # the same seed gives the same split
    again = tmp_path / "again"
    run_tool_in_process("split_dataset.py", *[a if a != tmp_path else again for a in args])
    assert (again / "val.json").read_text() == (tmp_path / "val.json").read_text()


def test_split_and_merge_refuse_bad_input_like_the_data_layer(videos, tmp_path, capsys):
    bad = json.loads(videos.read_text())
    bad["annotations"][4]["bbox"] = [120, 120, 30, 30]  # outside the 100x100 image: nothing left to clip
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    for tool, args in (("split_dataset.py", [path, "--output-dir", tmp_path / "o"]),
                       ("merge_datasets.py", [videos, path, "--output", tmp_path / "m.json"])):  # fmt: skip
        with pytest.raises(DatasetError) as direct:  # the data layer's own message, as training loads it
            CocoIndex(path)
        err = refused(capsys, tool, *args)
        assert f"{path}: 1 problem(s)" in err and "annotations[4] (id 5)" in err
        assert str(direct.value).splitlines()[:2] == err.removeprefix("error: ").splitlines()[:2]
        assert "--on-invalid=repair" in err and "data.on_invalid" not in err  # the tool's own flag
    assert not list(tmp_path.glob("o/*")) and not list(tmp_path.glob("m.json*"))
    err = refused(capsys, "split_dataset.py", videos, "--output-dir", tmp_path / "o", "--group-regex", "^frame")
    assert "does not match 120 file name" in err


def _overhanging(videos: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The videos with one box 5.7 px past the right edge (as in a real CVAT export) and one
    box that lies wholly outside (nothing a clip can keep)."""
    data = json.loads(videos.read_text())
    data["annotations"][4]["bbox"] = [90, 10, 15.7, 20]
    path = tmp_path / "cvat.json"
    path.write_text(json.dumps(data))
    return path, data


@pytest.mark.parametrize("tool", ["split_dataset.py", "merge_datasets.py"])
def test_split_and_merge_take_on_invalid_as_training_does(videos, tmp_path, capsys, tool):
    path, data = _overhanging(videos, tmp_path)
    CocoIndex(path)  # training (data.on_invalid=clip, the default) accepts it
    out = tmp_path / "out"

    def run(*extra) -> tuple[int, list[dict], str]:
        capsys.readouterr()
        args = [path, "--output-dir", out] if tool == "split_dataset.py" else [path, "--output", out / "m.json"]
        code = run_tool_in_process(tool, *args, *extra)
        text = capsys.readouterr()
        anns = [a for f in sorted(out.glob("*.json")) for a in json.loads(f.read_text())["annotations"]]
        return code, anns, text.out + text.err

    code, anns, text = run()
    assert code == 0, text
    assert len(anns) == len(data["annotations"]) and [90, 10, 15.7, 20] in [a["bbox"] for a in anns]  # as written
    assert "boxes overhanging the image clipped for training" in text and ": 1" in text  # counted
    code, _, text = run("--on-invalid", "error")
    assert code == 2 and "annotations[4] (id 5)" in text and "--on-invalid=clip, the default" in text
    data["annotations"][5]["bbox"] = [120, 120, 5, 5]
    path.write_text(json.dumps(data))
    for f in out.glob("*.json"):
        f.unlink()
    code, anns, text = run("--on-invalid", "repair")
    assert code == 0, text
    assert len(anns) == len(data["annotations"]) - 1 and [120, 120, 5, 5] not in [a["bbox"] for a in anns]
    assert "boxes outside the image (nothing left after clipping) dropped: 1" in text


def test_split_refuses_bad_group_regex_and_ratios_without_writing(videos, tmp_path, capsys):
    out = tmp_path / "o"
    for args, message in (
        (["--group-regex", "^(vid0[0-4])?"], "its first group does not match 120 file name"),  # group took no part
        (["--group-regex", "^(video"], "is not a regular expression: missing ), unterminated subpattern"),
        (["--ratios", "0.8", "0.3"], "--ratios 0.8 + 0.3 = 1.1: the shares must sum to 1"),
    ):
        err = refused(capsys, "split_dataset.py", videos, "--output-dir", out, *args)
        assert message in err and "Traceback" not in err, (args, err)
    assert run_tool_in_process("split_dataset.py", videos, "--output-dir", out, "--ratios", 0.33, 0.33, 0.33) == 0


def test_a_failed_split_leaves_no_output_behind(videos, tmp_path, capsys, monkeypatch):
    """The second split failing its check must not leave the first one's train.json."""
    import detector.data.coco as coco

    real = coco.CocoIndex.__init__
    calls = []

    def fail_second_output(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:  # the input, train, then val
            raise DatasetError(f"{path}: refused for the test")
        real(self, path, *a, **kw)

    monkeypatch.setattr(coco.CocoIndex, "__init__", fail_second_output)
    err = refused(capsys, "split_dataset.py", videos, "--output-dir", tmp_path)
    assert "refused for the test" in err and len(calls) == 3
    assert not list(tmp_path.iterdir())


def test_merge_matches_categories_by_name(tmp_path, capsys):
    a = write_coco(
        tmp_path / "a.json",
        [{"id": 1, "file_name": "x.jpg", "width": 50, "height": 50}],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [1, 1, 6, 6]},
        ],
        [
            {"id": 0, "name": "animals"},
            {"id": 1, "name": "cat", "supercategory": "animals"},
            {"id": 2, "name": "dog", "supercategory": "animals"},
        ],
    )  # fmt: skip  (Roboflow's placeholder 0)
    b = write_coco(tmp_path / "b.json", [{"id": 1, "file_name": "x.jpg", "width": 50, "height": 50}],
                   [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [2, 2, 5, 5]},
                    {"id": 2, "image_id": 1, "category_id": 1, "bbox": [3, 3, 5, 5]}],
                   [{"id": 0, "name": "dog"}, {"id": 1, "name": "automobile"}])  # fmt: skip
    out = tmp_path / "m.json"
    assert "x.jpg' is also in" in refused(capsys, "merge_datasets.py", a, b, "--output", out)
    args = [a, b, "--output", out, "--prefix", "A", "B", "--rename", "automobile=car"]
    assert run_tool_in_process("merge_datasets.py", *args) == 0
    m = json.loads(out.read_text())
    names = {c["id"]: c["name"] for c in m["categories"]}
    assert list(names.values()) == ["cat", "dog", "car"]
    files = {im["id"]: im["file_name"] for im in m["images"]}
    got = sorted((files[x["image_id"]], names[x["category_id"]], x["bbox"]) for x in m["annotations"])
    assert got == [("A/x.jpg", "cat", [1, 1, 5, 5]), ("A/x.jpg", "dog", [1, 1, 6, 6]),
                   ("B/x.jpg", "car", [3, 3, 5, 5]), ("B/x.jpg", "dog", [2, 2, 5, 5])]  # fmt: skip
    assert CocoIndex(out, on_invalid="error").label_map.names == ("cat", "dog", "car")


def test_merge_refuses_file_names_that_are_one_file_under_one_root(tmp_path, capsys):
    cats = [{"id": 1, "name": "cat"}]
    ann = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    a = write_coco(tmp_path / "a.json", [{"id": 1, "file_name": "cam/x.jpg", "width": 50, "height": 50}], ann, cats)
    for other in ("./cam/x.jpg", "cam//X.JPG"):  # one file on disk (and on Windows/macOS) as cam/x.jpg
        b = write_coco(tmp_path / "b.json", [{"id": 1, "file_name": other, "width": 50, "height": 50}], ann, cats)
        err = refused(capsys, "merge_datasets.py", a, b, "--output", tmp_path / "m.json")
        assert f"{b}: images (id 1) file_name '{other}' is also 'cam/x.jpg' in {a}" in err and "--prefix" in err
        assert not list(tmp_path.glob("m.json*"))
    assert run_tool_in_process("merge_datasets.py", a, b, "--output", tmp_path / "m.json", "--prefix", "A", "B") == 0
    # within one file two names that differ by case are two files (Linux), as training takes them
    two = [{"id": 1, "file_name": "IMG.jpg", "width": 50, "height": 50}, {"id": 2, "file_name": "img.jpg", "width": 50,
                                                                         "height": 50}]  # fmt: skip
    one = write_coco(tmp_path / "one.json", two, ann, cats)
    assert run_tool_in_process("merge_datasets.py", one, a, "--output", tmp_path / "m2.json") == 0
    assert len(json.loads((tmp_path / "m2.json").read_text())["images"]) == 3


def test_check_dataset_warns_about_classes_without_annotations(videos, tmp_path, capsys):
    data = json.loads(videos.read_text())
    data["categories"] += [{"id": 4, "name": "tram"}, {"id": 5, "name": "ferry"}]
    data["annotations"].append({**data["annotations"][0], "id": 10**6, "category_id": 5, "iscrowd": 1})
    path = tmp_path / "all.json"
    path.write_text(json.dumps(data))
    for im in data["images"]:
        Image.new("RGB", (im["width"], im["height"])).save(tmp_path / im["file_name"])
    capsys.readouterr()
    assert run_tool_in_process("check_dataset.py", path, tmp_path) == 0  # a warning, not a problem
    out = capsys.readouterr().out
    assert "warning: 2 class(es) without (non-crowd) annotations: tram, ferry" in out
    assert run_tool_in_process("check_dataset.py", videos, tmp_path) == 0
    assert "without (non-crowd) annotations" not in capsys.readouterr().out


def test_group_keys():
    from detector.data.split import group_keys

    names = ["cam1/a.jpg", "cam1/b.jpg", "cam2/a.jpg", "c.jpg"]
    assert group_keys(names, "dir") == ["cam1", "cam1", "cam2", "."]
    assert group_keys(names, "none") == names
    assert group_keys(names[:3], regex=r"^cam(\d)/") == ["1", "1", "2"]  # the first group is the key
    with pytest.raises(DatasetError, match="does not match 1 file name"):
        group_keys(names, regex=r"^cam(\d)/")


def test_images_without_an_annotation_file_are_counted(truth, tmp_path, capsys):
    """VOC, CVAT and labelme list only annotated images: an image file under the root that no
    annotation names is not in the output, and the tool says how many (YOLO keeps them)."""
    xmls = tmp_path / "Annotations"
    xmls.mkdir()
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in truth["data"]["images"]}
    for f, boxes in list(_by_image(truth["data"]).items())[1:]:  # the first image has no xml
        (xmls / (Path(f).stem + ".xml")).write_text(_voc_xml(f, *sizes[f], boxes))
    out = tmp_path / "voc.json"
    capsys.readouterr()
    assert run_tool_in_process("convert_dataset.py", "voc", xmls, "--images", truth["images"], "--output", out) == 0
    assert "image files under the image root without annotations (left out): 1" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["images"]) == len(truth["data"]["images"]) - 1


def test_cvat_video_export_is_refused_by_name(truth, tmp_path, capsys):
    """A 'CVAT for video' export holds its boxes in <track> elements, which the image format's
    reader does not see: refused with what to export instead, not converted into an empty file."""
    xml = tmp_path / "annotations.xml"
    xml.write_text(
        "<annotations><version>1.1</version><meta><task><labels><label><name>cat</name></label></labels></task>"
        '</meta><track id="0" label="cat"><box frame="0" outside="0" occluded="0" keyframe="1" xtl="1" ytl="1" '
        'xbr="10" ybr="10" z_order="0"/></track></annotations>'
    )
    err = refused(
        capsys, "convert_dataset.py", "cvat", xml, "--images", truth["images"], "--output", tmp_path / "o.json"
    )
    assert f"{xml}: 1 track(s)" in err and "CVAT for images 1.1" in err


def test_split_refuses_the_same_output_name_twice(videos, tmp_path, capsys):
    """Two splits named alike would write one file over the other: half the images lost."""
    err = refused(capsys, "split_dataset.py", videos, "--output-dir", tmp_path, "--names", "train", "train")
    assert "--names" in err and "train" in err
    assert not list(tmp_path.glob("*.json"))


def test_labelme_image_files_may_be_symlinks(truth, tmp_path):
    """A labelme folder whose image files are symlinks into a cache (DVC, git-annex, a shared
    store): the file names stay those under the image root, not the links' targets."""
    root = tmp_path / "lm"
    root.mkdir()
    im = next(i for i in truth["data"]["images"] if "/" not in i["file_name"])
    (root / "a.jpg").symlink_to(truth["images"] / im["file_name"])
    (root / "a.json").write_text(json.dumps({"imagePath": "a.jpg", "imageWidth": im["width"],
                                             "imageHeight": im["height"], "imageData": None,
                                             "shapes": [{"label": "cat", "points": [[1, 2], [11, 12]],
                                                         "shape_type": "rectangle"}]}))  # fmt: skip
    out = tmp_path / "o.json"
    assert run_tool_in_process("convert_dataset.py", "labelme", root, "--images", root, "--output", out) == 0
    data = json.loads(out.read_text())
    assert [i["file_name"] for i in data["images"]] == ["a.jpg"] and data["annotations"][0]["bbox"] == [1, 2, 10, 10]


def test_an_output_that_fails_its_check_is_named_as_the_file_it_would_have_been(tmp_path, capsys, monkeypatch):
    """split and merge check each output from a temporary file: the error named FILE.json.tmp, which
    is deleted by then."""
    import detector.data.coco as coco

    class FailsOnOutputs(coco.CocoIndex):
        def __init__(self, path, *args, **kwargs):
            if str(path).endswith(".tmp"):
                raise coco.DatasetError(f"{path}: a problem in the output")
            super().__init__(path, *args, **kwargs)

    cats = [{"id": 1, "name": "cat"}]
    ims = [{"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 50} for i in (1, 2, 3, 4)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in (1, 2, 3, 4)]
    data = write_coco(tmp_path / "all.json", ims, anns, cats)
    monkeypatch.setattr(coco, "CocoIndex", FailsOnOutputs)
    err = refused(capsys, "merge_datasets.py", data, "--output", tmp_path / "m.json")
    assert f"{tmp_path / 'm.json'} (not written): a problem" in err and ".tmp" not in err
    err = refused(capsys, "split_dataset.py", data, "--output-dir", tmp_path / "s", "--ratios", "0.5", "0.5")
    assert f"{tmp_path / 's' / 'train.json'} (not written): a problem" in err and ".tmp" not in err
    assert not list(tmp_path.rglob("*.tmp"))
