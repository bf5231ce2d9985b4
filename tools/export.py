"""Export a checkpoint to ONNX or TorchScript and check it against eager PyTorch.

    python tools/export.py --checkpoint best.pt --format onnx|torchscript --output FILE [--size H W] [--samples IMG ...]

ONNX graphs take one float RGB image (3, H, W) in [0, 1] of the export size (default: the
model's min_size x a 4:3 width). A metadata file FILE.json is written beside the model (class
names, input size, normalisation). The check runs both on sample images and fails (exit 1)
when labels differ or boxes differ by more than --box-tolerance pixels (a Mask R-CNN's graph
includes the mask head: its masks must overlap eager PyTorch's by at least --mask-iou IoU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from detector import export, runtime  # noqa: E402
from detector.families import family_of_model  # noqa: E402
from detector.inference import Predictor, load_model  # noqa: E402


def sample_images(
    paths: list[str], size: tuple[int, int] | None, checkpoint_cfg: dict, predictor: Predictor
) -> list[torch.Tensor]:
    """Sample images at the export size: given files, else the training run's val images,
    decoded as the Predictor (and training) decode them."""
    if not paths:
        val = checkpoint_cfg.get("data", {}).get("val", {})
        root = Path(val.get("images") or "")
        syn = checkpoint_cfg.get("data", {}).get("synthetic", {})
        if syn.get("enabled"):
            root = Path(syn["root"]) / "val"
        paths = [str(p) for p in sorted(root.glob("*"))[:4]] if root.is_dir() else []
    images = [predictor.prepare(p)[0] for p in paths]
    if not images:  # nothing to look at: noise still checks that the graphs compute the same thing
        images = [torch.rand(3, *(size or (320, 320)), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    if size is not None:
        images = [torch.nn.functional.interpolate(im[None], size=size, mode="bilinear")[0] for im in images]
    return images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="ONNX input size (fixed)")
    ap.add_argument("--samples", nargs="*", default=[], help="images for the parity check")
    ap.add_argument("--score-threshold", type=float, default=0.3, help="detections compared in the check")
    ap.add_argument("--box-tolerance", type=float, default=1.0, help="max box difference in pixels")
    ap.add_argument("--score-tolerance", type=float, default=1e-3, help="max score difference")
    ap.add_argument("--mask-iou", type=float, default=0.95, help="Mask R-CNN: min IoU of exported vs eager masks")
    args = ap.parse_args(argv)

    model, label_map, meta = load_model(args.checkpoint)
    size = None
    if args.format == "onnx":
        size = tuple(args.size) if args.size else export.default_size(model)
        path = export.export_onnx(model, args.output, size)
        runner = export.onnx_runner(path)
    else:
        path = export.export_torchscript(model, args.output)
        runner = export.torchscript_runner(path)
    info = export.metadata(label_map, size, args.format, model)
    draft = bool(meta.get("config", {}).get("data", {}).get("draft_decode", True))
    images = sample_images(args.samples, size, meta.get("config", {}), Predictor(model, label_map, "cpu", 1, draft))
    parity = export.check_parity(model, images, runner, args.score_threshold)
    info["parity"] = {
        **parity.__dict__,
        "box_tolerance_px": args.box_tolerance,
        "score_tolerance": args.score_tolerance,
        "score_threshold": args.score_threshold,
    }
    masks_ok = True
    if family_of_model(model).masks:  # the mask head is in the graph: compare masks too
        from detector.mask_export import mask_parity, mask_runner

        info["outputs"]["masks"] = "(n, 1, H, W) probabilities in input pixels (object where > 0.5)"
        mp = mask_parity(model, images, mask_runner(path, args.format), args.score_threshold)
        info["parity"].update({**mp, "mask_iou_tolerance": args.mask_iou})
        print(f"mask parity on {mp['mask_pairs']} detection(s): min IoU {mp['min_mask_iou']:.4f}, "
              f"mean {mp['mean_mask_iou']:.4f}")  # fmt: skip
        masks_ok = mp["mask_pairs"] > 0 and mp["min_mask_iou"] >= args.mask_iou
    meta_path = export.write_metadata(info, path)
    print(f"wrote {path} and {meta_path}")
    print(
        f"parity on {parity.images} image(s), {parity.detections} detection(s) >= {args.score_threshold}: "
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
        print(
            f"error: the exported model disagrees with eager PyTorch (tolerance {args.box_tolerance} px, "
            f"{args.score_tolerance} in score, mask IoU >= {args.mask_iou})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(runtime.run_main(main))
