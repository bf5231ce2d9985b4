"""Image decoding: modes, EXIF orientation, reduced-scale JPEG decoding, corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detector.core.errors import DatasetError
from detector.core.images import ImageDecodeError, load_image, oriented_size, scan_images
from detector.data.coco import CocoDetection, CocoIndex
from tests.conftest import one_image_coco


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :10] = (200, 100, 50)  # two colours, so that a pixel out of place shows
    rgb[:, 10:] = (20, 220, 120)
    im = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    im.save(path, **({"quality": 100} if mode == "CMYK" else {}))
    arr, sx, sy = load_image(path)
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8 and (sx, sy) == (1.0, 1.0)
    with Image.open(path) as saved:  # PIL's own conversion of the file (a palette through RGBA)
        want = np.asarray((saved.convert("RGBA") if mode == "P" else saved).convert("RGB")).astype(int)
    tolerance = 3 if mode == "CMYK" else 0  # JPEG: libjpeg-turbo via torchvision vs PIL's decoder
    assert np.abs(arr.astype(int) - want).max() <= tolerance
    if mode == "RGBA":  # colour kept exactly (a palette's web colours are not)
        assert tuple(arr[5, 2]) == (200, 100, 50) and tuple(arr[5, 15]) == (20, 220, 120)
    if mode in ("L", "LA"):  # grey: R = G = B, and the two halves differ
        assert (
            (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all() and arr[5, 2, 0] != arr[5, 15, 0]
        )


def test_16bit_is_scaled_not_clipped(tmp_path):
    data = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "g16.png")
    arr, _, _ = load_image(tmp_path / "g16.png")
    assert arr.shape == (8, 8, 3) and 120 <= arr[0, 0, 0] <= 135  # mid-grey, not saturated white


def _exif_jpeg(path, orientation: int, size=(40, 20)):
    im = Image.new("RGB", size, (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # a red mark in the top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_applied(tmp_path):
    _exif_jpeg(tmp_path / "r.jpg", 6)  # stored 40x20, displayed rotated 90 degrees clockwise
    arr, _, _ = load_image(tmp_path / "r.jpg")
    assert arr.shape[:2] == (40, 20)  # now portrait
    assert arr[2, -3, 0] > 200 and arr[-3, 2, 0] < 50  # the mark moved to the top-right
    assert oriented_size(tmp_path / "r.jpg") == (20, 40)


def test_size_mismatch_found_at_scan(tmp_path):
    _exif_jpeg(tmp_path / "r.jpg", 6)
    found = scan_images(tmp_path, ["r.jpg", "gone.jpg"], np.array([[30, 30], [5, 5]]))
    assert [p for _, p in found["missing"]] == [str(tmp_path / "gone.jpg")]
    assert "decoded size 20x40 (EXIF orientation applied) differs from the json's 30x30" in found["size_mismatch"][0][1]
    # the stored size before the EXIF rotation is no mismatch: it is recognised (see test_edges)
    found = scan_images(tmp_path, ["r.jpg"], np.array([[40, 20]]))
    assert not found["size_mismatch"] and len(found["exif_swapped"]) == 1 and len(found["exif_rotated"]) == 1


def test_draft_decoding_halves_and_reports_scale(tmp_path):
    Image.new("RGB", (1600, 1200), (10, 20, 30)).save(tmp_path / "big.jpg")
    arr, sx, sy = load_image(tmp_path / "big.jpg", min_size=(700, 520))
    assert arr.shape[:2] == (600, 800) and (sx, sy) == (0.5, 0.5)  # 1/2 scale >= requested
    arr, sx, _ = load_image(tmp_path / "big.jpg", min_size=(1500, 1100))
    assert arr.shape[:2] == (1200, 1600) and sx == 1.0  # never below the requested size


def test_dataset_scales_boxes_with_draft_decoding(tmp_path):
    ann = one_image_coco(tmp_path, (1600, 1200), [[400, 200, 800, 600]], name="big.jpg")
    ds = CocoDetection(CocoIndex(ann), tmp_path, model_size=(300, 400))
    image, target = ds[0]
    assert image.shape == (3, 300, 400) and image.dtype.is_floating_point is False
    np.testing.assert_allclose(target["boxes"].numpy(), [[100, 50, 300, 200]])
    assert target["scale"] == (0.25, 0.25)


def test_corrupt_image_error_or_skip(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    ann = one_image_coco(tmp_path, (64, 64), [], name="bad.jpg", image_bytes=data[: len(data) // 3])  # truncated
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(DatasetError, match=r"bad.jpg.*data.on_corrupt_image=skip"):
        CocoDetection(CocoIndex(ann), tmp_path)[0]
    assert CocoDetection(CocoIndex(ann), tmp_path, on_corrupt_image="skip")[0] is None
