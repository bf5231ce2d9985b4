"""tools/export.py's checks before any work (missing optional packages, an output it cannot
write), the warnings it leaves visible, and the failure of a Mask R-CNN export whose masks
disagree with eager PyTorch's."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from detector.deploy import export
from tests.conftest import TINY, run_tool_in_process

TINY_MASK = TINY.with_name("tiny_mask.yaml")


@pytest.mark.parametrize(
    ("options", "blocked", "extra"),
    [
        (["--format", "onnx"], "onnx", "export"),
        (["--format", "onnx"], "onnxruntime", "export"),
        (["--format", "onnx", "--int8"], "onnxruntime", "deploy"),
        (["--format", "openvino"], "openvino", "deploy"),
        (["--format", "openvino", "--int8"], "onnxruntime", "deploy"),
    ],
)
def test_export_names_the_extra_to_install_before_any_work(monkeypatch, tmp_path, capsys, options, blocked, extra):
    """Without the package, the ONNX export ended in torch's OnnxExporterError traceback, and a
    missing onnxruntime or openvino was found after the export (and its parity check). The
    checkpoint does not exist: the check comes before it is even read."""
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` raises ImportError
    out = tmp_path / "model.xml"
    code = run_tool_in_process("export.py", "--checkpoint", tmp_path / "none.pt", *options, "--output", out)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"the {blocked} package" in err and f"pip install 'detector[{extra}]'" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_export_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys, where):
    """A folder that does not exist is created (tests/deploy/test_runtimes.py exports into one); a path
    under a file, or an existing folder as the file, is refused before the checkpoint is read."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "model.onnx" if where == "under_a_file" else tmp_path
    with pytest.raises(SystemExit) as exit_info:
        run_tool_in_process("export.py", "--checkpoint", tmp_path / "none.pt", "--format", "onnx", "--output", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--output" in err and str(out) in err and "none.pt" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_only_torchvisions_trace_warnings_are_silenced():
    """The filter around the ONNX trace hides torchvision's own TracerWarnings (see
    tests/deploy/test_runtimes.py: an export shows none) and nothing else."""
    tracer = torch.jit.TracerWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with export.known_trace_warnings_silenced():
            for module, category in [("torchvision.ops.boxes", tracer), ("torchvision.ops.poolers", tracer),
                                     ("detector.models.build", tracer), ("torchvision.ops.boxes", UserWarning),
                                     ("torch.nn.functional", UserWarning)]:  # fmt: skip
                warnings.warn_explicit(f"{module} {category.__name__}", category, f"{module}.py", 1, module)
            warnings.warn_explicit("torch.tensor results are registered as constants", tracer, "f.py", 1,
                                   "torch.nn.functional")  # fmt: skip
    assert sorted(str(w.message) for w in caught) == [
        "detector.models.build TracerWarning",
        "torch.nn.functional UserWarning",
        "torchvision.ops.boxes UserWarning",
    ]


def mask_checkpoint(path: Path, tiny_dataset: dict[str, Path]) -> Path:
    """An untrained tiny Mask R-CNN's weights file: its scores are near 1/3 for every box, so
    it returns detections without training (its export must still match it)."""
    from detector import config
    from detector.core.labels import LabelMap
    from detector.models import weights
    from detector.models.build import build_model
    from tests.conftest import data_overrides

    cfg = config.load(TINY_MASK, [*data_overrides(tiny_dataset), "model.box_score_thresh=0.0",
                                  "model.box_detections_per_img=4"])  # fmt: skip
    torch.manual_seed(0)
    label_map = LabelMap([1, 2], ["a", "b"])
    model = build_model(cfg.model, label_map.num_classes, list(label_map.names), log=lambda _: None)
    weights.save(weights.payload(model, config.to_dict(cfg), label_map.to_dict(), {}, 0, 0), path)
    return path


@pytest.mark.slow
def test_mask_export_fails_when_its_masks_disagree_with_eager(tiny_dataset, tmp_path, monkeypatch, capsys):
    """The --mask-iou failure path: boxes, labels and scores match, the masks do not (the graph's
    are inverted here), so the export fails (exit 1) and records the mask IoU it found."""
    from detector.deploy import mask_parity as mask_export

    real = mask_export.mask_runner

    def inverted(path, fmt):
        run = real(path, fmt)

        def run_inverted(img):
            boxes, labels, scores, masks = run(img)
            return boxes, labels, scores, 1.0 - masks

        return run_inverted

    monkeypatch.setattr(mask_export, "mask_runner", inverted)
    checkpoint = mask_checkpoint(tmp_path / "mask.pt", tiny_dataset)
    sample = sorted((tiny_dataset["root"] / "val").glob("*.jpg"))[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run_tool_in_process("export.py", "--checkpoint", checkpoint, "--format", "torchscript",
                                   "--output", tmp_path / "m.pt", "--samples", sample, "--score-threshold", 0.05)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    parity = json.loads((tmp_path / "m.pt.json").read_text())["parity"]
    assert code == 1
    assert parity["detections"] > 0 and parity["labels_equal"] and parity["max_box_diff"] <= 1.0  # boxes agree
    assert parity["mask_pairs"] > 0 and parity["min_mask_iou"] < parity["mask_iou_tolerance"] == 0.95
    assert "mask" in capsys.readouterr().err.lower()
