"""Evaluate a checkpoint on a COCO dataset, or score an existing COCO results file.

    accelerate launch tools/evaluate.py --checkpoint best.pt --annotations A --images I [--batch-size N] [--output metrics.json]
    accelerate launch tools/evaluate.py --checkpoint best.pt ... --slice 640 --overlap 0.2 [--no-full-pass]
    python tools/evaluate.py --predictions results.json --annotations A [--images I] [--output metrics.json]

--predictions rows must carry A's image ids: write them with tools/infer.py --annotations A. An
images.json beside the results (tools/infer.py writes one) is checked against A: results whose
image ids name other files there than in A (infer.py's positions, without --annotations) are
refused, as are results of images A does not name.

Prints the 12 COCO stats and a per-class AP table (and the segm ones for a Mask R-CNN checkpoint or
results with a segmentation); --output writes them as one flat JSON object (masks: segm/<stat>);
--results writes the model's COCO results json; --plots DIR writes the PR curves and AP bars, and
the error analysis (detector/evaluation/analysis.py): analysis.json, the confusion matrix at --confusion-iou and
--confusion-score, per-class P/R/F1 at the best-F1 threshold, AP by object size and (with --images)
galleries of the images with the most false positives and missed objects.
--wandb logs the stats to the W&B run that trained the checkpoint (as test/<stat>, beside its curves).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import cli
from detector.core import errors


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="best.pt / last.pt written by tools/train.py")
    src.add_argument("--predictions", help="a COCO results json to score (no model needed)")
    ap.add_argument("--annotations", required=True, metavar="JSON", help="COCO ground-truth json")
    ap.add_argument("--images", metavar="DIR", help="image root (needed with --checkpoint)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--score-threshold", type=float, help="override the checkpoint's box_score_thresh")
    cli.add_workers(ap, 2, "loader processes decoding the images")
    ap.add_argument(
        "--num-workers", dest="workers", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # the earlier spelling
    ap.add_argument("--backend", choices=["pycocotools", "faster_coco_eval"], default="pycocotools")
    ap.add_argument("--on-invalid", choices=cli.ON_INVALID, default="clip",
                    help="as data.on_invalid; the ground truth is scored as written in every mode")  # fmt: skip
    ap.add_argument("--on-corrupt-image", choices=["error", "skip"], default="error")
    ap.add_argument("--output", metavar="FILE", help="write the stats as one flat JSON object")
    ap.add_argument("--results", metavar="FILE", help="write the model's detections as a COCO results json")
    ap.add_argument("--plots", metavar="DIR", help="folder for the PR curves, per-class AP and the error analysis")
    ap.add_argument("--confusion-iou", type=float, default=0.5, help="IoU for a match in the error analysis")
    ap.add_argument("--confusion-score", type=float, default=0.25,
                    help="score threshold of the confusion matrix and galleries")  # fmt: skip
    ap.add_argument("--gallery", type=int, default=8, help="images per gallery of worst images (0: none)")
    ap.add_argument("--wandb", action="store_true", help="log the stats to the W&B run that trained the checkpoint")
    ap.add_argument("--wandb-prefix", default="test", help="the stats' W&B names: PREFIX/mAP... (default: test)")
    cli.add_slice_args(ap)
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer before torch is imported


from detector.config import DataConfig
from detector.core import progress, storage
from detector.core.errors import DatasetError
from detector.data import check_files
from detector.data.coco import CocoDetection, CocoIndex, read_json
from detector.evaluation.cocoeval import CocoResult, evaluate_coco, flat_metrics, segm_metrics
from detector.inference.folders import ids_by_file_name
from detector.inference.slicing import require_supervision, slice_spec, sliced_detect
from detector.train import process as runtime

# the training config's settings that the dataset code's errors name -> this tool's flags
FLAGS = {"data.on_invalid=": "--on-invalid ", "data.on_corrupt_image=": "--on-corrupt-image "}


@contextmanager
def own_flags() -> Iterator[None]:
    """A DatasetError that tells how to fix it with a data.* setting names this tool's flag instead."""
    try:
        yield
    except DatasetError as exc:
        text = original = errors.error_text(exc)
        for setting, flag in FLAGS.items():
            text = text.replace(setting, flag)
        if text == original:
            raise
        raise DatasetError(text) from exc


def report(result: CocoResult) -> str:
    lines = [f"{k:>11}: {v:.4f}" for k, v in result.stats.items()]
    lines.append(f"{'class':>20}  {'AP':>7}  {'AP50':>7}")
    lines += [f"{n:>20}  {result.per_class_ap[n]:7.4f}  {result.per_class_ap50[n]:7.4f}" for n in result.per_class_ap]
    return "\n".join(lines)


def check_ids_by_listing(predictions: Path, coco_gt: dict, rows: list, annotations: str) -> None:
    """Refuse results whose image ids are not the ground truth's, as far as the images.json
    beside them (tools/infer.py's: id -> file) tells: ids that name other files there than in
    the ground truth (infer.py's positions), or files the ground truth does not name."""
    listing = predictions.parent / "images.json"
    if not listing.is_file():
        return
    try:
        images = read_json(listing)["images"]
        ids = [int(im["id"]) for im in images]
        names = [str(im["file_name"]) for im in images]
    except (ValueError, KeyError, TypeError):
        return  # not infer.py's listing
    used = {r.get("image_id") for r in rows if isinstance(r, dict)}
    theirs = ids_by_file_name(names, coco_gt["images"])
    wrong = [(n, i, t) for n, i, t in zip(names, ids, theirs) if t is not None and t != i]
    if wrong:
        n, i, t = wrong[0]
        raise DatasetError(
            f"{predictions}: its image_id are not the ids of {annotations}: for {len(wrong)} of {len(images)} images "
            f"{listing} gives another id than {annotations} (e.g. {n}: {i} there, {t} in {annotations}). These are "
            f"tools/infer.py's positions; write the dataset's ids with tools/infer.py --annotations {annotations}"
        )
    unknown = [n for n, i, t in zip(names, ids, theirs) if t is None and i in used]
    if unknown:
        raise DatasetError(
            f"{predictions}: {len(unknown)} image(s) with results are not in {annotations} by file name (per "
            f"{listing}): {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
        )


def score_file(args) -> dict:
    rows = read_json(Path(args.predictions))
    if isinstance(rows, dict) and "annotations" in rows:
        rows = rows["annotations"]
    if not isinstance(rows, list):
        raise DatasetError(f"{args.predictions}: expected a list of COCO results (image_id, category_id, bbox, score)")
    masks = any(isinstance(r, dict) and "segmentation" in r for r in rows)  # Mask R-CNN results: segm too
    # masks are in the frame training scores them in: EXIF-swapped sizes need the image headers
    gt = CocoIndex(args.annotations, on_invalid=args.on_invalid, masks=masks,
                   images_root=args.images if masks and args.images else None)  # fmt: skip
    coco_gt = gt.to_coco_gt()
    check_ids_by_listing(Path(args.predictions), coco_gt, rows, args.annotations)  # the clearer message first
    known = set(gt.image_ids.tolist())
    unknown = sum(1 for r in rows if r.get("image_id") not in known)
    if unknown:
        raise DatasetError(f"{args.predictions}: {unknown} result(s) name images that are not in {args.annotations}")
    if masks:
        from detector.evaluation.segm import check_result_sizes

        check_result_sizes(coco_gt, rows, str(args.predictions))
    result = evaluate_coco(coco_gt, rows, args.backend)
    print(report(result))
    segm, segm_result = segm_metrics(coco_gt, rows, args.backend, prefix="segm/")
    if segm_result is not None:
        print("segm (masks):\n" + report(segm_result))
    return {"metrics": {**flat_metrics(result, prefix=""), **segm}, "result": result, "gt": coco_gt, "rows": rows}


def evaluate_checkpoint(args) -> dict | None:
    from detector.data.loader import EvalBatchSampler, build_loader
    from detector.inference.predictor import load_model
    from detector.models.build import model_input_size
    from detector.train.engine import evaluate

    if not args.images:
        raise DatasetError("--images is needed with --checkpoint")
    accelerator = runtime.make_accelerator()
    overrides = {"box_score_thresh": args.score_threshold} if args.score_threshold is not None else {}
    model, label_map, meta = load_model(args.checkpoint, **overrides)
    from detector.models.zoo import family_of_model

    masks = family_of_model(model).masks  # Mask R-CNN: the masks are read and scored (segm) too
    trained_on = meta.get("config", {}).get("data", {}).get("train", {}).get("annotations") or "its training json"
    index = CocoIndex(
        args.annotations,
        label_map=label_map,
        on_invalid=args.on_invalid,
        label_source=f"{args.checkpoint} (trained on {trained_on})",
        images_root=args.images,
        masks=masks,
    )
    # Images resized since labelling would be scored in the wrong frame: the same checks as training.
    data_cfg = DataConfig(on_invalid=args.on_invalid, on_corrupt_image=args.on_corrupt_image)
    for problem in check_files(index, storage.local_or_url(args.images), data_cfg):
        accelerator.print(f"warning: {problem}")
    accelerator.print(index.summary())
    coco_gt = index.to_coco_gt()
    draft = bool(meta.get("config", {}).get("data", {}).get("draft_decode", True)) and args.slicing is None
    ds = CocoDetection(index, args.images, None, model_input_size(model) if draft else None, args.on_corrupt_image)
    sampler = EvalBatchSampler(
        index.aspect_ratios(), args.batch_size, accelerator.num_processes, accelerator.process_index
    )
    loader = build_loader(ds, sampler, args.workers)
    model = model.to(accelerator.device)
    bar = progress.progress(accelerator.is_main_process, total=len(sampler), desc="evaluate")
    metrics, result, rows = evaluate(
        model,
        loader,
        sampler.batch_ids(),
        accelerator,
        label_map,
        coco_gt,
        backend=args.backend,
        seed=int(meta.get("config", {}).get("train", {}).get("seed", 0)),  # the loss's sampling, as in training
        progress=bar,
        detect=sliced_detect(args.slicing, args.batch_size, accelerator.autocast) if args.slicing else None,
    )
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    print(report(result))
    if masks:
        print("segm (masks):\n" + "\n".join(f"{k[len('val/segm/'):]:>11}: {v:.4f}" for k, v in metrics.items()
                                            if k.startswith("val/segm/") and "/AP/" not in k))  # fmt: skip
    if args.slicing is None:  # sliced detection makes no loss
        print(f"{'val loss':>11}: {metrics['val/loss']:.6f}")
    if args.results:  # in the annotation file's own category ids
        back = {t: c for c, t in index.category_remap.items()}
        own = [{**r, "category_id": back.get(r["category_id"], r["category_id"])} for r in rows]
        Path(args.results).write_text(json.dumps(own))  # its folder was made before the work
    flat = {k.removeprefix("val/"): v for k, v in metrics.items()}
    return {"metrics": flat, "result": result, "gt": coco_gt, "rows": rows, "meta": meta, "index": index}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.slicing = slice_spec(ap, args)
    if args.slicing is not None and args.predictions:
        ap.error("--slice applies to --checkpoint (a results file is scored as it is)")
    if args.slicing is not None:
        require_supervision()
    if args.score_threshold is not None and not 0 <= args.score_threshold <= 1:
        ap.error(f"--score-threshold {args.score_threshold} is not in [0, 1] (scores are probabilities)")
    if not 0 < args.confusion_iou <= 1:
        ap.error(f"--confusion-iou {args.confusion_iou} is not in (0, 1]")
    args.wandb_prefix = args.wandb_prefix.strip("/")
    if args.wandb and args.wandb_prefix in ("", "train", "val"):  # the training run's own curves and summary
        ap.error(f"--wandb-prefix '{args.wandb_prefix}' would overwrite the training run's own metrics; use e.g. test")
    if args.wandb:  # before evaluating: the checkpoint must name its run
        if not args.checkpoint:
            raise DatasetError("--wandb needs --checkpoint (the run is the one that trained it)")
        from detector.models import weights
        from detector.runs import lineage

        lineage.checkpoint_run(weights.read(args.checkpoint), args.checkpoint)
    for path in (args.output, args.results, args.plots):  # before the work, not after it
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    with own_flags():
        out = score_file(args) if args.predictions else evaluate_checkpoint(args)
    if out is None:  # not the main process
        return 0
    if args.output:
        Path(args.output).write_text(json.dumps(out["metrics"], indent=1))
    if args.wandb:
        from detector.runs import lineage

        dataset = lineage.split_fingerprint(out["index"], args.images)
        lineage.log_evaluation(args.checkpoint, out["meta"], out["metrics"], dataset, args.wandb_prefix)
    if args.plots:
        from detector.runs.plots import plot_per_class_ap, plot_pr

        plot_pr(out["result"], Path(args.plots) / "pr_curves.png")
        plot_per_class_ap(out["result"], Path(args.plots) / "per_class_ap.png")
        from detector.evaluation import analysis

        found = analysis.analyze(out["gt"], out["rows"], args.confusion_iou, args.confusion_score)
        print(analysis.report(found))
        analysis.write_json(found, Path(args.plots) / "analysis.json")
        if args.gallery and not args.images:
            print("no galleries of worst images: they need --images")
        analysis.write_plots(found, args.plots, args.images, args.gallery, warn=lambda m: print(m, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
