"""Where a model came from: the dataset it trained on, the code, the config and the libraries.

A run's *fingerprint* is plain data (str, int, bool, None, lists, dicts), so that it travels in
``best.pt``/``last.pt`` (loaded with ``weights_only=True``), in ``lineage.json`` in the run
directory and in the W&B run config alike:

- ``dataset``: per split, the COCO json's path, SHA-256 of its bytes and size, the images and
  annotations kept after repairs (``crowd``: how many of them are crowd), the class names and
  category ids; with ``logging.wandb.dataset_artifact`` also the W&B dataset artifact (name,
  type, digest);
- ``model``: the model's name (config ``model.name``);
- ``code``: the git commit and dirty flag of the checkout ``detector`` runs from (null for both
  when it is not a git checkout, e.g. a pip install);
- ``config_sha256``: a hash of the resolved config (the config itself is ``config.yaml``);
- ``versions``: python and the packages a result depends on.

Only the main process computes it and does W&B work.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from detector.config import Config, to_dict
from detector.core import storage
from detector.core.errors import ConfigError

LINEAGE_FILE = "lineage.json"
PACKAGES = ("detector", "torch", "torchvision", "accelerate", "albumentations", "pycocotools", "numpy", "pillow",
            "omegaconf", "wandb")  # fmt: skip
GIT_TIMEOUT_S = 5.0
CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file or fsspec URL, read in 1 MiB chunks (a COCO json can be hundreds of MB)."""
    return _digest(path)[0]


def _digest(path: str | Path) -> tuple[str, int]:
    """(SHA-256, size) of the same bytes, streamed from a local file or an fsspec URL."""
    h = hashlib.sha256()
    size = 0
    with storage.open_binary(path, block_size=CHUNK) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def git_info(where: str | Path | None = None, timeout: float = GIT_TIMEOUT_S) -> dict[str, Any]:
    """The commit and dirty flag of the git checkout holding ``where`` (default: this package).

    One ``git status`` call with a timeout. Not a checkout (an installed package under
    site-packages, no git, a timeout, any git error): ``{"commit": None, "dirty": None}``, never
    an exception. Dirty means tracked files differ from the commit (untracked files do not count).
    """
    unknown: dict[str, Any] = {"commit": None, "dirty": None}
    path = Path(where) if where is not None else Path(__file__).resolve().parent
    if {"site-packages", "dist-packages"} & set(path.parts):  # installed: the enclosing repo is someone else's
        return unknown
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},  # read-only: no index-refresh lock
        )
    except (OSError, subprocess.SubprocessError):
        return unknown
    if out.returncode != 0:
        return unknown
    commit = None
    dirty = False
    for line in out.stdout.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.split()[-1]
            commit = oid if oid != "(initial)" else None
        elif line and not line.startswith("#"):
            dirty = True
    return {"commit": commit, "dirty": dirty if commit else None}


def package_versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a result depends on (None: not installed)."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def split_fingerprint(index: Any, images_root: str | Path | None = None) -> dict[str, Any]:
    """One split: its json (path, SHA-256, size) and what was read from it.

    Args:
        index: the split's CocoIndex (already parsed: the counts and classes come from it, the
            json is only hashed again, not parsed).
        images_root: the split's image root.
    """
    path = index.path  # a Path, or a URL string (Path() would fold its '//')
    sha256, size = _digest(path)
    return {
        "annotations": storage.redact(path),
        "sha256": sha256,
        "bytes": size,
        "images_root": None if images_root is None else str(images_root),
        "images": int(len(index)),
        "annotations_used": int(index.num_annotations),
        "crowd": int(index.iscrowd.sum()),  # of them: not training targets (ignore regions in COCOeval)
        "class_names": [str(n) for n in index.label_map.names],
        "category_ids": [int(c) for c in index.label_map.category_ids],
    }


def config_sha256(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(cfg: Config, splits: Any) -> dict[str, Any]:
    """The run's fingerprint (see the module docstring) from the config and the parsed splits."""
    return {
        "dataset": {
            "train": split_fingerprint(splits.train, splits.train_root),
            "val": split_fingerprint(splits.val, splits.val_root),
        },
        "model": cfg.model.name,
        "code": git_info(),
        "config_sha256": config_sha256(cfg),
        "versions": package_versions(),
    }


def trained_on(cfg: Config, label_map: Any) -> dict[str, Any]:
    """What a resumable state must have been trained on to continue this run: the model and its
    classes in label order (every process computes it; checkpoint.check_trained_on compares).

    Args:
        cfg: the run's config (its model.name).
        label_map: the training split's LabelMap.
    """
    return {
        "model": cfg.model.name,
        "class_names": [str(n) for n in label_map.names],
        "category_ids": [int(c) for c in label_map.category_ids],
    }


def dataset_id(fp: dict[str, Any]) -> str:
    """A short id of the dataset (train and val json content): equal ids, equal annotations."""
    ds = fp.get("dataset") or {}
    joined = "".join(str((ds.get(s) or {}).get("sha256")) for s in ("train", "val"))
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def read(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / LINEAGE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record(
    run_dir: Path, fp: dict[str, Any], wandb_run: Any, artifact_name: str | None, log=print, timeout_s: float = 60.0
) -> None:
    """Write ``lineage.json``, and with W&B: the dataset artifact and the fingerprint in the run config.

    The dataset artifact (the train and val json files, the fingerprint's dataset part as its
    metadata) is declared as the run's input with ``use_artifact``: W&B stores a content it
    already has only once (same digest, same version). ``use_artifact`` needs the server, so an
    offline run logs the artifact with ``log_artifact`` instead (uploaded by ``wandb sync``).
    Its reference (name, digest) is added to ``fp["dataset"]["artifact"]`` in place, so the
    weights files written afterwards carry it too. ``use_artifact`` waits until the files are
    uploaded: it holds training at most ``timeout_s`` (logging.wandb.timeout_s; the upload then
    goes on in the background), and a refusal is a warning (no reference recorded).

    A resumed run whose dataset changed since the run started gets a warning.
    """
    before = read(run_dir)
    if before is not None and dataset_id(before) != dataset_id(fp):
        changed = [s for s in ("train", "val") if before["dataset"][s]["sha256"] != fp["dataset"][s]["sha256"]]
        log(f"warning: the {' and '.join(changed)} json changed since this run directory was last used "
            f"(dataset {dataset_id(before)} -> {dataset_id(fp)}); weights files record the dataset they trained on")  # fmt: skip
    if wandb_run is not None and artifact_name:
        ref = _dataset_artifact(wandb_run, fp, artifact_name, log, timeout_s)
        if ref is not None:
            fp["dataset"]["artifact"] = ref
    (run_dir / LINEAGE_FILE).write_text(json.dumps(fp, indent=1) + "\n")
    if wandb_run is not None:
        wandb_run.config.update({"lineage": fp}, allow_val_change=True)


def _dataset_artifact(run: Any, fp: dict[str, Any], name: str, log, timeout_s: float) -> dict[str, Any] | None:
    import wandb

    try:
        art = wandb.Artifact(name, type="dataset", metadata={**fp["dataset"], "dataset_id": dataset_id(fp)})
    except ValueError as exc:
        raise ConfigError(f"logging.wandb.dataset_artifact={name}: {exc}") from None
    for split in ("train", "val"):
        path = fp["dataset"][split]["annotations"]
        if storage.is_url(path):  # an object-store json: its bytes, as a local file's would be
            with art.new_file(f"{split}.json", mode="wb") as f:
                f.write(storage.read_bytes(path))
        else:
            art.add_file(path, name=f"{split}.json")
    digest = art.manifest.digest()
    if run.offline:
        run.log_artifact(art)
        log(f"W&B offline: dataset artifact {name} (digest {digest}) logged as this run's output; "
            "online runs declare it as their input (use_artifact)")  # fmt: skip
    elif not _use_within(run, art, timeout_s, log):
        return None
    return {"name": name, "type": "dataset", "digest": digest}


def _use_within(run: Any, art: Any, timeout_s: float, log) -> bool:
    """``run.use_artifact(art)``, holding the caller at most ``timeout_s``: a draft artifact is
    uploaded and committed before it returns, with no bound of its own (the first upload of a
    large json, a server that stops answering), while the other processes wait at their next
    collective. False when W&B refused it."""
    import threading

    failed: list[BaseException] = []

    def declare() -> None:
        try:
            run.use_artifact(art)
        except Exception as exc:  # refused, quota, network: never stop training
            failed.append(exc)

    worker = threading.Thread(target=declare, name="wandb-dataset-artifact", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log(f"W&B: dataset artifact {art.name} still uploading after {timeout_s:g} s (logging.wandb.timeout_s); "
            "training goes on, the upload continues in the background")  # fmt: skip
        return True
    if failed:
        reason = str(failed[0]).strip().splitlines()[0] if str(failed[0]).strip() else type(failed[0]).__name__
        log(f"warning: W&B did not take dataset artifact {art.name} ({reason[:300]}); the run records the "
            "dataset's fingerprint without it")  # fmt: skip
        return False
    return True


def wandb_ref(run: Any) -> dict[str, Any] | None:
    """What ``tools/evaluate.py --wandb`` needs to resume the run: id, project, entity, mode."""
    if run is None:
        return None
    return {
        "id": str(run.id),
        "project": str(run.project) if run.project else None,
        "entity": str(run.entity) if run.entity else None,
        "mode": "offline" if run.offline else "online",
    }


def model_metadata(fp: dict[str, Any] | None, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The model artifact's metadata: the fingerprint, the dataset artifact it came from, its scores."""
    fp = fp or {}
    ds_art = (fp.get("dataset") or {}).get("artifact")
    return {
        "lineage": fp,
        "dataset_artifact": f"{ds_art['name']}@{ds_art['digest']}" if ds_art else None,
        "dataset_id": dataset_id(fp) if fp else None,
        "epoch": int(epoch),
        "metrics": metrics,
    }


def checkpoint_run(meta: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """The W&B run recorded in a weights file; ConfigError when it has none (trained without
    W&B, or written before runs were recorded)."""
    ref = meta.get("wandb_run")
    if not isinstance(ref, dict) or not ref.get("id"):
        raise ConfigError(
            f"{checkpoint} records no W&B run (trained with logging.wandb.enabled=false, or by an earlier "
            "version): --wandb has no run to log to"
        )
    return ref


def log_evaluation(
    checkpoint: str | Path,
    meta: dict[str, Any],
    metrics: dict[str, float],
    dataset: dict[str, Any],
    prefix: str = "test",
    log=print,
) -> str:
    """Log an evaluation to the W&B run that trained the checkpoint (resumed by its id).

    The stats go in as ``<prefix>/<stat>`` at the checkpoint's ``global_step`` (beside the
    training curves) and into the run summary, with the evaluated json's fingerprint as
    ``<prefix>/dataset``. The W&B files go to the checkpoint's run directory. Returns the run id.
    """
    import wandb

    from detector.runs.tracking import STEP_KEY, _online

    ref = checkpoint_run(meta, checkpoint)
    mode = ref.get("mode") or "online"
    if mode == "online" and not _online(log):
        mode = "offline"
    wandb_cfg = ((meta.get("config") or {}).get("logging") or {}).get("wandb") or {}
    kwargs = dict(id=ref["id"], project=ref.get("project"), entity=ref.get("entity"), resume="allow",
                  dir=str(Path(checkpoint).resolve().parent))  # fmt: skip
    try:
        timeout = float(wandb_cfg.get("timeout_s") or 90.0)  # the run's own bound
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout), **kwargs)
    except Exception as exc:  # no key here, server not answering, refused: as training, log offline
        if mode != "online":
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log(f"W&B: could not resume run {ref['id']} online ({reason[:300]}); logging offline instead")
        mode = "offline"
        run = wandb.init(mode=mode, **kwargs)
    try:
        run.define_metric(STEP_KEY)
        run.define_metric(f"{prefix}/*", step_metric=STEP_KEY)
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        run.log({**values, STEP_KEY: int(meta.get("step", 0))})
        run.summary.update({**values, f"{prefix}/dataset": dataset, f"{prefix}/checkpoint": str(checkpoint)})
        log(f"W&B: {len(values)} {prefix}/ stats logged to run {run.id}")
        if mode == "offline":
            log(f"W&B is offline: sync later with `wandb sync {run.dir.rsplit('/files', 1)[0]}`")
        return str(run.id)
    finally:
        run.finish()
