from __future__ import annotations

import dataclasses

import pytest

from detector import config
from detector.core.errors import ConfigError

from .conftest import ROOT


def test_defaults_and_demo_load():
    cfg = config.load(ROOT / "configs" / "demo.yaml")
    assert cfg.data.synthetic.enabled
    assert cfg.model.name == "fasterrcnn_resnet18_fpn"
    assert cfg.model.weights is None
    assert cfg.model.returned_layers == [2, 3, 4]


def test_frcnn_config_needs_data_paths():
    with pytest.raises(ConfigError, match=r"data.train.annotations and data.train.images must be set"):
        config.load(ROOT / "configs" / "frcnn.yaml")
    cfg = config.load(
        ROOT / "configs" / "frcnn.yaml",
        [
            "data.train.annotations=a.json",
            "data.train.images=img",
            "data.val.annotations=b.json",
            "data.val.images=img",
        ],
    )
    assert cfg.model.name == "fasterrcnn_mobilenet_v3_large_fpn"
    assert cfg.model.weights == "DEFAULT"


def test_overrides_are_typed():
    cfg = config.load(ROOT / "configs" / "demo.yaml", ["train.epochs=3", "model.weights=null", "optim.lr=0.5"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == 0.5


def test_frozen():
    cfg = config.load(ROOT / "configs" / "demo.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown config key 'trian"),
        ("model.nmae=x", "did you mean 'model.name'?"),
        ("train.epochs=three", "bad value for 'train.epochs'"),
        ("train.mixed_precision=fp8", "bad value for 'train.mixed_precision'"),
        ("optim.name=lion", "bad value for 'optim.name'"),
        ("train.epochs", "is not of the form key=value"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("optim.warmup_factor=2", "optim.warmup_factor must be in (0, 1]"),
        ("model.min_size=900", "model.min_size must be <= model.max_size"),
        ("eval.analysis_score=1.5", "eval.analysis_score must be in [0, 1]"),
        ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes must be > 0"),
        ("logging.wandb.timeout_s=-1", "logging.wandb.timeout_s must be > 0"),
        ("eval.best_metric=mAP", "unknown metric 'mAP' (did you mean 'val/mAP'?)"),
        ("eval.best_metric=val/map50", "unknown metric 'val/map50' (did you mean 'val/mAP50'?)"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    overrides = [override] + (["model.max_size=800"] if "min_size" in override else [])
    with pytest.raises(ConfigError) as err:
        config.load(ROOT / "configs" / "demo.yaml", overrides)
    assert message in str(err.value)


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'train.batch_sise' \(did you mean 'train.batch_size'\?\)"
    ):
        config.load(bad)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        config.load(bad)


def test_roundtrip_and_yaml(tmp_path):
    cfg = config.load(ROOT / "configs" / "demo.yaml", ["train.epochs=2"])
    d = config.to_dict(cfg)
    assert config.from_dict(d) == cfg
    d["some_future_key"] = 1  # checkpoints from newer versions still load
    assert config.from_dict(d) == cfg
    config.save_yaml(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg
