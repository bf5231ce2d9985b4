"""Video and folders at scale in tools/infer.py: an annotated video and per-frame json from a short
generated video (frame count, fps, size, rotation, the Predictor's detections), clear errors for
corrupt, empty and truncated videos, and folders streamed through a DataLoader with workers."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from detector.core.detections import Detections
from detector.inference import video
from detector.inference.folders import ImageFiles, RowSpool, detection_rows, draw, write_json
from detector.inference.predictor import Predictor
from detector.inference.video import VideoError, VideoInfo, frames, infer_video, probe
from tests.conftest import run_tool_in_process

FPS, SIZE = 7.5, (96, 64)  # (width, height)


def _write_video(path: Path, images: list[np.ndarray], fourcc: str = "mp4v", fps: float = FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    assert writer.isOpened()
    for im in images:
        writer.write(cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _decode(path: Path) -> tuple[list[np.ndarray], float, tuple[int, int]]:
    """Every frame of a video as RGB (OpenCV directly, not the code under test), fps, (w, h)."""
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    fps, size = (
        cap.get(cv2.CAP_PROP_FPS),
        (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))),
    )
    cap.release()
    return out, fps, size


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the tools get in a subprocess (conftest.tool_env): the tools run in
    this process here, and two threads on a busy 2-core machine are several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip(tiny_dataset, tmp_path_factory) -> Path:
    """12 frames, 96x64 at 7.5 fps, made from the val images (MPEG-4 Part 2 in .mp4)."""
    vals = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))
    ims = [np.asarray(Image.open(vals[i % len(vals)]).convert("RGB").resize(SIZE)) for i in range(12)]
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", ims)


def _rotate_90(src: Path, dst: Path) -> Path:
    """A copy of an .mp4 whose track header says "display rotated by 90 degrees" (as phones write)."""
    data = bytearray(src.read_bytes())
    i = data.find(b"tkhd")
    assert i > 0 and data[i + 4] == 0  # a version 0 track header
    matrix = i + 4 + 4 + 20 + 16  # type, version+flags, 5 x 32-bit fields, reserved/layer/group/volume
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    dst.write_bytes(bytes(data))
    return dst


def _by_frame(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["image_id"], []).append(r)
    return out


@pytest.mark.slow
def test_video_gives_annotated_video_and_per_frame_json(trained_run, clip, tmp_path, capsys):
    out = tmp_path / "pred"
    code = run_tool_in_process("infer.py", "--checkpoint", trained_run / "best.pt", "--score-threshold", "0.05",
                               "--batch-size", "5", "--output", out, clip)  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "clip.mp4: 12 frame(s)" in capsys.readouterr().out

    inputs, _, _ = _decode(clip)
    assert len(inputs) == 12
    written, fps, size = _decode(out / "clip.mp4")
    assert len(written) == 12 and fps == pytest.approx(FPS) and size == SIZE  # every frame, same rate and size

    listing = json.loads((out / "clip.json").read_text())
    assert listing["video"]["frames"] == 12 and listing["video"]["fps"] == pytest.approx(FPS)
    assert listing["categories"] == [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"},
                                     {"id": 12, "name": "triangle"}]  # fmt: skip
    assert [im["id"] for im in listing["images"]] == list(range(12))
    assert [im["frame_index"] for im in listing["images"]] == list(range(12))
    assert [im["timestamp"] for im in listing["images"]] == pytest.approx([i / FPS for i in range(12)], abs=1e-3)
    assert all((im["width"], im["height"]) == SIZE for im in listing["images"])
    anns = listing["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))

    # the Predictor's detections on the same decoded frames (same threshold and batches)
    p = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.05, batch_size=5)
    dets = p.predict(inputs)
    assert sum(len(d) for d in dets) > 0, "nothing detected: the comparison would be empty"
    got = _by_frame(anns)
    for i, det in enumerate(dets):
        expected = detection_rows(det, i)
        rows = got.get(i, [])
        assert [r["category_id"] for r in rows] == [e["category_id"] for e in expected], i
        for r, e in zip(rows, expected):
            assert r["bbox"] == pytest.approx(e["bbox"], abs=1e-3) and r["score"] == pytest.approx(e["score"], abs=1e-5)

    # the frames written are the drawn ones (closer to the input with the detections drawn than without)
    for i in (0, 5, 11):
        drawn = draw(inputs[i], dets[i], p.class_names).astype(np.float32)
        frame = written[i].astype(np.float32)
        assert np.abs(frame - drawn).mean() < np.abs(frame - inputs[i].astype(np.float32)).mean(), i


@pytest.mark.slow
def test_rotated_video_is_upright(trained_run, clip, tmp_path):
    rotated = _rotate_90(clip, tmp_path / "rotated.mp4")
    info = probe(rotated)
    assert info.rotation == 90 and (info.width, info.height) == (SIZE[1], SIZE[0])
    plain = [f for _, _, f in frames(clip)]
    upright = [f for _, _, f in frames(rotated)]
    assert len(upright) == 12
    for a, b in zip(plain, upright):  # the same decoded pixels, turned clockwise
        np.testing.assert_array_equal(np.rot90(a, k=-1), b)
    p = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.05, batch_size=4)
    summary = infer_video(p, rotated, tmp_path, "rotated_pred", progress=False)
    listing = json.loads(summary.json_path.read_text())
    assert listing["video"]["rotation"] == 90 and (listing["video"]["width"], listing["video"]["height"]) == (64, 96)
    assert listing["annotations"], "nothing detected"
    assert all(a["bbox"][0] + a["bbox"][2] <= 64 + 1e-3 and a["bbox"][1] + a["bbox"][3] <= 96 + 1e-3
               for a in listing["annotations"])  # fmt: skip
    written, _, size = _decode(summary.video_path)
    assert len(written) == 12 and size == (64, 96)


@pytest.mark.slow
def test_bad_videos_are_named(trained_run, clip, tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 64)
    cut = tmp_path / "cut.mp4"  # an .mp4 cut short loses its index: it cannot be opened
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    empty = _write_video(tmp_path / "empty.avi", [], fourcc="MJPG")
    args = ["--checkpoint", trained_run / "best.pt", "--output", tmp_path / "out"]
    assert run_tool_in_process("infer.py", *args, junk, cut, empty) == 1  # nothing could be read
    err = capsys.readouterr().err
    assert f"cannot open video {junk}" in err and f"cannot open video {cut}" in err
    assert f"video {empty} has no decodable frames" in err
    assert not list((tmp_path / "out").glob("*.mp4")), "no half-written video is left behind"

    # an .avi cut short still opens: the frames before the cut are used, and the shortfall reported
    frames_ = [np.full((SIZE[1], SIZE[0], 3), 20 * i, np.uint8) for i in range(12)]
    full = _write_video(tmp_path / "full.avi", frames_, fourcc="MJPG")
    short = tmp_path / "images.avi"  # named as the images' json: its outputs become images_2.*
    short.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    assert run_tool_in_process("infer.py", *args, "--no-draw", short, junk) == 0  # one of the two could be read
    captured = capsys.readouterr()
    n = len(json.loads((tmp_path / "out" / "images_2.json").read_text())["images"])
    assert 0 < n < 12
    assert f"video {short}: decoded {n} frame(s), its header declares 12" in captured.err
    assert f"skipped cannot open video {junk}" in captured.err
    assert not list((tmp_path / "out").glob("*.mp4"))  # --no-draw: json only
    with pytest.raises(VideoError, match="no such video file"):
        probe(tmp_path / "missing.mp4")


@pytest.mark.slow
def test_folder_streams_through_workers(trained_run, tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(tiny_dataset["root"] / "val", folder)
    good = sorted(folder.glob("*.jpg"))
    (folder / "b_cut.jpg").write_bytes(good[0].read_bytes()[:300])  # a readable header, its data cut short
    (folder / "c_text.png").write_text("not an image")  # no header at all
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        code = run_tool_in_process("infer.py", "--checkpoint", trained_run / "best.pt", "--score-threshold", "0.05",
                                   "--batch-size", "3", "--workers", workers, "--output", out, folder)  # fmt: skip
        err = capsys.readouterr().err
        assert code == 0, err
        assert f"skipped cannot decode image {folder / 'b_cut.jpg'}" in err, err
        assert f"skipped cannot decode image {folder / 'c_text.png'}" in err, err
        images = json.loads((out / "images.json").read_text())["images"]
        assert [im["file_name"] for im in images] == [str(f) for f in good]
        assert len(list(out.glob("*.png"))) == len(good)
        assert not list(out.glob("*.partial")) and not list(out.glob("*.rows"))
        outputs[workers] = (out / "results.json").read_bytes(), images
    assert outputs[0] == outputs[2]
    results = json.loads(outputs[0][0])
    assert results and {r["image_id"] for r in results} <= set(range(len(good)))


def test_rows_spool_and_masks_drawn(tmp_path):
    """Mask R-CNN detections: rows carry the masks as RLE, the spooled json reads back whole, and
    the drawing fills the mask."""
    from pycocotools import mask as mask_utils

    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:8, 3:12] = True
    masks[1, 10:18, 15:29] = True
    det = Detections(boxes=np.array([[3, 2, 12, 8], [15, 10, 29, 18]], np.float32), labels=np.array([1, 2]),
                     names=["a", "b"], scores=np.array([0.9, 0.6], np.float32), category_ids=np.array([5, 9]),
                     masks=masks)  # fmt: skip
    rows = detection_rows(det, 7)
    assert [(r["image_id"], r["category_id"]) for r in rows] == [(7, 5), (7, 9)]
    assert rows[1]["bbox"] == [15.0, 10.0, 14.0, 8.0]
    for r, m in zip(rows, masks):
        np.testing.assert_array_equal(
            mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"]}), m
        )
    spool = RowSpool(tmp_path)
    spool.add(rows)
    spool.add([])
    spool.add(rows[:1])
    write_json(tmp_path / "x.json", {"head": {"n": 1}, "rows": spool, "empty": RowSpool(tmp_path)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"head": {"n": 1}, "rows": [*rows, rows[0]], "empty": []}
    spool.close()

    image = np.zeros((20, 30, 3), np.uint8)
    drawn = draw(image, det, ["a", "b"])
    inside = masks[0].copy()
    inside[2, :] = inside[7, :] = inside[:, 3] = inside[:, 11] = False  # away from the box outline
    assert (drawn[inside] > 0).any(axis=1).all()  # the mask is filled
    assert (drawn[0, 0] == 0).all()  # outside every box and mask: untouched


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its pixel data is not there)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_folder_item_errors_name_the_file_and_never_stop_the_loader(tmp_path):
    """A header declaring a decompression bomb (PIL raises its own error, not an OSError) and a URL
    that cannot be read are skipped by name, as any undecodable file is, instead of killing the
    DataLoader; the URL is named without its query string (signed URLs carry keys there)."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(20_000, 20_000))  # 400 M pixels: twice PIL's limit
    url = "http://127.0.0.1:9/no/such.png?X-Amz-Signature=SECRET"
    files = ImageFiles([bomb, url], (64, 64))
    index, prepared, message = files[0]
    assert (index, prepared) == (0, None) and message.startswith(f"cannot decode image {bomb}: ")
    index, prepared, message = files[1]
    assert (index, prepared) == (1, None) and "http://127.0.0.1:9/no/such.png" in message
    assert "SECRET" not in message


class _NothingFound:
    """A Predictor stand-in that finds nothing (the frames' bookkeeping without a model)."""

    batch_size = 3
    class_names = ["thing"]
    label_map = SimpleNamespace(category_ids=[1])

    def predict(self, images: list) -> list[Detections]:
        empty = Detections(boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), names=[],
                           scores=np.zeros(0, np.float32), category_ids=np.zeros(0, np.int64))  # fmt: skip
        return [empty for _ in images]


@pytest.mark.parametrize(
    ("fps", "count", "timestamps", "warned"),
    [
        # variable frame rate in an .mkv/.webm (no frame count there: OpenCV estimates duration x
        # nominal fps, 28): the 8 frames span the whole 1.12 s, nothing is missing
        (25.0, 28, [0, 0.1, 0.15, 0.4, 0.5, 1.0, 1.04, 1.08], False),
        (7.5, 12, [i / 7.5 for i in range(7)], True),  # cut short: 7 of 12 frames, 0.93 of 1.6 s
        (7.5, 12, [i / 7.5 for i in range(11)], True),  # only the last frame missing
        (7.5, 12, [i / 7.5 for i in range(12)], False),
        (0.0, 12, [0.0] * 5, True),  # no frame rate: the count alone decides
    ],
)
def test_short_video_warning_trusts_timestamps_over_estimated_counts(monkeypatch, tmp_path, fps, count, timestamps,
                                                                     warned):  # fmt: skip
    info = VideoInfo(path="v.mkv", fps=fps, width=8, height=6, frame_count=count, rotation=0)
    decoded = [(i, t, np.zeros((6, 8, 3), np.uint8)) for i, t in enumerate(timestamps)]
    monkeypatch.setattr(video, "probe", lambda path: info)
    monkeypatch.setattr(video, "frames", lambda path, queue_size: (d for d in decoded))
    summary = infer_video(_NothingFound(), "v.mkv", tmp_path, "v", draw_frames=False, progress=False)
    assert summary.frames == len(timestamps)
    assert (summary.warning is not None) == warned, summary.warning
    if warned:
        assert f"decoded {len(timestamps)} frame(s)" in summary.warning and str(count) in summary.warning


def test_write_json_leaves_no_partial_file_on_error(tmp_path):
    """An interrupted or failed write leaves neither a half-written json nor its .partial file."""
    target = tmp_path / "images.json"
    with pytest.raises(TypeError):
        write_json(target, {"images": [{"id": 0}], "bad": object()})  # orjson cannot encode it
    assert sorted(p.name for p in tmp_path.iterdir()) == []
