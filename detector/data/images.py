"""Image decoding for detection: any PIL mode to RGB uint8, EXIF orientation, reduced-scale JPEG.

Also the start-up scan that finds every missing or unreadable file and every size mismatch
before training starts, so a bad dataset fails in seconds rather than hours in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageDecodeError(RuntimeError):
    """An image file that cannot be decoded (corrupt, truncated, unknown format)."""


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image as an (H, W, 3) uint8 array.

    16-bit and 32-bit integer images are scaled down (not clipped); palette and alpha images
    are converted through RGBA; CMYK and grayscale through PIL's converters.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img)
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def load_image(path: str | Path, min_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float, float]:
    """Decode an image as RGB uint8 with EXIF orientation applied.

    Args:
        path: the file.
        min_size: (width, height) the decoded image may shrink to, or None for full size. JPEGs
            are then decoded at a reduced scale (1/2, 1/4, 1/8) no smaller than this.

    Returns:
        (array (H, W, 3) uint8, sx, sy): the decoded size divided by the full (oriented) size.

    Raises:
        ImageDecodeError: naming the file, for unreadable, corrupt or truncated images.
    """
    if min_size is None:
        arr = _decode_jpeg_full(path)
        if arr is not None:
            return arr, 1.0, 1.0
    try:
        with Image.open(path) as img:
            full_w, full_h = img.size
            orientation = img.getexif().get(EXIF_ORIENTATION, 1) if img.format in ("JPEG", "TIFF", "PNG", "WEBP") else 1
            if min_size is not None and img.format == "JPEG":
                want = min_size if orientation not in _SWAPS_AXES else (min_size[1], min_size[0])
                if want[0] < full_w and want[1] < full_h:
                    img.draft("RGB", want)
            dec_w, dec_h = img.size
            img = ImageOps.exif_transpose(img) if orientation != 1 else img
            arr = to_rgb_array(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from None
    sx, sy = dec_w / full_w, dec_h / full_h
    if orientation in _SWAPS_AXES:
        sx, sy = sy, sx
    return arr, sx, sy


def _decode_jpeg_full(path: str | Path) -> np.ndarray | None:
    """A JPEG at full size through torchvision's libjpeg-turbo decoder, or None to use PIL.

    It is ~20% faster than PIL's open + convert for typical photos, handles grayscale and CMYK,
    applies EXIF orientation, and its (H, W, 3) view of the decoded image needs no copy. Any
    failure falls back to PIL, which then reports the problem (truncated, corrupt...) itself.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                            apply_exif_orientation=True)  # fmt: skip
    except RuntimeError:
        return None
    return image.permute(1, 2, 0).numpy()


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(EXIF_ORIENTATION, 1) if img.format in ("JPEG", "TIFF", "PNG", "WEBP") else 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def scan_images(
    root: str | Path,
    names: list[str],
    sizes: np.ndarray | None,
    read_headers: bool = True,
    progress: Callable | None = None,
    threads: int = 8,
) -> dict[str, list[tuple[int, str]]]:
    """Check the image files of a dataset before training.

    Args:
        root: the image root.
        names: file names relative to it, one per image.
        sizes: (n, 2) expected (width, height) per image, or None.
        read_headers: also open each header to check format and size (EXIF applied).
        progress: optional wrapper for an iterable (a progress bar).
        threads: header reads in parallel (I/O bound).

    Returns:
        {"missing": [(i, path)], "unreadable": [(i, message)], "size_mismatch": [(i, message)]}.
    """
    root = Path(root)
    found: dict[str, list[tuple[int, str]]] = {"missing": [], "unreadable": [], "size_mismatch": []}
    paths = [os.path.join(root, n) for n in names]
    exists = [os.path.isfile(p) for p in paths]
    found["missing"] = [(i, p) for i, (p, ok) in enumerate(zip(paths, exists)) if not ok]
    if not read_headers:
        return found
    todo = [i for i, ok in enumerate(exists) if ok]

    def check(i: int) -> tuple[int, str, str] | None:
        try:
            w, h = oriented_size(paths[i])
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            return i, "unreadable", f"{paths[i]}: cannot read image header: {exc}"
        if sizes is not None and (w, h) != (int(sizes[i][0]), int(sizes[i][1])):
            return (
                i,
                "size_mismatch",
                (
                    f"{paths[i]}: decoded size {w}x{h} (EXIF orientation applied) differs from the json's "
                    f"{int(sizes[i][0])}x{int(sizes[i][1])}"
                ),
            )
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(check, todo, chunksize=64)
        for r in progress(results, total=len(todo)) if progress else results:
            if r is not None:
                found[r[1]].append((r[0], r[2]))
    return found
