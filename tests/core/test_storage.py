"""Images and annotations in object storage: a real S3-compatible server (moto's server mode on
127.0.0.1, started and stopped here), read through fsspec/s3fs with the credentials of the
standard AWS environment variables, never from our config or logs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from detector.core import storage
from detector.core.errors import DatasetError
from detector.core.images import load_image
from detector.data.coco import CocoIndex
from tests.conftest import (
    TINY,
    TWO_PROCESS_RUN,
    data_overrides,
    epoch_records,
    http_server,
    launch,
    run_tool_in_process,
    write_coco,
)

pytestmark = [pytest.mark.xdist_group("storage")]  # its module fixtures are built once, on one xdist worker

try:  # declared dev dependencies: a skip locally without them, a failure under CI
    import moto.server as moto_server
    import s3fs  # noqa: F401
except ImportError as exc:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"{exc}: pip install -e '.[dev]' (s3fs, moto[server])", allow_module_level=True)

SECRET = "SeCrEt-0123456789-do-not-log"  # the fake secret key: it must appear in no output
BUCKET = "detector-test"


@pytest.fixture(scope="module")
def s3(tiny_dataset):
    """A moto S3 server on 127.0.0.1 (a free port) holding the tiny dataset under
    s3://detector-test/tiny/ (train.json, val.json, train/, val/); yields the environment that
    points the AWS clients at it. Stopped at the end of the module."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDTESTONLY",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        root = Path(tiny_dataset["root"])
        for f in sorted(root.rglob("*")):
            if f.is_file():
                fs.pipe_file(f"{BUCKET}/tiny/{f.relative_to(root).as_posix()}", f.read_bytes())
        yield {"env": env, "url": f"s3://{BUCKET}/tiny", "fs": fs}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_index_and_images_from_s3_match_the_local_folder(s3, tiny_dataset):
    url = s3["url"]
    local = CocoIndex(tiny_dataset["train"], images_root=tiny_dataset["root"] / "train")
    remote = CocoIndex(f"{url}/train.json", images_root=f"{url}/train")
    assert remote.path == f"{url}/train.json"  # not folded into 's3:/...'
    assert not any(remote.files[k] for k in ("missing", "unreadable", "size_mismatch"))
    for attr in ("image_ids", "widths", "heights", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(remote, attr), getattr(local, attr))
    name = local.file_name(0)
    for size in (None, (40, 40)):  # the full decode and the reduced-scale (draft) JPEG decode
        a, sa, _ = load_image(f"{url}/train/{name}", size)
        b, sb, _ = load_image(tiny_dataset["root"] / "train" / name, size)
        assert sa == sb
        np.testing.assert_array_equal(a, b)


def test_missing_objects_and_credentials_in_urls_are_named_without_secrets(s3, tmp_path):
    url = s3["url"]
    images = [{"id": 1, "file_name": "nope.jpg", "width": 10, "height": 10}]
    s3["fs"].pipe_file(f"{BUCKET}/bad/a.json", json.dumps({"images": images, "annotations": [],
                       "categories": [{"id": 1, "name": "x"}]}).encode())  # fmt: skip
    index = CocoIndex(f"s3://{BUCKET}/bad/a.json", images_root=f"{url}/train")
    assert index.files["missing"] == [(0, f"{url}/train/nope.jpg")]
    with pytest.raises(DatasetError, match=f"annotation file not found: s3://{BUCKET}/nothing.json"):
        CocoIndex(f"s3://{BUCKET}/nothing.json")
    with pytest.raises(DatasetError) as err:
        CocoIndex(f"s3://AKIDTESTONLY:{SECRET}@{BUCKET}/tiny/train.json")
    assert "credentials in the URL are not accepted" in str(err.value) and SECRET not in str(err.value)
    assert storage.redact(f"https://h/x.jpg?X-Amz-Signature={SECRET}") == "https://h/x.jpg"
    with pytest.raises(DatasetError, match="image root"):
        CocoIndex(write_coco(tmp_path / "a.json", images, [], [{"id": 1, "name": "x"}]),
                  images_root=f"https://h/x?X-Amz-Credential={SECRET}")  # fmt: skip


def test_header_scan_over_s3_lists_once_and_reads_headers_with_bounded_concurrency(s3, monkeypatch):
    import threading
    import time

    from detector.core import images

    fs = s3["fs"]
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{BUCKET}/tiny/train"))
    calls = {"find": 0, "isfile": 0, "now": 0, "peak": 0}
    lock = threading.Lock()
    real_find, real_header = type(fs).find, images.header_info

    def find(self, *a, **k):
        calls["find"] += 1
        return real_find(self, *a, **k)

    def header(path, max_pixels=None):
        with lock:
            calls["now"] += 1
            calls["peak"] = max(calls["peak"], calls["now"])
        time.sleep(0.02)  # a slow round trip: the pool fills up
        try:
            return real_header(path, max_pixels)
        finally:
            with lock:
                calls["now"] -= 1

    monkeypatch.setattr(type(fs), "find", find)
    monkeypatch.setattr(images, "header_info", header)
    seen = []
    found = images.scan_images(f"{s3['url']}/train", [*names, "gone.jpg"], None, threads=32,
                               progress=lambda it, total: (seen.append(total), it)[1])  # fmt: skip
    assert found["missing"] == [(len(names), f"{s3['url']}/train/gone.jpg")] and not found["unreadable"]
    assert calls["find"] == 1  # one listing of the prefix, not a request per file
    assert 1 < calls["peak"] <= storage.MAX_REMOTE_THREADS  # concurrent, and bounded even when asked for 32
    assert seen == [len(names)]  # the progress bar saw every header read


def _assert_no_keys(where: str, *texts: str | bytes, folder: Path | None = None) -> int:
    """Neither the secret nor the key id in any text, nor in any file under ``folder`` (read as
    bytes: checkpoints, plots and logs alike, at any depth). Returns how many files were read."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder is not None else []
    for name, blob in [*((f"{where} output {k}", t) for k, t in enumerate(texts)),
                       *((str(p), p.read_bytes()) for p in files)]:  # fmt: skip
        data = blob if isinstance(blob, bytes) else blob.encode("utf-8", "replace")
        for key in (SECRET, "AKIDTESTONLY"):
            assert key.encode() not in data, f"{key} in {name}"
    return len(files)


def test_the_secret_scan_finds_a_key_in_any_output(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"\x00" + SECRET.encode())
    with pytest.raises(AssertionError, match="x.bin"):
        _assert_no_keys("t", "ok", folder=tmp_path)
    with pytest.raises(AssertionError, match="t output 1"):
        _assert_no_keys("t", "ok", "stderr: AKIDTESTONLY")


@pytest.mark.slow
def test_two_process_training_from_s3_matches_the_local_folder(s3, two_process_run, tiny_dataset, tmp_path, capsys):
    """1 epoch, 2 processes: the same losses and COCO metrics from S3 as from the local folder
    (the losses are computed from the pixels read, so a wrong image or box would show). The
    local run is the session's shared 2-process run (TWO_PROCESS_RUN: plots on, which are drawn
    after the epoch's numbers)."""
    url = s3["url"]
    remote = {"train": f"{url}/train.json", "val": f"{url}/val.json", "root": url}
    # S3 read inside a DataLoader worker per process; the local run in the main process (the
    # items are a pure function of the index and seed, so this cannot change the metrics)
    assert "data.num_workers=0" in TWO_PROCESS_RUN
    args = ["--config", str(TINY), f"output_dir={tmp_path / 's3'}", *data_overrides(_Remote(remote)),
            *(o for o in TWO_PROCESS_RUN if not o.startswith("data.num_workers=")), "logging.plots=false",
            "data.num_workers=1"]  # fmt: skip
    res = launch("train.py", args, nproc=2, env=s3["env"], warm=True)  # stdout and stderr both scanned below
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out_local = two_process_run["stdout"]
    got, want = epoch_records(tmp_path / "s3")[-1], epoch_records(two_process_run["run"])[-1]
    keys = [k for k in want if k.startswith(("train/loss", "val/")) and isinstance(want[k], float)]
    assert "val/mAP" in keys and "train/loss" in keys
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert "s3://" in (tmp_path / "s3" / "config.yaml").read_text()  # the URL is recorded...
    assert _assert_no_keys("train.py", res.stdout, res.stderr, folder=tmp_path / "s3") >= 3  # ...the keys never
    assert out_local

    # evaluate.py and infer.py read their inputs from the same URLs (in this process, where the
    # server's environment is set; a DataLoader worker reads the images for evaluate): the scores
    # of last.pt are the ones training logged for it, the detections those on the local folder
    out = tmp_path / "eval_s3.json"
    args = ["--checkpoint", tmp_path / "s3" / "last.pt", "--annotations", f"{url}/val.json", "--images", f"{url}/val",
            "--batch-size", "2", "--num-workers", "1", "--output", out]  # fmt: skip
    capsys.readouterr()
    assert run_tool_in_process("evaluate.py", *args) == 0
    _assert_no_keys("evaluate.py", *capsys.readouterr(), out.read_text())
    scored = json.loads(out.read_text())
    common = [k for k in scored if f"val/{k}" in want]
    assert "mAP" in common and "loss" in common
    # (losses to float rounding: this process runs torch with more threads than the launched ones)
    assert {k: scored[k] for k in common} == pytest.approx({k: want[f"val/{k}"] for k in common}, rel=1e-6)
    found = {}
    for where, inputs in (("s3", f"{url}/val"), ("local", tiny_dataset["root"] / "val")):
        args = ["--checkpoint", tmp_path / "s3" / "last.pt", "--score-threshold", "0.0", "--batch-size", "8",
                "--no-draw", "--output", tmp_path / f"infer_{where}", inputs]  # fmt: skip
        assert run_tool_in_process("infer.py", *args) == 0
        assert _assert_no_keys("infer.py", *capsys.readouterr(), folder=tmp_path / f"infer_{where}") >= 2
        images = json.loads((tmp_path / f"infer_{where}" / "images.json").read_text())["images"]
        results = json.loads((tmp_path / f"infer_{where}" / "results.json").read_text())
        found[where] = ([Path(str(im["file_name"])).name for im in images], results)
    assert found["s3"] == found["local"] and len(found["s3"][0]) == 7 and found["s3"][1]


class _Remote(dict):
    """data_overrides() joins root / 'train': for a URL root that must stay a string join."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return _Url(value) if key == "root" else value


class _Url(str):
    def __truediv__(self, other: str) -> str:
        return f"{self}/{other}"


def test_config_refuses_credentials_in_urls_before_anything_is_written():
    from detector import config

    urls = [f"data.train.annotations=s3://{BUCKET}/t.json", f"data.val.annotations=s3://{BUCKET}/v.json",
            f"data.train.images=s3://AKIDTESTONLY:{SECRET}@{BUCKET}/img", f"data.val.images=s3://{BUCKET}/img"]  # fmt: skip
    with pytest.raises(config.ConfigError) as err:
        config.load(TINY, urls)
    assert str(err.value).startswith(f"data.train.images: s3://{BUCKET}/img: credentials in the URL are not accepted")
    assert SECRET not in str(err.value) and "AKIDTESTONLY" not in str(err.value)
    config.load(TINY, [u.replace(f"AKIDTESTONLY:{SECRET}@", "") for u in urls])  # without them: accepted


def test_http_image_root_without_listing(tiny_dataset):
    """Another fsspec backend: a plain web server (which cannot list a folder) on 127.0.0.1."""
    with http_server(tiny_dataset["root"]) as url:
        remote = CocoIndex(f"{url}/val.json", images_root=f"{url}/val")
        local = CocoIndex(tiny_dataset["val"], images_root=tiny_dataset["root"] / "val")
        assert not any(remote.files[k] for k in ("missing", "unreadable", "size_mismatch"))
        np.testing.assert_array_equal(remote.boxes, local.boxes)
        a, _, _ = load_image(f"{url}/val/{local.file_name(0)}")
        b, _, _ = load_image(tiny_dataset["root"] / "val" / local.file_name(0))
        np.testing.assert_array_equal(a, b)
        assert storage.existing(f"{url}/val", [local.file_name(0), "gone.jpg"]) == [True, False]


@pytest.mark.parametrize(
    "url",
    [
        f"https://acct.blob.core.windows.net/data/val.json?sv=2022-11-02&sp=r&sig={SECRET}",  # Azure SAS
        f"https://h/val.json?client_secret={SECRET}",
        f"https://h/val.json?password={SECRET}",
    ],
)
def test_check_url_refuses_other_signed_urls(url):
    """Not only S3/GCS's Signature/Credential parameters: an Azure SAS URL signs with 'sig', and
    a secret or password in the query is one too; each would be saved into config.yaml."""
    with pytest.raises(storage.StorageError, match="credentials in the URL are not accepted") as err:
        storage.check_url(url, "data.val.annotations")
    assert SECRET not in str(err.value)
    storage.check_url("https://h/val.json?versionId=3", "data.val.annotations")  # an ordinary query: accepted


AZURE = "abfs://images@myaccount.dfs.core.windows.net/data/val.json"  # the standard adlfs form


@pytest.mark.parametrize("scheme", ["abfs", "abfss", "az", "wasb", "wasbs"])
def test_azure_container_at_account_is_a_name_not_a_credential(scheme, tmp_path):
    url = AZURE.replace("abfs", scheme, 1)
    storage.check_url(url, "data.val.annotations")  # accepted
    assert storage.redact(url) == url  # the container is kept in messages
    assert storage.redact(url + f"?sig={SECRET}") == url
    with pytest.raises(DatasetError) as err:  # any failure names the URL with its container
        CocoIndex(url)
    assert f"{scheme}://images@myaccount.dfs.core.windows.net/data/val.json" in str(err.value)
    secret = url.replace("images@", f"images:{SECRET}@")  # user:password@ stays refused, never shown
    with pytest.raises(storage.StorageError, match="credentials in the URL are not accepted") as err:
        storage.check_url(secret, "data.val.annotations")
    assert SECRET not in str(err.value) and storage.redact(secret) == url.replace("images@", "")
    assert SECRET not in storage._clean(OSError(f"cannot open {secret}"), secret)
    for other in (f"s3://{SECRET}@bucket/x.json", f"https://{SECRET}@host/x.json"):  # a token as user name
        with pytest.raises(storage.StorageError) as err:
            storage.check_url(other, "data.val.annotations")
        assert SECRET not in str(err.value)


def test_config_accepts_an_azure_container_url():
    from detector import config

    cfg = config.load(TINY, [f"data.{s}.{k}={AZURE}" for s in ("train", "val") for k in ("annotations", "images")])
    assert cfg.data.train.images == AZURE


def test_check_dataset_decode_reads_a_url_root(tiny_dataset, capsys):
    """tools/check_dataset.py --decode on an image root in object storage (memory:// here) decodes
    the objects, rather than looking for files under a 'memory:/...' folder."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = Path(tiny_dataset["root"])
    for f in sorted((root / "val").iterdir()):
        fs.pipe_file(f"/rev14-check/val/{f.name}", f.read_bytes())
    fs.pipe_file("/rev14-check/val.json", Path(tiny_dataset["val"]).read_bytes())
    try:
        code = run_tool_in_process("check_dataset.py", "memory://rev14-check/val.json", "memory://rev14-check/val",
                                   "--decode", "--workers", "1")  # fmt: skip
    finally:
        fs.rm("/rev14-check", recursive=True)
    out = capsys.readouterr().out
    assert "undecodable" not in out and "decoded 7 of 7 image(s) in full" in out, out[-2000:]
    assert code == 0


def test_a_backends_message_that_echoes_the_password_alone_is_redacted():
    from detector.core.storage import _clean

    url = "s3://user:p%40ss@bucket/images"
    for echoed in ("p%40ss", "p@ss", "user:p%40ss"):
        text = _clean(ValueError(f"bad credential {echoed} for bucket"), url)
        assert "p@ss" not in text and "p%40ss" not in text and "***" in text, text
