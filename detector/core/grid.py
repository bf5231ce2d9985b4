"""The tile grid: overlapping square windows over an image, the same for tiled training and sliced inference."""

from __future__ import annotations

from typing import Any

import numpy as np

EXTRA_HINT = "pip install 'detector[slicing]' (or pip install -e '.[slicing]' in a checkout)"


def _sv() -> Any:
    """supervision, or an error saying how to get it (it is the ``slicing`` extra)."""
    try:
        import supervision
    except ImportError:
        raise RuntimeError(
            "sliced inference (--slice, Predictor(slicing=...)) and data.tile need the optional extra "
            f"supervision: {EXTRA_HINT}"
        ) from None
    return supervision


def tile_grid(width: int, height: int, size: int, overlap: float) -> np.ndarray:
    """The tiles covering a width x height image: int64 (n, 4) xyxy, row by row.

    supervision's grid (the one InferenceSlicer uses, so training tiles and inference tiles are
    the same): tiles step by ``size - overlap`` and the last one in a row or column is moved back
    to end at the image's edge, so every tile is size x size unless the image is smaller.
    """
    sv = _sv()
    ov = round(size * overlap)
    # InferenceSlicer's own grid function (a static method): the tiles it slices at inference
    grid = sv.InferenceSlicer._generate_offset((int(width), int(height)), (size, size), (ov, ov))
    return np.asarray(grid, dtype=np.int64).reshape(-1, 4)
