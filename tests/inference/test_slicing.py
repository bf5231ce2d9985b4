"""Sliced inference (detector/inference/slicing.py) and training on tiles (detector/data/tiles.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

from detector.core.grid import tile_grid
from detector.inference.slicing import SliceSpec, detect_sliced
from tests.conftest import TINY, run_tool, run_tool_in_process, write_coco

# -- a detector whose sight depends on scale, as a real one's does -------------------------------


def blob_detector(model_side: int, min_px: int = 3, calls: list | None = None):
    """Finds bright squares, after shrinking its input as torchvision's transform does (so that
    neither side exceeds model_side) and only those at least min_px wide at that scale: an object
    of 16 px in a 1500 px image shrunk to 128 px is 1.4 px, below what it resolves."""
    from scipy import ndimage

    def detect(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if calls is not None:
            calls.append(len(images))
        out = []
        for im in images:
            h, w = im.shape[-2:]
            s = min(1.0, model_side / max(h, w))
            small = F.interpolate(im[None], scale_factor=s, mode="bilinear")[0] if s < 1 else im
            lab, _ = ndimage.label((small.mean(0) > 0.5).numpy())
            found = [
                [x.start / s, y.start / s, x.stop / s, y.stop / s]
                for y, x in ndimage.find_objects(lab)
                if y.stop - y.start >= min_px and x.stop - x.start >= min_px
            ]
            b = torch.tensor(found, dtype=torch.float32).reshape(-1, 4)
            out.append(
                {"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64), "scores": torch.full((len(b),), 0.9)}
            )
        return out

    return detect


def scene(w: int = 1500, h: int = 1000, n: int = 30, lo: int = 12, hi: int = 20, seed: int = 0):
    """White squares of lo..hi px on black, apart from each other: (image (3, h, w), boxes xyxy)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((3, h, w), np.float32)
    boxes: list[list[int]] = []
    while len(boxes) < n:
        s = int(rng.integers(lo, hi + 1))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        b = [x, y, x + s, y + s]
        if all(b[0] > o[2] + 2 or o[0] > b[2] + 2 or b[1] > o[3] + 2 or o[1] > b[3] + 2 for o in boxes):
            boxes.append(b)
            img[:, y : y + s, x : x + s] = 1.0
    return torch.from_numpy(img), np.array(boxes, np.float32)


# -- the grid, the mapping, the merge ---------------------------------------------------------------


@pytest.mark.parametrize("w,h,size,overlap", [(1500, 1000, 320, 0.2), (640, 480, 256, 0.5), (100, 80, 128, 0.2)])
def test_tile_grid_covers_the_image_with_the_overlap(w, h, size, overlap):
    tiles = tile_grid(w, h, size, overlap)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == min(size, w) and y1 - y0 == min(size, h)  # full tiles, the last moved back
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    ov = round(size * overlap)
    for axis in (0, 1):  # neighbours along each axis overlap by at least the overlap
        starts = np.unique(tiles[:, axis])
        if len(starts) > 1:
            assert (np.diff(starts) <= size - ov).all()


def test_sliced_finds_the_small_objects_that_the_whole_image_pass_misses():
    img, gt = scene()  # 1500x1000, 30 squares of 12-20 px
    detect = blob_detector(128)
    assert len(detect([img])[0]["boxes"]) == 0  # whole: shrunk to 128x85, the squares are < 2 px
    calls: list[int] = []
    out = detect_sliced(blob_detector(128, calls=calls), img, SliceSpec(128, 0.2), 4, (128, 128))
    n_tiles = len(tile_grid(1500, 1000, 128, 0.2))
    assert calls == [4] * (n_tiles // 4) + ([n_tiles % 4] if n_tiles % 4 else []) + [1]  # batches of tiles + full pass
    iou = box_iou(torch.from_numpy(gt), out["boxes"])
    assert (iou.max(1).values > 0.99).all()  # every square, at its place in the full image
    assert len(out["boxes"]) == len(gt)  # and once: the pieces cut by tile edges merged into it


def test_duplicates_across_tile_borders_merge_into_one_per_class():
    img = torch.zeros(3, 200, 300)
    img[:, 90:110, 95:115] = 1.0  # in the overlap of the tiles starting at x=0 and x=80, y=0 and y=80
    img[:, 40:60, 150:170] = 1.0  # cut by the edge x=160 of the first tile: whole in the next
    spec = SliceSpec(160, 0.5, full_pass=False)
    raw = [
        d["boxes"]
        for d in blob_detector(160)([img[:, y0:y1, x0:x1] for x0, y0, x1, y1 in tile_grid(300, 200, 160, 0.5)])
    ]
    assert sum(len(b) for b in raw) > 2  # each square is found in several tiles
    out = detect_sliced(blob_detector(160), img, spec, batch_size=2)
    want = torch.tensor([[95, 90, 115, 110], [150, 40, 170, 60]], dtype=torch.float32)
    assert len(out["boxes"]) == 2 and (box_iou(want, out["boxes"]).max(1).values > 0.99).all()
    nms_iou = detect_sliced(blob_detector(160), img, SliceSpec(160, 0.5, False, merge="nms", metric="iou"), 2)
    assert len(nms_iou["boxes"]) == 3  # IoU does not see the cut piece inside the whole square

    def two_classes(images):  # the same square as class 1 and as class 2: not duplicates
        dets = blob_detector(160)(images)
        return [{k: torch.cat([d[k], d[k] + (k == "labels")]) for k in d} for d in dets]

    both = detect_sliced(two_classes, img, spec, batch_size=2)
    assert sorted(both["labels"].tolist()) == [1, 1, 2, 2]


def test_slice_spec_rejects_bad_values():
    for bad in ({"size": 8}, {"overlap": 1.0}, {"overlap": -0.1}, {"iou": 0}, {"merge": "x"}, {"metric": "giou"}):
        with pytest.raises(ValueError):
            SliceSpec(**{"size": 64, **bad})


# -- the Predictor -----------------------------------------------------------------------------------


def test_predictor_slices_full_resolution_files_and_pastes_masks(tmp_path):
    from detector import config
    from detector.core.labels import LabelMap
    from detector.inference.predictor import Predictor
    from detector.models.build import build_model

    cfg = config.load(
        TINY.parent / "tiny_mask.yaml",
        ["data.synthetic.enabled=true", "model.box_score_thresh=0.0", "model.box_detections_per_img=5"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, ["a", "b"], lambda m: None).eval()
    arr = (np.random.default_rng(0).random((200, 320, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    p = Predictor(model, LabelMap((1, 2), ("a", "b")), batch_size=3, slicing=SliceSpec(128, 0.2))
    (det,) = p.predict(tmp_path / "big.jpg")
    n_tiles = len(tile_grid(320, 200, 128, 0.2))
    assert calls == [3] * (n_tiles // 3) + ([n_tiles % 3] if n_tiles % 3 else []) + [1]
    assert det.masks is not None and det.masks.shape == (len(det), 200, 320) and det.masks.dtype == bool
    assert len(det) > 0 and (det.boxes >= 0).all() and (det.boxes[:, [0, 2]] <= 320).all()
    assert (det.boxes[:, [1, 3]] <= 200).all()
    for box, mask in zip(det.boxes, det.masks):  # each mask inside its (merged) box
        ys, xs = np.nonzero(mask)
        if len(xs):
            assert xs.min() >= math.floor(box[0]) - 1 and xs.max() <= math.ceil(box[2]) + 1
            assert ys.min() >= math.floor(box[1]) - 1 and ys.max() <= math.ceil(box[3]) + 1


# -- training on tiles ----------------------------------------------------------------------------


def test_data_tile_clips_drops_and_counts(tmp_path):
    from detector.data.coco import CocoIndex
    from detector.data.tiles import TiledDataset

    Image.new("RGB", (288, 200)).save(tmp_path / "a.jpg")
    boxes = [[10, 10, 10, 10], [150, 40, 20, 20], [124, 150, 40, 20]]  # xywh
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 400, "iscrowd": 0}
        for i, b in enumerate(boxes)
    ]
    write_coco(
        tmp_path / "a.json",
        [{"id": 1, "file_name": "a.jpg", "width": 288, "height": 200}],
        anns,
        [{"id": 1, "name": "x"}],
    )
    index = CocoIndex(tmp_path / "a.json", images_root=tmp_path)
    ds = TiledDataset(index, tmp_path, None, size=160, overlap=0.2, min_visibility=0.3)
    assert ds.tile_xyxy.tolist() == [[0, 0, 160, 160], [128, 0, 288, 160], [0, 40, 160, 200], [128, 40, 288, 200]]
    assert isinstance(ds.tile_image, np.ndarray) and ds.tile_image.tolist() == [0, 0, 0, 0]  # flat arrays
    # A (10-20, 10-20): whole in tile 0 only.
    # B (150-170, 40-60): tiles 0 and 2 cut it at x=160 (0.5 visible); whole in tiles 1 and 3.
    # C (124-164, 150-170): tiles 0 and 1 keep 36/40 x 10/20 of it (0.45); tiles 2 and 3 36/40 (0.9).
    t0 = ds[0][1]
    assert t0["boxes"].tolist() == [[10, 10, 20, 20], [150, 40, 160, 60], [124, 150, 160, 160]]
    t3 = ds[3][1]
    assert t3["boxes"].tolist() == [[22, 0, 42, 20], [0, 110, 36, 130]]  # in the tile's coordinates
    assert ds.boxes_clipped == 6 and ds.boxes_dropped == 0 and t0["dropped"] == 0
    strict = TiledDataset(index, tmp_path, None, size=160, overlap=0.2, min_visibility=0.55)
    assert (strict.boxes_clipped, strict.boxes_dropped) == (2, 4)  # B in tiles 0, 2 and C in 0, 1 cut off
    assert strict[0][1]["dropped"] == 2 and strict[0][1]["boxes"].tolist() == [[10, 10, 20, 20]]
    assert "dropped (cut below min_visibility 0.55): 4" in strict.summary()


def test_data_tile_config_builds_tiled_training_set(tiny_dataset):
    from detector import config, data
    from detector.data.tiles import TiledDataset

    ds = tiny_dataset
    cfg = config.load(TINY, [f"data.train.annotations={ds['train']}", f"data.train.images={ds['root'] / 'train'}",
                             f"data.val.annotations={ds['val']}", f"data.val.images={ds['root'] / 'val'}",
                             "data.tile.size=128", "data.tile.overlap=0.25"])  # fmt: skip
    splits = data.load_splits(cfg, log=lambda m: None)
    train, val = data.build_datasets(splits, cfg.data, (96, 128))
    assert isinstance(train, TiledDataset) and not isinstance(val, TiledDataset)  # validation: whole images
    assert len(train) > len(splits.train) and len(train.aspect_ratios()) == len(train)
    image, target = train[(0, 7)]
    assert image.dtype == torch.uint8 and max(image.shape[1:]) <= 128 and target["boxes"].shape[1] == 4
    with pytest.raises(config.ConfigError, match="data.tile.size"):
        config.load(TINY, ["data.synthetic.enabled=true", "data.tile.size=4"])


# -- the tools ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_infer_and_evaluate_slice(trained_run, tiny_dataset, tmp_path):
    from detector.inference.predictor import Predictor

    ckpt, val, images = trained_run / "best.pt", tiny_dataset["val"], tiny_dataset["root"] / "val"
    files = sorted(images.glob("*.jpg"))[:2]
    assert run_tool_in_process("infer.py", "--checkpoint", ckpt, "--slice", 128, "--overlap", 0.2, "--no-draw",
                               "--output", tmp_path / "pred", *files) == 0  # fmt: skip
    assert len(json.loads((tmp_path / "pred" / "images.json").read_text())["images"]) == 2
    common = ["--checkpoint", ckpt, "--annotations", val, "--images", images, "--num-workers", 0]
    # One tile holding the whole image, merged by the model's own rule (NMS, IoU 0.5): the model's
    # detections on the full-resolution image, in full-image coordinates, as the Predictor finds them.
    one_tile = ["--slice", 512, "--no-full-pass", "--slice-merge", "nms", "--slice-metric", "iou"]
    out = tmp_path / "one_tile.json"
    assert (
        run_tool_in_process("evaluate.py", *common, *one_tile, "--output", out, "--results", tmp_path / "r.json") == 0
    )
    assert math.isnan(json.loads(out.read_text())["loss"])  # sliced detection makes no loss
    rows = json.loads((tmp_path / "r.json").read_text())
    names = {im["id"]: im["file_name"] for im in json.loads(Path(val).read_text())["images"]}
    p = Predictor.from_checkpoint(ckpt, "cpu")
    p.draft_decode = False
    for image_id, name in names.items():
        det = p.predict(images / name)[0]
        got = sorted((r["category_id"], r["score"], *r["bbox"]) for r in rows if r["image_id"] == image_id)
        xywh = np.concatenate([det.boxes[:, :2], det.boxes[:, 2:] - det.boxes[:, :2]], 1)
        want = sorted((int(c), float(s), *map(float, b)) for c, s, b in zip(det.category_ids, det.scores, xywh))
        assert len(got) == len(want) and np.allclose(np.array(got), np.array(want), atol=2e-3), name
    assert len(rows) > 0
    with pytest.raises(SystemExit) as exc:  # a usage error, not a traceback
        run_tool_in_process("evaluate.py", *common, "--slice", 8)
    assert exc.value.code == 2


def test_large_synthetic_dataset(tmp_path):
    from detector.data.synthetic import make_large_dataset

    paths = make_large_dataset(tmp_path, 1, 1, size=(1500, 1000), object_px=(12, 20), objects=(40, 41))
    coco = json.loads(Path(paths["train"]).read_text())
    assert {(i["width"], i["height"]) for i in coco["images"]} == {(1500, 1000)}
    sides = np.array([a["bbox"][2:] for a in coco["annotations"]])
    assert len(sides) > 30 and sides.min() >= 12 * 0.85 and sides.max() <= 20 * 1.16
    val = json.loads(Path(paths["val"]).read_text())  # sparse: under COCOeval's 100 detections an image
    assert 30 <= len(val["annotations"]) <= 60


@pytest.mark.slow
def test_infer_slices_folders_streamed_by_workers_at_full_resolution(trained_run, tiny_dataset, tmp_path):
    """infer.py streams folders through DataLoader workers (Predictor.predict_prepared): with
    --slice those images must be decoded at full resolution and detected by tiles, as
    Predictor.predict slices them, not passed whole and at reduced scale."""
    from detector.inference.predictor import Predictor

    src = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))[0]
    big = tmp_path / "in" / "big.jpg"  # 2x: larger than the model's input, so draft decoding would shrink it
    big.parent.mkdir()
    with Image.open(src) as im:
        im.resize((im.width * 2, im.height * 2)).save(big, quality=95)
    ckpt = trained_run / "best.pt"
    args = ["--checkpoint", ckpt, "--slice", 128, "--overlap", 0.2, "--no-draw", "--score-threshold", 0.05]
    # in a process of its own, as users run it: DataLoader workers forked from a long-lived pytest
    # worker (threads and handlers left by earlier tests) once took that worker down in CI
    res = run_tool("infer.py", *args, "--workers", 1, "--output", tmp_path / "pred", big.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "pred" / "results.json").read_text())
    p = Predictor.from_checkpoint(ckpt, "cpu", 0.05, slicing=SliceSpec(size=128, overlap=0.2))
    det = p.predict(big)[0]
    got = np.array(sorted((r["category_id"], r["score"], *r["bbox"]) for r in rows))
    xywh = np.concatenate([det.boxes[:, :2], det.boxes[:, 2:] - det.boxes[:, :2]], 1)
    want = np.array(sorted((int(c), float(s), *map(float, b)) for c, s, b in zip(det.category_ids, det.scores, xywh)))
    assert len(det) > 0 and got.shape == want.shape
    assert np.allclose(got[:, :2], want[:, :2], atol=1e-4)  # class and score
    assert np.allclose(got[:, 2:], want[:, 2:], atol=1e-2)  # and the boxes, in the full image's pixels
    assert p.decode_model_size is None


# -- review: numbers at the edges ------------------------------------------------------------------


def frame_detector(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detects each input's whole frame: class 1 for a tile (a 64 px side), 2 for the full pass."""
    out = []
    for im in images:
        h, w = im.shape[-2:]
        b = torch.tensor([[0.0, 0.0, float(w), float(h)]])
        label = 1 if 64 in (h, w) or (h, w) == (40, 50) else 2
        out.append({"boxes": b, "labels": torch.tensor([label]), "scores": torch.tensor([0.5])})
    return out


@pytest.mark.parametrize("w,h", [(150, 349), (349, 150), (50, 40)])  # portrait, landscape, smaller than a tile
def test_tiles_and_full_pass_map_to_exact_full_image_pixels(w, h):
    out = detect_sliced(frame_detector, torch.zeros(3, h, w), SliceSpec(64, 0.2, iou=0.99), 3, (20, 20))
    tiles = out["boxes"][out["labels"] == 1]
    want = torch.from_numpy(tile_grid(w, h, 64, 0.2)).float()
    assert sorted(map(tuple, tiles.tolist())) == sorted(map(tuple, want.tolist()))  # every tile at its offset
    # the whole-image pass is given the image at the model's scale (rounded per side): back to W x H exactly
    assert out["boxes"][out["labels"] == 2].tolist() == [[0.0, 0.0, float(w), float(h)]]


def test_merged_duplicates_score_by_area_weighted_mean():
    img = torch.zeros(3, 200, 300)
    img[:, 40:60, 150:170] = 1.0  # cut by the edge x=160 of the first tile: whole in the next

    def edge_weak(images):  # a piece cut by a tile's edge is found with a low score
        dets = blob_detector(160)(images)
        for d, im in zip(dets, images):
            cut = (d["boxes"][:, 0] <= 0) | (d["boxes"][:, 2] >= im.shape[-1])
            d["scores"] = torch.where(cut, 0.2, 0.9)
        return dets

    out = detect_sliced(edge_weak, img, SliceSpec(160, 0.5, full_pass=False), batch_size=2)
    assert len(out["boxes"]) == 1  # one object; its score is the area-weighted mean (supervision's NMM)
    # 6 tiles hold it: 4 whole (20x20 at 0.9), the 2 with x0=0 the cut 10x20 piece (at 0.2)
    assert float(out["scores"][0]) == pytest.approx((4 * 400 * 0.9 + 2 * 200 * 0.2) / (4 * 400 + 2 * 200), abs=1e-6)
    assert out["boxes"].tolist() == [[150.0, 40.0, 170.0, 60.0]]


def two_neighbours(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Two distinct objects of one class in every input, as a model's NMS keeps them: IoU 0.31
    (under NMS's 0.5) but the smaller lies 64% inside the larger (IoS above 0.5)."""
    b = torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 30.0, 30.0]])
    return [{"boxes": b, "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.9, 0.6])} for _ in images]


@pytest.mark.parametrize("merge", ["nmm", "nms"])
@pytest.mark.parametrize("full_pass", [False, True])
def test_boxes_of_one_tile_or_pass_are_never_merged(merge, full_pass):
    """Only duplicates from different tiles or passes merge: two boxes the model kept apart in
    one tile stay two (with the full pass, each merges with its own copy from that pass)."""
    out = detect_sliced(two_neighbours, torch.zeros(3, 100, 100), SliceSpec(128, 0.2, full_pass, merge=merge), 2)
    assert out["boxes"].tolist() == [[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 30.0, 30.0]]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert out["labels"].tolist() == [1, 1]


def test_cross_source_groups_take_one_detection_per_other_source():
    from detector.inference.slicing import cross_source_groups

    overlap = np.ones((4, 4))  # all overlap: only the sources keep them apart
    groups = cross_source_groups(overlap, np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 0, 1, 1]), 0.5)
    assert groups == [[0, 2], [1, 3]]  # the leader takes source 1's best; source 0's second leads the rest
    assert cross_source_groups(np.full((2, 2), 0.5), np.array([0.9, 0.8]), np.array([0, 1]), 0.5) == [[0, 1]]
    assert cross_source_groups(np.full((2, 2), 0.5), np.array([0.9, 0.8]), np.array([0, 1]), 0.5, strict=True) == [
        [0],
        [1],
    ]


def test_data_tile_counts_each_dropped_box_once_per_tile(tmp_path):
    from detector.data.coco import CocoIndex
    from detector.data.tiles import TiledDataset

    Image.new("RGB", (320, 160)).save(tmp_path / "a.jpg")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 0.5, 10], "area": 5, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [200, 20, 20, 20], "area": 400, "iscrowd": 0}]  # fmt: skip
    write_coco(tmp_path / "a.json", [{"id": 1, "file_name": "a.jpg", "width": 320, "height": 160}], anns,
               [{"id": 1, "name": "x"}])  # fmt: skip
    ds = TiledDataset(CocoIndex(tmp_path / "a.json", images_root=tmp_path), tmp_path, None, size=160, overlap=0.0)
    items = [ds[k][1] for k in range(len(ds))]
    # the 0.5 px wide box lies in the first tile only: dropped there, not once per tile of its image
    assert [t["dropped"] for t in items] == [1, 0] and [len(t["boxes"]) for t in items] == [0, 1]


def test_data_tile_rasterises_only_the_masks_of_its_own_boxes(tmp_path, monkeypatch):
    from detector.core import masks
    from detector.data import mask_index
    from detector.data.coco import CocoIndex
    from detector.data.tiles import TiledDataset

    Image.new("RGB", (480, 160)).save(tmp_path / "a.jpg")
    anns = []
    for i, x in enumerate([10, 40, 70, 170, 200, 330, 360, 400]):  # 3 + 2 + 3 squares in the 3 tiles
        poly = [x, 20, x + 20, 20, x + 20, 40, x, 40]
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x, 20, 20, 20], "area": 400,
                     "iscrowd": 0, "segmentation": [poly]})  # fmt: skip
    write_coco(tmp_path / "a.json", [{"id": 1, "file_name": "a.jpg", "width": 480, "height": 160}], anns,
               [{"id": 1, "name": "x"}])  # fmt: skip
    index = CocoIndex(tmp_path / "a.json", images_root=tmp_path, masks=True)
    drawn: list[int] = []
    real = masks.rasterize

    def spy(store, rows, *a, **k):
        drawn.append(len(rows))
        return real(store, rows, *a, **k)

    monkeypatch.setattr(masks, "rasterize", spy)
    monkeypatch.setattr(mask_index, "rasterize", spy)
    ds = TiledDataset(index, tmp_path, None, size=160, overlap=0.0)
    items = [ds[k][1] for k in range(len(ds))]
    assert [len(t["masks"]) for t in items] == [3, 2, 3] and drawn == [3, 2, 3]  # not all 8 masks per tile
    for t in items:  # each mask in its tile's pixels, matching its box
        for m, b in zip(t["masks"], t["boxes"].int().tolist()):
            ys, xs = np.nonzero(m.numpy())
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == pytest.approx(tuple(b), abs=1)


def test_data_tile_cache_gives_the_same_items_and_stays_bounded(tmp_path):
    from detector.data.coco import CocoIndex
    from detector.data.tiles import TiledDataset

    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 150, "height": 100})
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [60, 30, 30, 30], "area": 900, "iscrowd": 0}
            for i in range(3)]  # fmt: skip
    write_coco(tmp_path / "a.json", images, anns, [{"id": 1, "name": "x"}])
    index = CocoIndex(tmp_path / "a.json", images_root=tmp_path)
    cached = TiledDataset(index, tmp_path, None, size=64, overlap=0.2, cache_images=2)
    plain = TiledDataset(index, tmp_path, None, size=64, overlap=0.2, cache_images=0)
    for k in list(range(len(plain))) + [0, len(plain) - 1, 1]:  # revisits after eviction too
        (a, ta), (b, tb) = cached[k], plain[k]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and ta["dropped"] == tb["dropped"]
        assert len(cached._cache) <= 2
    assert len(plain._cache) == 0
