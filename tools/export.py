"""Export a checkpoint to ONNX, OpenVINO or TorchScript and check it against eager PyTorch.

    python tools/export.py --checkpoint best.pt --format onnx|openvino|torchscript --output FILE [--samples IMG ...]
    python tools/export.py --checkpoint best.pt --format onnx|openvino --int8 [--calibration DIR] --output FILE

ONNX graphs take one float RGB image (3, H, W) in [0, 1] of any size (they resize and normalise
inside) and return boxes in that image's pixels; --size H W only sets the example image the
graph is traced with. A metadata file FILE.json is written beside the model (class names,
the decoding steps before the graph and their inverse after it, normalisation);
detector.deploy.ExportedPredictor runs the model on files like the Predictor. The check runs
both models on the sample images at their own sizes and on crops of the one with the most
detections at three aspect ratios (portrait 3:4, 4:3, 16:9) and two sizes, and fails (exit 1)
when labels differ or boxes differ by more than --box-tolerance pixels (a Mask R-CNN's graph
includes the mask head: its masks must overlap eager PyTorch's by at least --mask-iou IoU).

OpenVINO (FILE.xml + FILE.bin) is the ONNX graph converted to OpenVINO IR, checked in OpenVINO.
--int8 quantizes the graph (detector/deploy/quantize.py) on --calibration-count images of --calibration
DIR (default: the images the training run's training json lists, not every file of its folder);
calibration images that are val images are counted and warned about (the cost measured on them
is optimistic). The parity check is then that of the fp32 graph it was made from, and the
accuracy cost is measured instead: box AP50 of the fp32 and the int8 model on the val set (the
training run's, or --val-annotations/--val-images), written to FILE.json; --max-ap50-drop fails
the export (exit 1) when int8 loses more than that (and needs a val set).

Before any work: --format onnx needs onnx and onnxruntime (pip install 'detector[export]'),
--format openvino and --int8 the deploy extra (pip install 'detector[deploy]', with openvino);
a missing package is one line naming the extra, exit 2. Missing folders of --output are created.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--format", choices=["onnx", "openvino", "torchscript"], required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="ONNX: the example image size the graph is traced with (the graph takes any size)",
    )
    ap.add_argument("--samples", nargs="*", default=[], help="images for the parity check")
    ap.add_argument("--score-threshold", type=float, default=0.3, help="detections compared in the check")
    ap.add_argument("--box-tolerance", type=float, default=1.0, help="max box difference in pixels")
    ap.add_argument("--score-tolerance", type=float, default=1e-3, help="max score difference")
    ap.add_argument("--mask-iou", type=float, default=0.95, help="Mask R-CNN: min IoU of exported vs eager masks")
    ap.add_argument("--int8", action="store_true", help="onnx/openvino: an int8 model (static quantization)")
    ap.add_argument("--calibration", help="--int8: a folder of calibration images (default: the training images)")
    ap.add_argument("--calibration-count", type=int, default=100, help="--int8: calibration images used")
    ap.add_argument("--val-annotations", help="--int8: the val set's COCO json for AP50 (default: the run's)")
    ap.add_argument("--val-images", help="--int8: the val set's image folder (default: the run's)")
    ap.add_argument("--max-ap50-drop", type=float, help="--int8: fail when AP50 drops by more than this (0-1)")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


import torch

from detector.core.errors import DatasetError
from detector.core.images import ImageDecodeError
from detector.deploy import export, quantize, runtimes
from detector.inference.predictor import Predictor
from detector.models.build import (
    load_model,
    model_input_size,
)
from detector.models.zoo import family_of_model


def val_samples(checkpoint_cfg: dict, count: int = 4) -> list[str]:
    """The first ``count`` images the training run's val json lists with objects annotated (else
    its first ones), as paths under its image folder: never other files of that folder (a
    Roboflow folder holds its _annotations.coco.json too). [] when the val set is not there."""
    from detector.data.coco import CocoIndex
    from detector.deploy.quantize import run_split

    split = run_split(checkpoint_cfg, "val")
    if split is None:
        return []
    index = CocoIndex(split[0])
    order = sorted(range(len(index.image_ids)), key=lambda i: index.ann_start[i + 1] == index.ann_start[i])
    return [str(split[1] / index.file_name(i)) for i in order[:count]]  # stable: json order within each group


def sample_images(
    paths: list[str], checkpoint_cfg: dict, predictor: Predictor, score_threshold: float = 0.3
) -> tuple[list[torch.Tensor], list[str]]:
    """Sample images and their names: the given files (else images the training run's val json
    lists, ``val_samples``) at their own sizes, decoded as the Predictor and training decode
    them, then, of the sample where eager PyTorch finds the most detections at or above
    ``score_threshold`` (crops of an empty one would compare nothing), crops at the sizes and
    aspect ratios of ``export.parity_shapes`` and the sizes the model shrinks by 0.8 to 0.2
    (``export.scaled_shapes``): a graph that only works at some sizes cannot pass."""
    paths = paths or val_samples(checkpoint_cfg)
    images = [predictor.prepare(p)[0] for p in paths]
    names = [str(p) for p in paths]
    if not images:  # nothing to look at: noise still checks that the graphs compute the same thing
        images, names = [torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(0))], ["noise"]
    with torch.no_grad():
        found = [int((predictor.model([im])[0]["scores"] >= score_threshold).sum()) for im in images]
    best = max(range(len(images)), key=found.__getitem__)  # the first of the most
    source, hw = images[best], tuple(images[best].shape[1:])
    shapes = export.parity_shapes(predictor.model)
    scaled = export.scaled_shapes(predictor.model, hw)
    names += [f"{names[best]} cropped to {h}x{w}" for h, w in shapes]
    names += [f"{names[best]} at {h}x{w} (model scale {f})" for (h, w), f in zip(scaled, export.PARITY_SCALES)]
    return images + [export.reshaped(source, s) for s in shapes + scaled], names


def val_set(args, cfg: dict) -> tuple[Path, Path] | None:
    """(annotations, images) of the val set the int8 model is scored on: --val-annotations and
    --val-images, else the training run's (None when it is not there)."""
    if args.val_annotations:
        return Path(args.val_annotations), Path(args.val_images)
    return quantize.run_split(cfg, "val")


def calibration_set(args, cfg: dict, predictor: Predictor) -> tuple[list[torch.Tensor], dict]:
    """The int8 calibration images, decoded before anything is exported (a missing or empty source
    is refused before the work), and what to record of them: the image files of --calibration DIR,
    else the images the training run's training json lists (not every file of its folder, which
    tools/split_dataset.py shares with the val json). Warns when some of them are val images: the
    AP50 cost measured on those would be optimistic."""
    if args.calibration:
        files, info = quantize.folder_images(args.calibration), {"folder": str(args.calibration)}
    else:
        train = quantize.run_split(cfg, "train")
        if train is None:
            raise DatasetError("--int8 needs --calibration DIR: the training run's training json or images are gone")
        files, info = quantize.annotated_images(*train), {"annotations": str(train[0]), "folder": str(train[1])}
    files = quantize.spread(files, args.calibration_count)
    images, problems = quantize.calibration_images(files, predictor.prepare)
    for p in problems:
        print(f"warning: calibration image left out: {p}", file=sys.stderr)
    info.update({"images": len(images), "left_out": len(problems)})
    val = val_set(args, cfg)
    if val is None and args.max_ap50_drop is not None:
        raise DatasetError("--max-ap50-drop needs a val set: the training run's is gone; pass --val-annotations "
                           "and --val-images")  # fmt: skip
    if val is not None:
        overlap = quantize.val_overlap(files, *val)
        info["val_images"] = len(overlap)
        if overlap:
            print(f"warning: {len(overlap)} of the {len(files)} calibration images are images of the val set {val[0]} "
                  f"(e.g. {overlap[0]}): the int8 AP50 cost measured on it is optimistic; calibrate on images it does "
                  "not hold (by default, the training json's)", file=sys.stderr)  # fmt: skip
    return images, info


def int8(
    args, model, label_map, cfg: dict, fp32_onnx: Path, fp32_path: Path, calibration: tuple[list[torch.Tensor], dict]
) -> tuple[Path, dict, bool]:
    """Quantize the checked fp32 graph to args.output on the ``calibration`` images and measure
    its AP50 against the fp32 model's on the val set. Returns (the int8 model's path, what to
    record, within --max-ap50-drop)."""
    draft = bool(cfg.get("data", {}).get("draft_decode", True))
    images, calibrated = calibration
    source = calibrated.get("annotations") or calibrated["folder"]
    print(f"calibrating int8 on {len(images)} image(s) of {source}")
    path = quantize.quantize_export(fp32_onnx, args.output, args.format, images)
    info: dict = {"calibration": calibrated}
    val = val_set(args, cfg)
    if val is None:
        print("note: no val set (the run's is not there; pass --val-annotations/--val-images): AP50 not measured")
        return path, info, True
    model_size = model_input_size(model) if draft else None
    stats = {}
    for name, file in (("fp32", fp32_path), ("int8", path)):
        run = runtimes.runner_for(file)
        stats[name] = quantize.evaluate_runner(run, *val, label_map, model_size, desc=f"AP50 {name}")
    drop = stats["fp32"]["mAP50"] - stats["int8"]["mAP50"]
    info["val"] = {"annotations": str(val[0]), "images": str(val[1]), "runtime": args.format,
                   "fp32": stats["fp32"], "int8": stats["int8"], "ap50_drop": drop}  # fmt: skip
    print(f"box AP50 on {val[0]}: fp32 {stats['fp32']['mAP50']:.4f}, int8 {stats['int8']['mAP50']:.4f} "
          f"(drop {drop:+.4f}); mAP fp32 {stats['fp32']['mAP']:.4f}, int8 {stats['int8']['mAP']:.4f}")  # fmt: skip
    return path, info, args.max_ap50_drop is None or drop <= args.max_ap50_drop


def output_problem(output: str) -> str | None:
    """Why --output cannot be written, or None: a folder it names that does not exist yet is
    created (after the checks, before the export), so only a path under a file or an unwritable
    folder, or an existing folder as the file, is refused."""
    path = Path(output)
    if path.is_dir():
        return f"--output {output} is a folder: give the file to write"
    folder = next(p for p in path.absolute().parents if p.exists())  # the root exists
    if not folder.is_dir():
        return f"--output {output}: {folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--output {output}: cannot write in {folder}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.size and min(args.size) < 1:
        ap.error(f"--size takes a positive height and width, got {args.size[0]} {args.size[1]}")
    if args.format == "openvino" and Path(args.output).suffix != ".xml":
        ap.error(f"--format openvino writes FILE.xml and FILE.bin: --output {args.output} does not end in .xml")
    if args.int8 and args.format == "torchscript":
        ap.error("--int8 is for --format onnx or openvino")
    if bool(args.val_annotations) != bool(args.val_images):
        ap.error("--val-annotations and --val-images go together")
    if args.int8 and args.calibration_count < 1:
        ap.error(f"--calibration-count takes a number of images >= 1, got {args.calibration_count}")
    if args.int8 and args.calibration and not Path(args.calibration).is_dir():
        ap.error(f"--calibration: the folder {args.calibration} does not exist")
    if problem := output_problem(args.output):
        ap.error(problem)
    if args.format != "torchscript":  # one line naming the extra now, not a library's traceback mid-run
        needs = ["onnx", "onnxruntime"] if args.format == "onnx" else ["onnx", "openvino"]
        needs += ["onnxruntime"] if args.int8 and "onnxruntime" not in needs else []  # its static quantizer
        extra = runtimes.EXPORT_EXTRA if args.format == "onnx" and not args.int8 else runtimes.DEPLOY_EXTRA  # pyproject
        runtimes.require_installed(needs, f"--format {args.format}{' --int8' * args.int8}", extra)

    model, label_map, meta = load_model(args.checkpoint)
    draft = bool(meta.get("config", {}).get("data", {}).get("draft_decode", True))
    predictor = Predictor(model, label_map, "cpu", 1, draft)
    try:  # before exporting: a missing or broken sample is the user's to fix
        images, names = sample_images(args.samples, meta.get("config", {}), predictor, args.score_threshold)
    except ImageDecodeError as exc:
        print(f"error: {exc}; pass --samples with readable images", file=sys.stderr)
        return 2
    calibration = calibration_set(args, meta.get("config", {}), predictor) if args.int8 else None
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # checked by output_problem
    with tempfile.TemporaryDirectory() as work:  # the fp32 graph of an openvino or int8 export
        return export_and_check(args, model, label_map, meta, draft, images, Path(work), calibration, names)


def export_and_check(args, model, label_map, meta: dict, draft: bool, images: list[torch.Tensor], work: Path,
                     calibration: tuple[list[torch.Tensor], dict] | None = None,
                     names: list[str] | None = None) -> int:  # fmt: skip
    """Export, check against eager PyTorch on ``images`` (``names``: theirs, for messages),
    quantize (--int8, on ``calibration``: see calibration_set), write the metadata; the exit
    code. ``work``: a temporary folder for the
    fp32 graph of an openvino or int8 export."""
    if args.format in ("onnx", "openvino"):
        direct = args.format == "onnx" and not args.int8
        fp32_onnx = export.export_onnx(model, args.output if direct else work / "fp32.onnx",
                                       tuple(args.size) if args.size else None)  # fmt: skip
        path = fp32_onnx
        if args.format == "openvino":  # checked in OpenVINO, at f32
            path = runtimes.export_openvino(fp32_onnx, work / "fp32.xml" if args.int8 else args.output)
            runner = runtimes.as_triple(runtimes.openvino_runner(path))
        else:
            runner = export.onnx_runner(path)
    else:
        path = export.export_torchscript(model, args.output)
        runner = export.torchscript_runner(path)
    info = export.metadata(label_map, None, args.format, model, draft)
    info["precision"] = "int8" if args.int8 else "fp32"
    parity = export.check_parity(model, images, runner, args.score_threshold, names)
    info["parity"] = {
        **parity.summary(args.box_tolerance, args.score_tolerance),
        "shapes_hw": [list(im.shape[1:]) for im in images],
        "box_tolerance_px": args.box_tolerance,
        "score_tolerance": args.score_tolerance,
        "score_threshold": args.score_threshold,
    }
    masks_ok = True
    if family_of_model(model).masks:  # the mask head is in the graph: compare masks too
        from detector.deploy.mask_parity import mask_parity, mask_runner

        info["outputs"]["masks"] = "(n, 1, H, W) probabilities at the given image's size (object where > 0.5)"
        if args.format == "openvino":
            mrun = runtimes.as_mask_runner(runtimes.openvino_runner(path))
        else:
            mrun = mask_runner(path, args.format)
        mp = mask_parity(model, images, mrun, args.score_threshold)
        info["parity"].update({**mp, "mask_iou_tolerance": args.mask_iou})
        print(f"mask parity on {mp['mask_pairs']} detection(s): min IoU {mp['min_mask_iou']:.4f}, "
              f"mean {mp['mean_mask_iou']:.4f}")  # fmt: skip
        masks_ok = mp["mask_pairs"] > 0 and mp["min_mask_iou"] >= args.mask_iou
    parity_ok = parity.detections > 0 and parity.ok(args.box_tolerance, args.score_tolerance) and masks_ok
    int8_ok = True
    if args.int8 and parity_ok:  # the int8 model of a graph that matches eager PyTorch
        cfg = meta.get("config", {})
        path, info["int8"], int8_ok = int8(args, model, label_map, cfg, fp32_onnx, path, calibration)
        info["parity"]["of"] = "the fp32 graph the int8 model was quantized from"
    written = parity_ok or not args.int8  # an int8 export writes nothing when its fp32 graph is wrong
    if written:
        info["parity"]["passed"] = parity_ok
        meta_path = export.write_metadata(info, path)
        print(f"wrote {path} and {meta_path}")
    print(
        f"parity on {parity.images} image(s) of {len({tuple(im.shape[1:]) for im in images})} size(s) "
        f"({', '.join(f'{im.shape[1]}x{im.shape[2]}' for im in images)}), "
        f"{parity.detections} detection(s) >= {args.score_threshold}: "
        f"labels equal {parity.labels_equal}, max box diff {parity.max_box_diff:.4f} px, "
        f"max score diff {parity.max_score_diff:.2e}"
    )
    if parity.detections == 0:
        print(
            f"error: nothing was compared: eager PyTorch finds no object >= {args.score_threshold} on the sample "
            "images; pass --samples with objects in them or lower --score-threshold",
            file=sys.stderr,
        )
        return 1
    if not parity.ok(args.box_tolerance, args.score_tolerance) or not masks_ok:
        failed = parity.failed(args.box_tolerance, args.score_tolerance)
        where = "".join(f"\n  {im.describe(args.box_tolerance, args.score_tolerance)}" for im in failed)
        files = f"{path} and {path.with_suffix('.bin')}" if args.format == "openvino" else str(path)
        kept = (f"the model was left at {files} (the parity figures in {path}.json) for inspection: do not deploy it"
                if written else "nothing was written")  # fmt: skip
        on = f"on {len(failed)} of {parity.images} image(s)" if failed else "in its masks"
        print(
            f"error: the exported model disagrees with eager PyTorch {on} (tolerance {args.box_tolerance} px, "
            f"{args.score_tolerance} in score, mask IoU >= {args.mask_iou}); {kept}{where}",
            file=sys.stderr,
        )
        return 1
    if not int8_ok:
        val = info["int8"]["val"]
        print(f"error: the int8 model loses {val['ap50_drop']:.4f} box AP50 on {val['annotations']}, more than "
              f"--max-ap50-drop {args.max_ap50_drop}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
