"""The label map: the dataset's category ids <-> the model's contiguous labels 1..K.

It travels with the weights (best.pt), so that inference and export, which do not load the data
stack, write the dataset's own ids and names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LabelMap:
    """Dataset category ids <-> contiguous model labels 1..K (0 is the background)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (the model has K + 1 outputs with the background)."""
        return len(self.category_ids)

    def to_labels(self, category_ids: np.ndarray) -> np.ndarray:
        """Category ids -> labels 1..K; ids not in the map give 0."""
        cats = np.asarray(self.category_ids, dtype=np.int64)
        ids = np.asarray(category_ids, dtype=np.int64)
        if not len(cats):
            return np.zeros(len(ids), dtype=np.int64)
        order = np.argsort(cats)
        idx = order[np.searchsorted(cats, ids, sorter=order).clip(max=len(cats) - 1)]
        return np.where(cats[idx] == ids, idx + 1, 0).astype(np.int64)

    def to_category_ids(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Labels 1..K -> the dataset's category ids."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"labels must be in 1..{self.num_classes}, got {labels.min()}..{labels.max()}")
        return np.asarray(self.category_ids, dtype=np.int64)[labels - 1] if labels.size else labels

    def to_dict(self) -> dict[str, list]:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> LabelMap:
        return cls(tuple(int(c) for c in d["category_ids"]), tuple(str(n) for n in d["names"]))
