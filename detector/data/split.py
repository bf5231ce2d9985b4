"""Split a COCO file into train/val(/test), and merge COCO files, both validated like training data.

Splitting is stratified by class and keeps groups whole: images that share a group key (the
folder they are in, or what a regular expression takes from the file name, e.g. a video id)
go to the same split, so near-duplicate frames cannot leak from train into val. The
assignment is the greedy step of iterative stratification (Sechidis et al., 2011) applied to
groups: groups holding the rarest classes are placed first (larger groups first, then in a
seeded random order), each into the split where it brings every class's share (and the
number of images) closest to the ratios, in the sum of squared deviations; single-group
moves and swaps then lower that sum further while they can.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from detector.core.errors import MAX_LISTED, DatasetError
from detector.data.coco import CocoIndex, read_json

RATIO_ROUNDING = 0.011  # |sum(ratios) - 1| accepted: shares rounded to two decimals (0.33 0.33 0.33)
MAX_SWAPS = 16  # swap partners tried per group and split in the local search
NEGATIVE = "(no objects)"  # images without annotations are stratified as one more class


OPTION = "--on-invalid"


def load(path: str | Path, on_invalid: str = "clip") -> tuple[CocoIndex, dict[str, Any]]:
    """The validated index and the json as that index uses it.

    Args:
        path: the COCO file.
        on_invalid: as data.on_invalid (the data layer's own errors and counts): "clip" keeps
            boxes that overhang the image as written (training clips them, evaluation scores
            them as written); "repair" also leaves out the images and annotations it drops.

    Returns:
        (index, json): the json's images and annotations are those the index kept, as written.
    """
    index = CocoIndex(path, on_invalid=on_invalid, option=OPTION)
    data = read_json(index.path)
    ids = set(index.image_ids.tolist())
    images, seen = [], set()
    for im in data["images"]:  # repair keeps the first of duplicate image entries
        if isinstance(im, dict) and im.get("id") in ids and im["id"] not in seen:
            seen.add(im["id"])
            images.append(im)
    annotations = [data["annotations"][j] for j in sorted(index.source_rows.tolist())]
    return index, {**data, "images": images, "annotations": annotations}


def repairs(index: CocoIndex) -> list[str]:
    """What loading clipped, repaired or dropped, one line each (nothing is changed silently)."""
    return [f"{index.path}: {what}: {n}" for what, n in sorted(index.repairs.items())]


def group_keys(file_names: list[str], group: str = "none", regex: str | None = None) -> list[str]:
    """The group key of each image.

    Args:
        group: "none" (each image alone) or "dir" (the folder part of file_name).
        regex: a regular expression searched in file_name; its first group (or whole match)
            is the key. Takes precedence over ``group``. A name it does not match is an error.
    """
    if regex:
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise DatasetError(f"--group-regex {regex!r} is not a regular expression: {exc}") from None
        keys, bad = [], []
        for n in file_names:
            m = pattern.search(n)
            key = None if m is None else m.group(1) if pattern.groups else m.group(0)
            if key is None:  # no match, or an optional group that took no part in it
                bad.append(n)
                continue
            keys.append(key)
        if bad:
            what = "its first group" if pattern.groups else "it"
            raise DatasetError(
                f"--group-regex {regex!r}: {what} does not match {len(bad)} file name(s), e.g. {bad[:5]}"
            )
        return keys
    if group == "dir":
        return [str(PurePosixPath(n).parent) for n in file_names]
    if group == "none":
        return list(file_names)
    raise DatasetError(f"unknown group mode {group!r}: none or dir")


def assign(index: CocoIndex, ratios: list[float], keys: list[str], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The split (0..len(ratios)-1) of each image, and the class names counted.

    Args:
        index: the validated dataset.
        ratios: the share of each split, positive and summing to 1 (within RATIO_ROUNDING).
        keys: the group key of each image (see ``group_keys``).
        seed: breaks ties; the same seed gives the same split.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if len(r) < 2 or not (r > 0).all():
        raise DatasetError(f"--ratios must be two or three positive numbers, got {list(ratios)}")
    if abs(r.sum() - 1) > RATIO_ROUNDING:  # 0.8 0.3 is a typo, not a 73/27 split
        shown = " + ".join(f"{v:g}" for v in ratios)
        raise DatasetError(f"--ratios {shown} = {r.sum():g}: the shares must sum to 1")
    r = r / r.sum()  # 0.33 0.33 0.34 style rounding only
    names = [*index.label_map.names, NEGATIVE]
    k = len(names)
    per_image = np.zeros((len(index), k), dtype=np.float64)
    for i in range(len(index)):
        s, e = index.ann_start[i], index.ann_start[i + 1]
        labels = index.labels[s:e]
        if len(labels):
            np.add.at(per_image[i], labels - 1, 1.0)
        else:
            per_image[i, k - 1] = 1.0
    uniq, group_of = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    n_groups = len(uniq)
    counts = np.zeros((n_groups, k))
    np.add.at(counts, group_of, per_image)
    sizes = np.bincount(group_of, minlength=n_groups).astype(np.float64)
    total = counts.sum(0)
    rng = np.random.default_rng(seed)
    # rarest class first, larger groups first within it, seeded shuffle for the rest
    rarity = np.where(counts > 0, 1.0 / np.maximum(total, 1), 0).max(1)
    order = np.lexsort((rng.permutation(n_groups), -sizes, -rarity))
    have = np.zeros((len(r), k))
    have_images = np.zeros(len(r))
    split_of_group = np.empty(n_groups, dtype=np.int64)
    target = r[:, None] * total[None, :]
    weight = 1.0 / np.maximum(total, 1) ** 2  # deviations as shares of each class's total
    for g in order:
        # the split where adding this group most reduces (least increases) the squared deviation
        # of every class's share, and of the image count, from the ratios
        after = ((have + counts[g] - target) ** 2 - (have - target) ** 2) @ weight
        after_images = (have_images + sizes[g] - r * len(index)) ** 2 - (have_images - r * len(index)) ** 2
        cost = after + after_images / len(index) ** 2
        tie = rng.random(len(r)) * 1e-12
        s = int(np.argmin(cost + tie))
        split_of_group[g] = s
        have[s] += counts[g]
        have_images[s] += sizes[g]
    _improve(split_of_group, counts, sizes, target, weight, r * len(index), len(index), rng)
    return split_of_group[group_of], names


def _improve(split_of, counts, sizes, target, weight, target_images, n_images, rng, rounds: int = 20) -> None:
    """Local search after the greedy pass: move or swap single groups between splits while that
    lowers the total squared deviation (the greedy order alone leaves the last, rarest groups
    wherever they fitted first). In place; bounded rounds."""
    n_splits = len(target)

    def cost(have, have_images):
        return (
            float((((have - target) ** 2) @ weight).sum())
            + float(((have_images - target_images) ** 2).sum()) / n_images**2
        )

    have = np.zeros_like(target)
    np.add.at(have, split_of, counts)
    have_images = np.bincount(split_of, weights=sizes, minlength=n_splits)
    best = cost(have, have_images)
    for _ in range(rounds):
        improved = False
        for g in rng.permutation(len(split_of)):
            a = split_of[g]
            for b in range(n_splits):
                if b == a:
                    continue
                others = np.flatnonzero(split_of == b)
                if len(others) > MAX_SWAPS:  # bounded work per group on large datasets
                    others = rng.choice(others, MAX_SWAPS, replace=False)
                for h in [None, *others]:  # a move, or a swap with group h
                    d = counts[g] - (counts[h] if h is not None else 0)
                    di = sizes[g] - (sizes[h] if h is not None else 0)
                    have[a] -= d
                    have[b] += d
                    have_images[a] -= di
                    have_images[b] += di
                    c = cost(have, have_images)
                    if c < best - 1e-12:
                        best, improved = c, True
                        split_of[g] = b
                        if h is not None:
                            split_of[h] = a
                        break
                    have[a] += d
                    have[b] -= d
                    have_images[a] += di
                    have_images[b] -= di
                if split_of[g] != a:
                    break
        if not improved:
            break


def subset(data: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """The json with only these images and their annotations (every other key kept)."""
    return {
        **data,
        "images": [im for im in data["images"] if im["id"] in image_ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in image_ids],
    }


def proportions(index: CocoIndex, split: np.ndarray, n_splits: int) -> dict[str, list[float]]:
    """For each class (and the negatives), the share of its annotations (images) in each split."""
    names = [*index.label_map.names, NEGATIVE]
    k = len(names)
    table = np.zeros((n_splits, k))
    for i in range(len(index)):
        s, e = index.ann_start[i], index.ann_start[i + 1]
        labels = index.labels[s:e]
        if len(labels):
            np.add.at(table[split[i]], labels - 1, 1.0)
        else:
            table[split[i], k - 1] += 1
    tot = np.maximum(table.sum(0), 1)
    return {n: (table[:, j] / tot[j]).round(4).tolist() for j, n in enumerate(names) if table[:, j].sum()}


# -- merging ----------------------------------------------------------------------------------


def file_name_key(name: str) -> str:
    """What makes two file names one file under one root: './' and '//' folded, and letter case
    (Windows and macOS file systems ignore it, so copying both inputs' images into one folder
    would keep one)."""
    return posixpath.normpath(name).casefold()


def merge(
    paths: list[str | Path],
    prefixes: list[str] | None = None,
    renames: dict[str, str] | None = None,
    on_invalid: str = "clip",
) -> tuple[dict[str, Any], list[str]]:
    """Merge COCO files into one, matching categories by name.

    Args:
        paths: the COCO files (each validated first, as ``load`` does).
        prefixes: per file, a folder prefix for its file names (so they resolve under one
            common image root), or None.
        renames: category names to rename before matching (e.g. {"automobile": "car"}).
        on_invalid: as data.on_invalid (see ``load``); what it clips or drops is in the notes.

    Returns:
        (merged json, a few lines on what was matched). Category ids are 1..K in order of first
        appearance (unused placeholder categories, which CocoIndex leaves out, are dropped);
        image and annotation ids are renumbered from 1.

    Raises:
        DatasetError: an input the data layer refuses, or file names of two inputs that name one
            file under one image root (the same name, up to './', '//' and letter case: one file
            on Windows and macOS).
    """
    if prefixes is not None and len(prefixes) != len(paths):
        raise DatasetError(f"{len(prefixes)} prefixes for {len(paths)} files: give one per file or none")
    renames = renames or {}
    names: dict[str, int] = {}
    images: list[dict] = []
    annotations: list[dict] = []
    where: dict[str, tuple[str, str]] = {}  # file_name_key -> (file, file_name as written)
    notes = []
    clashes = []
    for f, path in enumerate(paths):
        index, data = load(path, on_invalid)
        prefix = (prefixes[f].rstrip("/") + "/") if prefixes and prefixes[f] else ""
        cat_map = {}
        placeholders = {c for c, _ in index.dropped_categories}  # Roboflow's unused dataset-level category
        for c in data["categories"]:
            if c["id"] in placeholders:
                continue
            name = renames.get(str(c.get("name")), str(c.get("name")))
            if name not in names:
                names[name] = len(names) + 1
            cat_map[c["id"]] = names[name]
        moved = {c: t for c, t in cat_map.items() if c != t}
        notes.append(f"{path}: {len(index)} images, {index.num_annotations} annotations"
                     + (f"; category ids {moved} renumbered by name" if moved else "")
                     + "".join(f"; unused placeholder category {c} '{n}' left out" for c, n in index.dropped_categories))  # fmt: skip
        notes += [f"  {line}" for line in repairs(index)]
        img_map = {}
        for im in data["images"]:
            name = prefix + im["file_name"].replace("\\", "/")
            key = file_name_key(name)
            if key in where and where[key][0] != str(path):  # within one file, IMG.jpg and img.jpg are two files
                other, as_written = where[key]
                also = f"'{as_written}' in {other}" if as_written != name else f"in {other}"
                clashes.append(f"{path}: images (id {im['id']}) file_name '{name}' is also {also}")
                continue
            where[key] = (str(path), name)
            img_map[im["id"]] = len(images) + 1
            images.append({**im, "id": img_map[im["id"]], "file_name": name})
        counter = Counter()
        for a in data["annotations"]:
            if a["image_id"] not in img_map:
                counter["skipped"] += 1
                continue
            annotations.append({**a, "id": len(annotations) + 1, "image_id": img_map[a["image_id"]],
                                "category_id": cat_map[a["category_id"]]})  # fmt: skip
    if clashes:
        shown = "\n".join(f"  - {c}" for c in clashes[:MAX_LISTED])
        raise DatasetError(
            f"{len(clashes)} image file name(s) of one input name a file of another under one image root "
            "(the same name, up to './', '//' and letter case); give --prefix, one folder per input, if they are "
            f"different images under different roots:\n{shown}"
        )
    categories = [{"id": i, "name": n} for n, i in names.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, notes
