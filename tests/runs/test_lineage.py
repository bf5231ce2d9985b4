"""Sweeps (the command W&B's agent builds), lineage (dataset, code, config, versions in the run,
best.pt and W&B's offline run files), evaluate --wandb, and the runs comparison table."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from detector import config
from detector.runs import lineage
from detector.runs.compare import runs_table, write_table
from tests.conftest import ROOT, TINY, WANDB_RUN, copy_run, run_tool, run_tool_in_process
from tests.runs.test_tracking import item_key, read_wandb_records, record_type

pytestmark = [pytest.mark.xdist_group("lineage")]  # its module fixtures are built once, on one xdist worker

SWEEP = ROOT / "configs" / "sweep.yaml"


# -- sweeps ------------------------------------------------------------------------------------------


def agent_command(sweep: dict, args: dict) -> list[str]:
    """The command line W&B's agent runs for one sweep run, built by wandb's own functions
    (wandb_agent.Agent._command_run: the sweep's command, its macros replaced)."""
    from wandb.sdk.launch.sweeps import utils

    command = utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    out: list[str] = []
    for c in map(str, command):
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


def run_until_data(cmd: list[str], cwd: Path, monkeypatch) -> tuple[int, Path | None]:
    """Run the agent's command (argv after the interpreter) through tools/train.py's main in this
    process, stopping when the data would be read; returns the exit code and the run directory.
    (A stand-in for the Accelerator: a real one would set this process's threads and accelerate's
    process-wide state for the rest of the session.)"""
    from types import SimpleNamespace

    from detector import data
    from detector.train import process as runtime

    class Reached(Exception):
        pass

    seen: dict[str, Path] = {}

    def stop(cfg, log=print, progress=None):
        seen["run_dir"] = Path(cfg.output_dir)
        raise Reached

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(data, "load_splits", stop)
    one_process = SimpleNamespace(is_main_process=True, num_processes=1, print=print, wait_for_everyone=lambda: None,
                                  device=torch.device("cpu"), mixed_precision="no")  # fmt: skip
    monkeypatch.setattr(runtime, "build_accelerator", lambda cfg: one_process)
    assert cmd[:3] == ["/usr/bin/env", "python", "tools/train.py"], cmd
    try:
        code = run_tool_in_process("train.py", *cmd[3:])
    except Reached:
        code = 0
    return code, seen.get("run_dir")


def sample(spec: dict):
    """One value of a sweep parameter, as W&B would pick it (the last value; a distribution's min)."""
    if "values" in spec:
        return spec["values"][-1]
    if "value" in spec:
        return spec["value"]
    return spec["min"]


def test_sweep_yaml_keys():
    """W&B's sweep jsonschema lives in the optional `sweeps` package (wandb[sweeps]), which pins
    numpy<2 and cannot be installed here: the keys are checked against what it requires."""
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["program"] == "tools/train.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": "val/mAP", "goal": "maximize"}
    assert sweep["metric"]["name"] == config.Config().eval.best_metric  # what validation reports and tracking logs
    stop = sweep["early_terminate"]
    assert stop["type"] == "hyperband" and isinstance(stop["min_iter"], int) and stop["min_iter"] >= 1
    assert isinstance(stop["eta"], int) and stop["eta"] >= 2
    params = sweep["parameters"]
    assert {"optim.lr", "train.batch_size", "data.augment", "model.name", "train.epochs"} <= set(params)
    keys = set(config._all_keys(config.Config))
    for name, spec in params.items():
        assert name in keys, name
        forms = ["values" in spec, "value" in spec, "distribution" in spec]
        assert sum(forms) == 1, name
        if "distribution" in spec:
            assert spec["distribution"] in ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "normal")
            assert spec["min"] < spec["max"]
        if "values" in spec:
            assert isinstance(spec["values"], list) and len(spec["values"]) >= 2
    assert "${args_no_hyphens}" in sweep["command"]
    assert sweep["command"][:3] == ["${env}", "${interpreter}", "${program}"]


def test_sweep_command_overrides_land_in_config(tmp_path, monkeypatch):
    sweep = yaml.safe_load(SWEEP.read_text())
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for i, pick in enumerate([sample, lambda s: s["values"][0] if "values" in s else s["max"]]):
        args = {k: pick(v) for k, v in sweep["parameters"].items()}
        args["optim.lr"] = 3.7e-05 if i == 0 else args["optim.lr"]  # str(): exponent notation, as W&B writes it
        monkeypatch.setenv("WANDB_RUN_ID", f"abc{i}")  # the agent sets it for each run
        cmd = agent_command(sweep, args)
        assert f"optim.lr={args['optim.lr']}" in cmd and "output_dir=runs/sweep/${oc.env:WANDB_RUN_ID}" in cmd
        code, run_dir = run_until_data(cmd, tmp_path, monkeypatch)
        assert code == 0 and run_dir == Path(f"runs/sweep/abc{i}")
        resolved = yaml.safe_load((tmp_path / run_dir / "config.yaml").read_text())
        assert resolved["output_dir"] == f"runs/sweep/abc{i}"  # unique per sweep run, resolved
        for key, value in args.items():
            section, leaf = key.split(".")
            expected = yaml.safe_load(value) if key == "data.augment" else value
            assert resolved[section][leaf] == expected, key
        assert resolved["logging"]["wandb"]["enabled"] is True and resolved["train"]["resume"] == "auto"
        from detector.data.transforms import build_transform

        build_transform(resolved["data"]["augment"], config.BboxConfig())  # each strength is a valid pipeline


def test_sweep_unknown_parameter_did_you_mean(tmp_path, monkeypatch, capsys):
    sweep = yaml.safe_load(SWEEP.read_text())
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.setenv("WANDB_RUN_ID", "xyz")
    cmd = agent_command(sweep, {"optim.lrr": 0.001, "train.batch_size": 8})
    code, run_dir = run_until_data(cmd, tmp_path, monkeypatch)
    assert code == 2 and run_dir is None
    assert "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err


# -- lineage -----------------------------------------------------------------------------------------


def test_git_info_outside_a_checkout_and_when_git_hangs(tmp_path, monkeypatch):
    assert lineage.git_info(tmp_path) == {"commit": None, "dirty": None}  # not a checkout
    installed = tmp_path / "lib" / "site-packages" / "detector"
    installed.mkdir(parents=True)
    assert lineage.git_info(installed) == {"commit": None, "dirty": None}
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nexec sleep 30\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    t0 = time.monotonic()
    assert lineage.git_info(ROOT, timeout=0.5) == {"commit": None, "dirty": None}
    assert time.monotonic() - t0 < 5
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no git at all
    assert lineage.git_info(ROOT) == {"commit": None, "dirty": None}


def test_bad_dataset_artifact_name_is_a_config_error():
    with pytest.raises(config.ConfigError, match="logging.wandb.dataset_artifact"):
        config.load(TINY, ["logging.wandb.dataset_artifact=my data:v1", "data.synthetic.enabled=true"])


def test_file_sha256_streams(tmp_path):
    import hashlib

    data = os.urandom(3 * lineage.CHUNK + 17)
    (tmp_path / "a.json").write_bytes(data)
    assert lineage.file_sha256(tmp_path / "a.json") == hashlib.sha256(data).hexdigest()


def _git(*args: str) -> str | None:
    """git's own answer in the checkout, or None when the tests run from a tree that is not one."""
    res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


@pytest.fixture(scope="module")
def wandb_run(wandb_offline_run) -> Path:
    """One epoch with W&B offline, the checkpoint and the dataset as artifacts (the session's
    WANDB_RUN, shared with test_tracking; not to be changed: copy it)."""
    assert {"logging.wandb.log_checkpoint=true", "logging.wandb.dataset_artifact=tiny-shapes"} <= set(WANDB_RUN)
    return wandb_offline_run["run"]


@pytest.mark.slow
def test_lineage_in_run_files_and_best_pt(wandb_run, tiny_dataset):
    offline = sorted((wandb_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = read_wandb_records(next(offline[0].glob("*.wandb")))
    config_items = {}
    for r in records:
        kind = record_type(r)
        items = r["config"].get("update", []) if kind == "config" else []
        items = r["run"].get("config", {}).get("update", []) if kind == "run" else items
        config_items.update({item_key(it): json.loads(it["value_json"]) for it in items})
    fp = config_items["lineage"]
    train = fp["dataset"]["train"]
    assert train["sha256"] == lineage.file_sha256(tiny_dataset["train"])
    assert fp["dataset"]["val"]["sha256"] == lineage.file_sha256(tiny_dataset["val"])
    assert train["images"] == 16 and train["class_names"] == ["circle", "square", "triangle"]
    assert train["annotations_used"] == len(json.loads(tiny_dataset["train"].read_text())["annotations"])
    head = _git("rev-parse", "HEAD")
    assert fp["code"]["commit"] == head  # the checkout the run came from (None: not a checkout)
    changes = _git("status", "--porcelain", "--untracked-files=no")
    assert fp["code"]["dirty"] == (None if head is None else bool(changes))
    assert fp["versions"]["torch"] == metadata.version("torch")
    assert fp["versions"]["python"] == platform.python_version()
    assert fp["config_sha256"] == lineage.config_sha256(config.load(wandb_run / "config.yaml"))

    logged = [r["artifact"] for r in records if record_type(r) == "artifact"]
    ours = [a for a in logged if a["type"] != "run_table"]  # run_table: W&B's own, one per wandb.Table logged
    assert sorted(a["type"] for a in ours) == ["dataset", "model"]
    artifacts = {a["type"]: a for a in ours}
    ds = artifacts["dataset"]
    want = {"name": "tiny-shapes", "type": "dataset", "digest": ds["digest"]}
    assert ds["name"] == "tiny-shapes" and fp["dataset"]["artifact"] == want
    assert sorted(e["path"] for e in ds["manifest"]["contents"]) == ["train.json", "val.json"]
    model_meta = json.loads(artifacts["model"]["metadata"])
    assert model_meta["dataset_artifact"] == f"tiny-shapes@{ds['digest']}"
    assert model_meta["lineage"] == fp

    best = torch.load(wandb_run / "best.pt", weights_only=True)
    assert best["lineage"] == fp == json.loads((wandb_run / "lineage.json").read_text())
    run_id = next(r["run"]["run_id"] for r in records if record_type(r) == "run")
    assert best["wandb_run"]["id"] == run_id and best["wandb_run"]["mode"] == "offline"
    assert artifacts["model"]["run_id"] == run_id == artifacts["dataset"]["run_id"]  # both logged by this run


@pytest.mark.slow
def test_evaluate_logs_to_the_training_run(wandb_run, tiny_dataset, tmp_path):
    wandb_run = copy_run(wandb_run, tmp_path / "run")  # the evaluation is logged into its W&B folder
    best = wandb_run / "best.pt"
    res = run_tool("evaluate.py", "--checkpoint", best, "--annotations", tiny_dataset["val"], "--images",
                   tiny_dataset["root"] / "val", "--num-workers", 0, "--output", tmp_path / "m.json", "--wandb",
                   env={"WANDB_MODE": None})  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_id = torch.load(best, weights_only=True)["wandb_run"]["id"]
    offline = sorted((wandb_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and offline[1].name.endswith(run_id)  # the training run, resumed
    metrics = json.loads((tmp_path / "m.json").read_text())
    history: dict = {}
    for r in read_wandb_records(next(offline[1].glob("*.wandb"))):
        if record_type(r) == "history":
            history.update({item_key(it): json.loads(it["value_json"]) for it in r["history"].get("item", [])})
    for stat in ("mAP", "mAP50", "AR100", "loss", "AP/circle"):
        assert history[f"test/{stat}"] == pytest.approx(metrics[stat]), stat
    assert history["global_step"] == torch.load(best, weights_only=True)["step"]  # beside the training curves

    # a checkpoint without a W&B run (trained without W&B, or by an earlier version): a clear error
    old = torch.load(best, weights_only=True)
    del old["lineage"], old["wandb_run"]
    torch.save(old, tmp_path / "old.pt")
    code = run_tool_in_process("evaluate.py", "--checkpoint", tmp_path / "old.pt", "--annotations",
                               tiny_dataset["val"], "--images", tiny_dataset["root"] / "val", "--wandb")  # fmt: skip
    assert code == 2
    from detector.models.build import load_model

    load_model(tmp_path / "old.pt")  # the old format without a fingerprint still loads


# -- comparing runs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_table_lists_exactly_the_differing_keys(wandb_run, tmp_path):
    other = tmp_path / "lr_high"
    other.mkdir()
    cfg = yaml.safe_load((wandb_run / "config.yaml").read_text())
    cfg["optim"]["lr"] = cfg["optim"]["lr"] * 10
    cfg["output_dir"] = str(other)
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [json.loads(line) for line in (wandb_run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if r["kind"] == "epoch":
            r["val/mAP"] = r["val/mAP"] + 0.25  # the better run
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns, table = runs_table([wandb_run, other], "val/mAP")
    assert columns[1:-5] == ["optim.lr"]  # run, the differing keys, epochs, best_epoch, 3 metrics
    assert table[0]["run"] == str(other) and table[1]["run"] == str(wandb_run)  # best val/mAP first
    assert float(table[0]["optim.lr"]) == pytest.approx(10 * float(table[1]["optim.lr"]))
    columns_loss, table_loss = runs_table([wandb_run, other], "val/loss")
    assert columns_loss[columns_loss.index("best_epoch") + 1] == "val/loss"

    out = tmp_path / "cmp"
    code = run_tool_in_process("plot_runs.py", wandb_run, other, "--output", out, "--table", "--sort", "val/mAP")
    assert code == 0
    md = (out / "compare_runs.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(columns) + " |" and len(md) == 4
    import csv

    with open(out / "compare_runs.csv") as f:
        assert list(csv.DictReader(f)) == table
    md2, _ = write_table([wandb_run, wandb_run], tmp_path / "same")
    assert md2.splitlines()[0].startswith("| run | epochs |")  # one config: nothing differs
    shutil.rmtree(tmp_path / "same")


# -- review of issue 16: URLs, table keys and order ---------------------------------------------------


@pytest.fixture
def memory_dataset(tiny_dataset):
    """The tiny dataset's json files under memory:// (fsspec's in-process filesystem: a URL with
    no server), as object storage would hold them."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for split in ("train", "val"):
        fs.pipe_file(f"/lineage-review/{split}.json", Path(tiny_dataset[split]).read_bytes())
    yield {s: f"memory://lineage-review/{s}.json" for s in ("train", "val")}
    fs.rm("/lineage-review", recursive=True)


def test_fingerprint_of_a_json_read_from_a_url(memory_dataset, tiny_dataset):
    """data.*.annotations may be fsspec URLs (s3://...): the fingerprint hashes the object's bytes
    (a local open() of 's3:/...' would stop every such run at start-up)."""
    import hashlib

    from detector.data.coco import CocoIndex

    index = CocoIndex(memory_dataset["train"])
    fp = lineage.split_fingerprint(index, "memory://lineage-review/train")
    raw = Path(tiny_dataset["train"]).read_bytes()
    assert fp["annotations"] == memory_dataset["train"]  # the URL as given, '//' kept
    assert fp["sha256"] == hashlib.sha256(raw).hexdigest() and fp["bytes"] == len(raw)
    assert fp["images"] == 16


def test_dataset_artifact_of_json_files_at_urls(memory_dataset, tiny_dataset, tmp_path):
    """The dataset artifact holds the json objects' bytes as train.json/val.json, as for local files."""
    from detector.data.coco import CocoIndex

    splits = type("S", (), {})()
    splits.train, splits.val = CocoIndex(memory_dataset["train"]), CocoIndex(memory_dataset["val"])
    splits.train_root = splits.val_root = "memory://lineage-review"
    fp = lineage.fingerprint(config.Config(), splits)
    logged = []
    updates: dict = {}
    run = type("Run", (), {"offline": True, "log_artifact": lambda self, art: logged.append(art)})()
    run.config = type("Config", (), {"update": lambda self, d, allow_val_change=False: updates.update(d)})()
    lineage.record(tmp_path, fp, run, "review-shapes", log=lambda m: None)
    (art,) = logged
    entries = art.manifest.entries
    assert sorted(entries) == ["train.json", "val.json"]
    for split in ("train", "val"):
        import base64
        import hashlib

        md5 = base64.b64encode(hashlib.md5(Path(tiny_dataset[split]).read_bytes()).digest()).decode()
        assert entries[f"{split}.json"].digest == md5, split
    assert fp["dataset"]["artifact"]["digest"] == art.manifest.digest() and updates["lineage"] is fp


def _fake_run(root: Path, name: str, cfg: dict, values: list[dict]) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), **cfg}, sort_keys=False))
    rows = [{"kind": "epoch", "step": 10 * (e + 1), "epoch": e + 1, **v} for e, v in enumerate(values)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_table_dict_key_order_is_not_a_difference(tmp_path):
    """The same Albumentations pipeline written with its arguments in another order is the same
    config; a different order of the transforms (a list) is not."""
    flip = {"HorizontalFlip": {"p": 0.5}}
    a = _fake_run(
        tmp_path, "a", {"data": {"augment": [flip, {"Blur": {"blur_limit": 3, "p": 0.2}}]}}, [{"val/mAP": 0.1}]
    )
    b = _fake_run(
        tmp_path, "b", {"data": {"augment": [flip, {"Blur": {"p": 0.2, "blur_limit": 3}}]}}, [{"val/mAP": 0.2}]
    )
    c = _fake_run(
        tmp_path, "c", {"data": {"augment": [{"Blur": {"blur_limit": 3, "p": 0.2}}, flip]}}, [{"val/mAP": 0.3}]
    )
    columns, _ = runs_table([a, b])
    assert "data.augment" not in columns
    columns, _ = runs_table([a, c])
    assert "data.augment" in columns


def test_compare_table_order_for_min_metrics_missing_and_class_names(tmp_path):
    """val/loss sorts ascending; runs without the metric (or only NaN/null) go last; a class whose
    name contains 'loss' is still an AP (higher is better)."""
    cfg = {"optim": {"lr": 0.001}}
    runs = [
        _fake_run(
            tmp_path, "mid", cfg, [{"val/loss": 0.9, "val/AP/gloss": 0.2}, {"val/loss": 0.5, "val/AP/gloss": 0.1}]
        ),
        _fake_run(tmp_path, "none", cfg, [{"val/loss": None, "val/AP/gloss": None}]),
        _fake_run(tmp_path, "low", cfg, [{"val/loss": 0.3, "val/AP/gloss": 0.6}]),
        _fake_run(tmp_path, "high", cfg, [{"val/loss": 0.7, "val/AP/gloss": 0.4}]),
    ]
    _, rows = runs_table(runs, "val/loss")
    assert [Path(r["run"]).name for r in rows] == ["low", "mid", "high", "none"]
    assert rows[1]["val/loss"] == "0.5000" and rows[1]["best_epoch"] == "2" and rows[3]["val/loss"] == ""
    _, rows = runs_table(runs, "val/AP/gloss")
    assert [Path(r["run"]).name for r in rows] == ["low", "high", "mid", "none"]
    assert rows[2]["val/AP/gloss"] == "0.2000" and rows[2]["best_epoch"] == "1"


def test_compare_table_sort_metric_no_run_logged_is_an_error(tmp_path, capsys):
    a = _fake_run(tmp_path, "a", {"optim": {"lr": 0.001}}, [{"val/mAP": 0.1}])
    b = _fake_run(tmp_path, "b", {"optim": {"lr": 0.002}}, [{"val/mAP": 0.2}])
    code = run_tool_in_process("plot_runs.py", a, b, "--output", tmp_path / "out", "--table", "--sort", "val/mAp")
    assert code == 2
    err = capsys.readouterr().err
    assert "val/mAp" in err and "did you mean 'val/mAP'" in err
    assert not (tmp_path / "out" / "compare_runs.md").exists()


def _online_run(use_artifact) -> object:
    run = type("Run", (), {"offline": False, "use_artifact": lambda self, art: use_artifact(art)})()
    run.config = type("Config", (), {"update": lambda self, d, allow_val_change=False: None})()
    return run


def test_dataset_artifact_upload_never_holds_training(tiny_dataset, tmp_path):
    """Online, use_artifact waits (without a bound) until the json files are uploaded: the first
    upload of a large json, or a server that stops answering, would hold the main process (and
    the others at their next collective, up to train.dist_timeout_minutes). It is bounded by
    logging.wandb.timeout_s; a refusal is a warning, and no artifact is claimed."""
    import threading

    from detector.data.coco import CocoIndex

    splits = type("S", (), {})()
    splits.train, splits.val = CocoIndex(tiny_dataset["train"]), CocoIndex(tiny_dataset["val"])
    splits.train_root, splits.val_root = tiny_dataset["root"] / "train", tiny_dataset["root"] / "val"
    release = threading.Event()
    messages: list[str] = []
    fp = lineage.fingerprint(config.Config(), splits)
    t0 = time.monotonic()
    try:
        lineage.record(tmp_path, fp, _online_run(lambda art: release.wait(30)), "slow", messages.append, timeout_s=0.5)
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
    assert fp["dataset"]["artifact"]["name"] == "slow"  # declared; its upload goes on in the background
    assert any("slow" in m and "upload" in m for m in messages), messages

    def refuse(art):
        raise ValueError("permission denied for project")

    fp = lineage.fingerprint(config.Config(), splits)
    messages.clear()
    lineage.record(tmp_path, fp, _online_run(refuse), "refused", messages.append, timeout_s=5)
    assert "artifact" not in fp["dataset"]
    assert json.loads((tmp_path / "lineage.json").read_text()) == fp
    assert any("refused" in m and "permission denied" in m for m in messages), messages


@pytest.mark.parametrize("prefix", ["val", "train", "val/", ""])
def test_evaluate_wandb_prefix_of_training_curves_is_refused(prefix, tmp_path, capsys):
    """--wandb-prefix val would log the test set's numbers as val/mAP... into the training run:
    its curves, its summary and the sweep's metric (W&B takes a run's best val/mAP from them)."""
    with pytest.raises(SystemExit) as exc:
        run_tool_in_process("evaluate.py", "--checkpoint", tmp_path / "best.pt", "--annotations", tmp_path / "a.json",
                            "--images", tmp_path, "--wandb", "--wandb-prefix", prefix)  # fmt: skip
    assert exc.value.code == 2
    assert "--wandb-prefix" in capsys.readouterr().err


def test_fingerprint_counts_crowd_annotations_apart(tmp_path):
    """Training leaves crowd annotations out of its targets (COCOeval uses them as ignore regions):
    the fingerprint says how many of the annotations are crowd."""
    from detector.data.coco import CocoIndex
    from tests.conftest import write_coco

    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 30, 30], "area": 900, "iscrowd": 1}]  # fmt: skip
    path = write_coco(tmp_path / "a.json", images, anns, [{"id": 1, "name": "x"}])
    fp = lineage.split_fingerprint(CocoIndex(path), tmp_path)
    assert fp["annotations_used"] == 2 and fp["crowd"] == 1


def test_evaluate_wandb_falls_back_offline_when_online_start_fails(monkeypatch, tmp_path):
    """As training does: no API key on the evaluating machine, or a server that refuses, logs the
    stats offline (to sync later) instead of a traceback after the evaluation's work."""
    import wandb

    from detector.runs import tracking

    calls: list[str] = []
    logged: dict = {}

    class Run:
        id, dir = "abc123", str(tmp_path / "wandb" / "offline-run-x-abc123" / "files")
        summary = type("Summary", (), {"update": lambda self, d: logged.update(d)})()

        def define_metric(self, *a, **k):
            pass

        def log(self, d):
            logged.update(d)

        def finish(self):
            calls.append("finish")

    def init(mode, **kwargs):
        calls.append(mode)
        assert kwargs["id"] == "abc123" and kwargs["resume"] == "allow"
        if mode == "online":
            raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
        return Run()

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(tracking, "_online", lambda log: True)
    meta = {"wandb_run": {"id": "abc123", "project": "detector", "entity": None, "mode": "online"}, "step": 42}
    messages: list[str] = []
    run_id = lineage.log_evaluation(tmp_path / "best.pt", meta, {"mAP": 0.5}, {"sha256": "x"}, log=messages.append)
    assert run_id == "abc123" and calls == ["online", "offline", "finish"]
    assert logged["test/mAP"] == 0.5 and logged["global_step"] == 42
    assert any("api_key not configured" in m and "offline" in m for m in messages), messages
