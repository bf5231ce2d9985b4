"""The trained tiny checkpoint through the Predictor and the exported models: the score threshold,
every input type, and TorchScript outputs compared with eager PyTorch (ONNX: tests/deploy/test_deploy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.core.detections import Detections
from detector.inference.predictor import Predictor
from detector.models.build import load_model
from tests.conftest import run_tool_in_process

pytestmark = pytest.mark.slow  # every test here needs the trained checkpoint


def _val_images(ds: dict[str, Path]) -> list[Path]:
    return sorted((ds["root"] / "val").glob("*.jpg"))


def _same(a: list[Detections], b: list[Detections], box_tol: float = 1e-3, score_tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.labels.tolist() == y.labels.tolist(), i
        np.testing.assert_allclose(x.boxes, y.boxes, atol=box_tol, err_msg=str(i))
        np.testing.assert_allclose(x.scores, y.scores, atol=score_tol, err_msg=str(i))


def test_score_threshold_filters(trained_run, tiny_dataset):
    paths = _val_images(tiny_dataset)
    low = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.01).predict(paths)
    scores = np.concatenate([d.scores for d in low])
    assert len(scores) > 4 and scores.min() >= 0.01
    high_t = float(np.quantile(scores, 0.75))  # some detections above it, most below
    high = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=high_t).predict(paths)
    n_high = sum(len(d) for d in high)
    assert 0 < n_high < len(scores)
    for lo, hi in zip(low, high):
        assert (hi.scores >= high_t).all()
        # NMS only ever suppresses a box for a better one, so what passes the higher threshold is
        # exactly what the lower one found above it: a subset, boxes and scores unchanged
        keep = lo.scores > high_t
        order_lo, order_hi = np.argsort(-lo.scores[keep], kind="stable"), np.argsort(-hi.scores, kind="stable")
        assert lo.labels[keep][order_lo].tolist() == hi.labels[order_hi].tolist()
        np.testing.assert_allclose(lo.boxes[keep][order_lo], hi.boxes[order_hi], atol=1e-4)
        np.testing.assert_allclose(lo.scores[keep][order_lo], hi.scores[order_hi], atol=1e-6)


def test_input_types_give_the_same_detections(trained_run, tiny_dataset):
    p = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", score_threshold=0.05)
    paths = _val_images(tiny_dataset)
    rgb = [np.asarray(Image.open(f).convert("RGB")) for f in paths]
    reference = p.predict(rgb)  # RGB uint8 HWC
    assert sum(len(d) for d in reference) > 0, "nothing detected: the comparisons would be empty"
    _same(p.predict([im.astype(np.float32) / 255 for im in rgb]), reference)  # float HWC in [0, 1]
    _same(p.predict([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in rgb]), reference)  # uint8 CHW tensor
    _same(p.predict([torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in rgb]), reference)  # float CHW
    _same(p.predict([Image.fromarray(im) for im in rgb]), reference)  # PIL RGB

    gray_pil = [Image.open(f).convert("L") for f in paths]
    gray = [np.asarray(g) for g in gray_pil]
    gray_reference = p.predict([np.repeat(g[..., None], 3, axis=2) for g in gray])  # the same gray, as RGB uint8
    assert sum(len(d) for d in gray_reference) > 0
    _same(p.predict(gray), gray_reference)  # 2-D numpy
    _same(p.predict(gray_pil), gray_reference)  # PIL "L"
    _same(p.predict([torch.from_numpy(g.copy()) for g in gray]), gray_reference)  # 2-D uint8 tensor
    _same(p.predict([g.astype(np.float32) / 255 for g in gray]), gray_reference)  # 2-D float numpy
    _same(p.predict([g[..., None].copy() for g in gray]), gray_reference)  # (H, W, 1) numpy
    _same(p.predict([torch.from_numpy(g.copy())[None] for g in gray]), gray_reference)  # (1, H, W) tensor


# -- export ------------------------------------------------------------------------------------------


def _eager(model: torch.nn.Module, img: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in model([img])[0].items()}


def _above(d: dict[str, np.ndarray], t: float) -> dict[str, np.ndarray]:
    keep = d["scores"] >= t
    return {k: v[keep] for k, v in d.items()}


# ONNX export: tests/deploy/test_deploy.py (any input size, ExportedPredictor on files)


def test_torchscript_export_runs_as_eager_and_failing_parity_exits_1(trained_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "model.torchscript"
    # a negative box tolerance cannot be met: the check must fail the export (exit 1), saying why
    capsys.readouterr()
    code = run_tool_in_process("export.py", "--checkpoint", trained_run / "best.pt", "--format", "torchscript",
                               "--output", out, "--score-threshold", 0.05, "--box-tolerance", -1)  # fmt: skip
    said = capsys.readouterr()
    assert code == 1, said.out[-2000:] + said.err[-2000:]
    assert "disagrees with eager PyTorch" in said.err
    meta = json.loads((tmp_path / "model.torchscript.json").read_text())
    assert meta["parity"]["labels_equal"] and 0 <= meta["parity"]["max_box_diff"] <= 1e-3  # only the tolerance failed
    assert meta["parity"]["detections"] > 0

    scripted = torch.jit.load(str(out))  # the file itself, run here on real images of any size
    model, _, _ = load_model(trained_run / "best.pt")
    compared = 0
    for path in _val_images(tiny_dataset):
        img = Predictor.to_tensor(path)
        with torch.no_grad():
            _, dets = scripted([img])
        ts = _above({k: v.numpy() for k, v in dets[0].items()}, 0.1)
        eager = _above(_eager(model, img), 0.1)
        assert ts["labels"].tolist() == eager["labels"].tolist(), path.name
        np.testing.assert_allclose(ts["scores"], eager["scores"], atol=1e-5, err_msg=path.name)
        np.testing.assert_allclose(ts["boxes"], eager["boxes"], atol=1e-3, err_msg=path.name)
        compared += len(ts["labels"])
    assert compared > 0, "no detection above 0.1 on any val image: nothing was compared"
