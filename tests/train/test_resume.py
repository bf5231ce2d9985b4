"""Checkpoints that survive anything: exact resume after SIGKILL, SIGTERM with 2 processes,
damaged states, pickled objects, non-finite losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from detector.core.errors import WeightsError
from detector.models.build import read_checkpoint
from detector.train import checkpoint
from detector.train.state import RunState
from tests.conftest import (
    ONE_PROCESS_RESUME,
    ROOT,
    TINY,
    TWO_PROCESS_RESUME,
    assert_same_weights,
    data_overrides,
    dummy_batches,
    launch_cmd,
    popen,
    run_cmd,
    tool_env,
)


def _cmd(nproc: int, args: list[str]) -> list[str]:
    return launch_cmd("train.py", ["--config", str(TINY), *args], nproc)


ENV = tool_env()


def _states(run: Path) -> list[Path]:
    return checkpoint.list_states(run)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tiny_dataset, tmp_path, one_process_reference):
    common = [*ONE_PROCESS_RESUME, *data_overrides(tiny_dataset)]  # the reference: shared with test_faults
    run = tmp_path / "killed"
    proc = popen(_cmd(1, [f"output_dir={run}", *common]), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    # 8 steps per epoch, a state every 3: kill hard at the first state of epoch 2 (step 9); the
    # states up to step 15 are all mid-epoch, seven steps to be killed in
    while time.time() < deadline and proc.poll() is None and not any(s.name >= "step_00000009" for s in _states(run)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = _states(run)
    assert states and states[-1].name < "step_00000016", "the run finished before it was killed"
    position = json.loads((states[-1] / checkpoint.COMPLETE).read_text())
    assert 0 < position["batch"] < 8  # a mid-epoch state

    res = run_cmd(_cmd(1, [f"output_dir={run}", "train.resume=auto", *common]), env=ENV,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert_same_weights(one_process_reference / "last.pt", run / "last.pt")


@pytest.mark.slow
def test_sigterm_two_processes_saves_and_resumes_exactly(tiny_dataset, tmp_path, two_process_reference):
    run = tmp_path / "run"
    args = [f"output_dir={run}", *TWO_PROCESS_RESUME, "data.num_workers=2", *data_overrides(tiny_dataset)]
    proc = popen(_cmd(2, args), env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and not _states(run) and proc.poll() is None:
        time.sleep(0.05)
    assert _states(run), "no state was saved"
    # SLURM signals every process of the job step: the launcher, both training processes and
    # their DataLoader workers (torchrun gives the training processes sessions of their own).
    # The first state is at step 2 of 8: six steps and a validation to receive it in.
    import psutil

    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert (run / "PREEMPTED").is_file(), err[-3000:]
    last = _states(run)[-1]
    meta = json.loads((last / checkpoint.COMPLETE).read_text())
    assert meta["num_processes"] == 2 and meta["step"] < 8, meta
    assert {"rng_0.pt", "rng_1.pt", "state.pt"} <= set(meta["files"])
    assert "stopped by signal SIGTERM" in out
    res = run_cmd(_cmd(2, [*args, "train.resume=auto"]), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {last}" in res.stdout
    assert not (run / "PREEMPTED").exists()
    assert_same_weights(two_process_reference / "last.pt", run / "last.pt")


def _fake_state(run: Path, step: int, accelerator) -> Path:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pos = RunState(epoch=0, batch=step, step=step, world_size=1, batch_size=4, grad_accum_steps=1)
    return checkpoint.save_state(run, accelerator, model, opt, sched, pos, keep=5)


def test_truncated_state_falls_back_to_older(tmp_path, cpu_accelerator):
    acc = cpu_accelerator
    _fake_state(tmp_path, 1, acc)
    newest = _fake_state(tmp_path, 2, acc)
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load_state_files(newest, 0)
    messages = []
    found = checkpoint.find_resumable(tmp_path, 0, messages.append)
    assert found is not None and found[0].name == "step_00000001"
    assert "trying an older state" in messages[0]


def test_interrupted_write_leaves_no_state(tmp_path, cpu_accelerator):
    acc = cpu_accelerator
    _fake_state(tmp_path, 1, acc)
    (tmp_path / "checkpoints" / ".tmp-step_00000002").mkdir()  # a write that died half way
    assert [s.name for s in checkpoint.list_states(tmp_path)] == ["step_00000001"]


def test_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="pickled Python objects"):
        read_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(WeightsError, match="truncated, corrupt"):
        read_checkpoint(tmp_path / "trunc.pt")


class _NaNAfter(torch.nn.Module):
    """A model whose loss turns NaN after `good` steps."""

    def __init__(self, good: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls, self.good = 0, good

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.w * 2).sum()
        return {"loss_a": loss * (float("nan") if self.calls > self.good else 1.0)}


def test_nonfinite_steps_skipped_then_stop(cpu_accelerator):
    from detector.train.engine import NonFiniteLossError, train_one_epoch

    acc = cpu_accelerator
    model = _NaNAfter(good=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = {"epoch": 0, "start_batch": 0, "grad_accum_steps": 1, "clip_grad_norm": None}
    # 2 good steps then 2 NaN steps, under a limit of 5: the NaN steps are skipped and counted.
    stats = train_one_epoch(model, opt, sched, dummy_batches(4), acc, max_nonfinite_steps=5, **kw)
    assert stats["train/nonfinite_steps"] == 2 and stats["nonfinite_in_row"] == 2
    assert model.w.item() == pytest.approx(1 - 2 * 0.1 * 2)  # only the two good steps moved it
    assert sched.last_epoch == 2
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        train_one_epoch(model, opt, sched, dummy_batches(10), acc, max_nonfinite_steps=5, nonfinite_in_row=2, **kw)
    assert model.w.item() == pytest.approx(0.6)


# -- a run directory reused with another dataset or model ---------------------------------------------

SHAPES = {
    "model": "fasterrcnn_resnet18_fpn",
    "class_names": ["circle", "square", "triangle"],
    "category_ids": [3, 7, 12],
}


def _objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _saved_run(run: Path, accelerator, trained_on: dict | None) -> Path:
    model, opt, sched = _objects(0)
    pos = RunState(epoch=1, batch=0, step=8, best=0.06, world_size=1, batch_size=4, grad_accum_steps=1)
    return checkpoint.save_state(run, accelerator, model, opt, sched, pos, keep=5, trained_on=trained_on)


@pytest.mark.parametrize(
    ("this_run", "said"),
    [
        (
            {**SHAPES, "class_names": ["date", "fig", "hazelnut"]},
            "3 classes circle, square, triangle (this run: 3, date, fig, hazelnut)",
        ),
        (
            {**SHAPES, "class_names": ["circle", "square"], "category_ids": [3, 7]},
            "3 classes circle, square, triangle (this run: 2, circle, square)",
        ),
        ({**SHAPES, "class_names": ["square", "circle", "triangle"]}, "(this run: 3, square, circle, triangle)"),
        (
            {**SHAPES, "model": "retinanet_resnet18_fpn"},
            "model fasterrcnn_resnet18_fpn (this run: retinanet_resnet18_fpn)",
        ),
    ],  # fmt: skip
)
def test_a_state_of_other_classes_or_another_model_is_refused_before_loading(tmp_path, cpu_accelerator, this_run,
                                                                             said):  # fmt: skip
    """The demo's run folder resumed with a 3-class fruit dataset used to continue the shapes model
    without a word (and keep its best.pt and best score); with another class count it ended in a
    state_dict size mismatch. Now nothing is loaded and the message says what differs and what to do."""
    state_dir = _saved_run(tmp_path, cpu_accelerator, SHAPES)
    model, opt, sched = _objects(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.resume("auto", tmp_path, cpu_accelerator, model, opt, sched, lambda m: None, trained_on=this_run)
    text = str(err.value)
    assert said in text and str(state_dir) in text, text
    assert "another output_dir" in text and "train.resume=null" in text, text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights were loaded"


def test_the_same_classes_under_other_category_ids_resume_with_a_warning(tmp_path, cpu_accelerator):
    _saved_run(tmp_path, cpu_accelerator, SHAPES)
    said: list[str] = []
    model, opt, sched = _objects(1)
    pos = checkpoint.resume("auto", tmp_path, cpu_accelerator, model, opt, sched, said.append,
                            trained_on={**SHAPES, "category_ids": [1, 2, 3]})  # fmt: skip
    assert pos is not None and pos.step == 8
    assert any(m.startswith("warning: the classes' category ids changed") and "[3, 7, 12] -> [1, 2, 3]" in m
               for m in said), said  # fmt: skip
    said.clear()
    checkpoint.resume("auto", tmp_path, cpu_accelerator, model, opt, sched, said.append, trained_on=SHAPES)
    assert not any("warning" in m for m in said), said


def test_a_state_that_records_nothing_is_checked_against_the_run_lineage_and_its_weights(tmp_path, cpu_accelerator):
    """A state written before states recorded their classes: the run directory's lineage.json
    says them; weights that do not fit the model are a CheckpointError, not a RuntimeError."""
    _saved_run(tmp_path, cpu_accelerator, None)
    fp = {"dataset": {"train": {"class_names": SHAPES["class_names"], "category_ids": SHAPES["category_ids"]}}}
    (tmp_path / "lineage.json").write_text(json.dumps(fp))
    model, opt, sched = _objects(1)
    with pytest.raises(checkpoint.CheckpointError, match="circle, square, triangle .this run: 3, date, fig"):
        checkpoint.resume("auto", tmp_path, cpu_accelerator, model, opt, sched, lambda m: None,
                          trained_on={**SHAPES, "class_names": ["date", "fig", "hazelnut"]})  # fmt: skip
    (tmp_path / "lineage.json").unlink()
    wider = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(wider.parameters(), lr=0.1)
    with pytest.raises(checkpoint.CheckpointError, match="do not fit this run's model .*size mismatch") as err:
        checkpoint.resume("auto", tmp_path, cpu_accelerator, wider, opt, sched, lambda m: None, trained_on=SHAPES)
    assert "another output_dir" in str(err.value) and "train.resume=null" in str(err.value)


def test_starting_over_moves_the_earlier_run_aside(tmp_path, cpu_accelerator):
    """train.resume=null in a used run directory: the earlier run's states would sort after this
    run's (a resume would take them, and keep_checkpoints would delete this run's), and its
    epochs would stay in metrics.jsonl."""
    _saved_run(tmp_path, cpu_accelerator, SHAPES)
    for name in ("metrics.jsonl", "best.pt", "last.pt", "lineage.json"):
        (tmp_path / name).write_text("earlier run\n")
    (tmp_path / "config.yaml").write_text("the earlier run's\n")  # this run writes its own after the move
    said: list[str] = []
    dest = checkpoint.set_aside_previous_run(tmp_path, said.append)
    assert dest is not None and dest.parent == tmp_path / checkpoint.PREVIOUS_DIR
    assert checkpoint.list_states(tmp_path) == [] and checkpoint.list_states(dest) != []
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.PREVIOUS_DIR]
    assert (dest / "config.yaml").read_text() == "the earlier run's\n"
    assert (dest / "best.pt").read_text() == "earlier run\n" and str(dest) in said[0]
    assert checkpoint.set_aside_previous_run(tmp_path, said.append) is None  # nothing more to move
    (tmp_path / "config.yaml").write_text("this run's\n")  # a fresh run directory holds only its own config
    assert checkpoint.set_aside_previous_run(tmp_path, said.append) is None and (tmp_path / "config.yaml").is_file()


def test_a_resumed_run_whose_json_changed_warns_and_records_the_new_dataset(tmp_path):
    """The same classes, files changed (images added, boxes fixed): legitimate, said once."""
    from detector.runs import lineage

    def fp(train_sha: str) -> dict:
        split = {"sha256": "", "class_names": SHAPES["class_names"]}
        return {"dataset": {"train": {**split, "sha256": train_sha}, "val": {**split, "sha256": "v"}}}

    said: list[str] = []
    lineage.record(tmp_path, fp("a"), None, None, said.append)
    assert said == []
    lineage.record(tmp_path, fp("a"), None, None, said.append)
    assert said == []  # unchanged: nothing to say
    lineage.record(tmp_path, fp("b"), None, None, said.append)
    assert len(said) == 1 and said[0].startswith("warning: the train json changed since this run directory"), said
    assert lineage.dataset_id(fp("a")) in said[0] and lineage.dataset_id(fp("b")) in said[0]
    assert json.loads((tmp_path / "lineage.json").read_text())["dataset"]["train"]["sha256"] == "b"


def test_a_coco_stat_of_minus_one_never_chooses_best_pt():
    """COCOeval's -1 (no ground truth for the stat) is no score: it must not become best.pt, nor
    be beaten only by scores above -1 when best_mode=min; a loss is a score whatever its sign."""
    assert checkpoint.best_score({"val/mAP": -1.0}, "val/mAP") is None
    assert checkpoint.best_score({"val/AP/circle": -1.0}, "val/AP/circle") is None
    assert checkpoint.best_score({"val/mAP": 0.0}, "val/mAP") == 0.0
    assert checkpoint.best_score({"val/loss": -0.5}, "val/loss") == -0.5
    for mode in ("max", "min"):
        assert not checkpoint.is_better(checkpoint.best_score({"val/mAP": -1.0}, "val/mAP"), None, mode)
        assert not checkpoint.is_better(checkpoint.best_score({"val/mAP": -1.0}, "val/mAP"), 0.2, mode)
    assert checkpoint.is_better(0.3, 0.2, "max") and not checkpoint.is_better(float("nan"), None, "max")


@pytest.mark.slow
def test_rerunning_a_finished_run_or_its_folder_with_other_classes(trained_run, tiny_dataset, tmp_path):
    """configs/frcnn.yaml resumes (train.resume=auto) into a fixed output_dir, so both are routine:
    a finished run used to print 'epochs 0' and nothing else; another dataset with as many classes
    continued the other model silently (with its best.pt and best score)."""
    import shutil
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("RUNNING.lock", "DONE"))
    logged = (run / "metrics.jsonl").read_text()
    best = (run / "best.pt").read_bytes()

    def train(ds: dict) -> subprocess.CompletedProcess:
        return run_cmd([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(TINY), f"output_dir={run}",
                               "train.epochs=6", "train.resume=auto", *data_overrides(ds)], env=ENV, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    res = train(tiny_dataset)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"the run in {run} is finished: 6 epoch(s) trained" in res.stdout, res.stdout[-2000:]
    assert f"its best weights are {run / 'best.pt'} (val/mAP " in res.stdout and "epochs 0" not in res.stdout
    fruit = {"root": tiny_dataset["root"]}
    for split in ("train", "val"):  # the same images and boxes, three other class names
        data = json.loads(Path(tiny_dataset[split]).read_text())
        for cat, name in zip(sorted(data["categories"], key=lambda c: c["id"]), ("date", "fig", "hazelnut")):
            cat["name"] = name
        fruit[split] = tmp_path / f"{split}.json"
        fruit[split].write_text(json.dumps(data))
    res = train(fruit)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "circle, square, triangle" in errors[0] and "date, fig, hazelnut" in errors[0], errors[0][:3000]
    assert "another output_dir" in errors[0] and "train.resume=null" in errors[0], errors
    assert (run / "metrics.jsonl").read_text() == logged and (run / "best.pt").read_bytes() == best


def test_a_finished_runs_message_names_what_stopped_it(tmp_path):
    """An early-stopped run stays stopped when train.epochs is raised: the message must name the
    patience then, not advise raising the epochs (which cannot help)."""
    from detector.config import load
    from detector.train.process import finished_message
    from tests.conftest import TINY

    cfg = load(TINY, ["train.epochs=6", "eval.early_stop_patience=2", "data.synthetic.enabled=true"])
    layout = {"world_size": 1, "batch_size": 4, "grad_accum_steps": 1}
    early = finished_message(RunState(epoch=3, evals_since_best=2, **layout), cfg, tmp_path, early_stopped=True)
    assert "eval.early_stop_patience=2" in early and "raise eval.early_stop_patience" in early
    assert "train.epochs" not in early
    done = finished_message(RunState(epoch=6, **layout), cfg, tmp_path, early_stopped=False)
    assert "train.epochs=6 reached" in done and "raise train.epochs to train longer" in done
    assert "early_stop" not in done


def test_every_process_resumes_from_the_main_processs_state_or_all_refuse(tmp_path, cpu_accelerator, monkeypatch):
    """train.resume=auto chose a state per process: with one damaged file one process could start
    fresh (or from an older state) while the others resume. Seen here from process 1 of 2, with the
    main process's answer broadcast and the problems gathered as accelerate would."""
    from types import SimpleNamespace

    import accelerate.utils

    model, opt, sched = _objects(0)
    pos = RunState(epoch=1, batch=0, step=8, world_size=1, batch_size=4, grad_accum_steps=1)
    older = checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, pos, keep=5)
    newer = checkpoint.save_state(tmp_path, cpu_accelerator, model, opt, sched, replace(pos, step=16), keep=5)
    rank1 = SimpleNamespace(num_processes=2, process_index=1)
    gathered = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda x: gathered.extend([None, *x]) or gathered)

    def main_chose(state):
        monkeypatch.setattr(
            accelerate.utils, "broadcast_object_list", lambda box, from_process=0: box.__setitem__(0, state)
        )

    main_chose(str(older))  # the main process could not read the newer one: this process follows it
    found = checkpoint.agreed_resumable(tmp_path, rank1, print)
    assert found is not None and found[0] == older and found[1]["position"]["step"] == 8
    main_chose(None)  # the main process starts fresh: so does this one
    gathered.clear()
    assert checkpoint.agreed_resumable(tmp_path, rank1, print) is None
    (newer / "rng_1.pt").write_bytes(b"damaged")  # this process cannot read the main process's choice
    main_chose(str(newer))
    gathered.clear()
    with pytest.raises(checkpoint.CheckpointError, match="process 1: .*step_00000016: unreadable.*train.resume=PATH"):
        checkpoint.agreed_resumable(tmp_path, rank1, print)


def test_a_state_saved_with_another_backbone_lr_factor_is_refused_naming_it(tmp_path, cpu_accelerator):
    """optim.backbone_lr_factor splits the optimizer's parameter groups: a resume with another
    factor would fail in torch (another number of groups) or keep the saved factor silently."""
    from detector.config import OptimConfig
    from detector.train import optim

    def objects(factor: float):
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("backbone", torch.nn.Linear(2, 2))
        model.add_module("head", torch.nn.Linear(2, 2))
        opt = optim.build_optimizer(model, OptimConfig(backbone_lr_factor=factor), 0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    pos = RunState(epoch=1, batch=0, step=8, world_size=1, batch_size=4, grad_accum_steps=1)
    saved = checkpoint.save_state(tmp_path, cpu_accelerator, *objects(0.1), pos, keep=5)
    state, rng = checkpoint.load_state_files(saved, 0)
    checkpoint.restore(state, rng, cpu_accelerator, *objects(0.1))  # the same factor resumes
    for factor in (1.0, 0.5):  # 2 groups instead of 4; 4 groups of another factor
        with pytest.raises(
            checkpoint.CheckpointError, match=r"saved with optim.backbone_lr_factor=0.1 \(4 parameter groups\)"
        ):
            checkpoint.restore(state, rng, cpu_accelerator, *objects(factor))
