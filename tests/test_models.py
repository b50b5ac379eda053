"""The model registry: copies with a manifest, lock-free version allocation, crash safety, lookups."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tflaunch import PathSafetyError, SpecError, StoreError, Workspace
from tflaunch._version import __version__
from tflaunch.history.models import Model, ModelNotFoundError, parse_ref, register, register_from_run
from tflaunch.history.store import Store

from conftest import REPO


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_with_models(home: Path):
    """A real run record holding outputs/model.keras and a SavedModel-like tree outputs/model/."""
    record = Store(home).create_run("exp", {"spec": {}})
    out = Path(record.dir) / "outputs"
    (out / "model" / "variables").mkdir(parents=True)
    (out / "model" / "assets").mkdir()  # empty, as Keras writes it
    (out / "model" / "saved_model.pb").write_bytes(b"pb" * 1000)
    (out / "model" / "variables" / "variables.index").write_bytes(b"index")
    (out / "model" / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(50_000))
    (out / "model" / "latest").symlink_to("variables")  # a link inside the tree is kept
    (out / "model.keras").write_bytes(b"keras" * 100)
    return record


def test_register_from_run_copies_files_with_manifest(home, run_with_models, tmp_path):
    record = run_with_models
    out = Path(record.dir) / "outputs"
    tree = register_from_run(record, "mnist", "outputs/model", tags={"stage": "dev"},
                             properties={"accuracy": 0.98, "epochs": 10, "data": "mnist"}, description="cnn")
    single = register_from_run(record, "mnist", "./outputs//model.keras")
    assert (tree.version, single.version) == (1, 2)

    on_disk = json.loads((home / "models" / "mnist" / "1" / "model.json").read_text())
    assert on_disk == tree.to_dict() == Model("mnist", 1, home=home).to_dict()
    assert on_disk["name"] == "mnist" and on_disk["version"] == 1 and on_disk["description"] == "cnn"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", on_disk["created"])
    assert on_disk["tags"] == {"stage": "dev"} and on_disk["properties"]["accuracy"] == 0.98
    assert on_disk["source_run"] == {"id": record.id, "experiment": "exp", "path": "outputs/model"}
    assert on_disk["tflaunch_version"] == __version__ and on_disk["type"] == "directory"
    assert [f["path"] for f in on_disk["files"]] == [
        "model/saved_model.pb", "model/variables/variables.data-00000-of-00001", "model/variables/variables.index"]
    for entry in on_disk["files"]:
        source = out / entry["path"]
        assert entry["sha256"] == sha256(source) and entry["size"] == source.stat().st_size
    assert on_disk["links"] == [{"path": "model/latest", "target": "variables"}]
    assert on_disk["size"] == sum(f["size"] for f in on_disk["files"])
    assert single.to_dict()["source_run"]["path"] == "outputs/model.keras"
    assert single.files == [{"path": "model.keras", "size": 500, "sha256": sha256(out / "model.keras")}]

    files = Path(tree.path)
    assert files == home / "models" / "mnist" / "1" / "files" and (files / "model" / "assets").is_dir()
    assert os.readlink(files / "model" / "latest") == "variables"
    # Same filesystem: hard links (no extra space), yet no pointer back into the run.
    assert (files / "model" / "saved_model.pb").stat().st_ino == (out / "model" / "saved_model.pb").stat().st_ino
    shutil.rmtree(record.dir)
    tree.verify()
    single.verify()

    got = tree.download(tmp_path / "dl")
    assert got == str(tmp_path / "dl" / "model")
    assert (tmp_path / "dl" / "model" / "variables" / "variables.index").read_bytes() == b"index"
    assert (tmp_path / "dl" / "model" / "assets").is_dir() and os.readlink(tmp_path / "dl" / "model" / "latest")
    with pytest.raises(StoreError, match="exists"):
        tree.download(tmp_path / "dl")
    (tmp_path / "dl" / "model" / "saved_model.pb").write_bytes(b"changed")
    (tmp_path / "dl" / "model" / "stale").write_bytes(b"from another version")
    tree.download(tmp_path / "dl", exist_ok=True)
    assert not (tmp_path / "dl" / "model" / "stale").exists()
    assert (tmp_path / "dl" / "model" / "saved_model.pb").read_bytes() == b"pb" * 1000
    assert single.download(tmp_path / "dl") == str(tmp_path / "dl" / "model.keras")
    assert (tmp_path / "dl" / "model.keras").read_bytes() == b"keras" * 100
    # Downloads are copies: editing one never touches the registry.
    assert (tmp_path / "dl" / "model.keras").stat().st_ino != (Path(single.path) / "model.keras").stat().st_ino


def test_lookup_list_and_filters(home, run_with_models, monkeypatch):
    record = run_with_models
    ws = Workspace(home)
    register_from_run(record, "zeta", "outputs/model.keras", tags={"stage": "dev"})
    for stage in ("dev", "prod", "dev"):
        register_from_run(record, "alpha", "outputs/model.keras", tags={"stage": stage, "team": "x"})

    assert [(m.name, m.version) for m in Model.list(home)] == [("alpha", 1), ("alpha", 2), ("alpha", 3), ("zeta", 1)]
    assert [m.id for m in Model.list(ws, latest=True)] == ["alpha:3", "zeta:1"]
    assert [m.id for m in Model.list(ws, name="alpha", tags=[["stage", "prod"]])] == ["alpha:2"]
    assert [m.id for m in Model.list(ws, tags=["team"])] == ["alpha:1", "alpha:2", "alpha:3"]
    assert [m.id for m in Model.list(ws, tags=[["stage", "dev"]], latest=True)] == ["alpha:3", "zeta:1"]
    assert Model.list(ws, name="nothing") == [] and Model.list(str(home / "fresh")) == []

    latest = Model(ws, "alpha")
    assert (latest.version, latest.run_id, latest.experiment) == (3, record.id, "exp")
    assert Model(ws, "alpha", version=2).tags["stage"] == "prod"
    assert Model("alpha", 1, home=home) == Model(name="alpha", version="1", workspace=ws) == Model(ws, id="alpha:1")
    monkeypatch.setenv("TFLAUNCH_HOME", str(home))
    assert Model("zeta").version == 1 and Model.get_model_path("alpha", 2).endswith("alpha/2/files/model.keras")

    with pytest.raises(ModelNotFoundError, match="no model 'nope'") as err:
        Model("nope", home=home)
    assert err.value.exit_code == 2 and isinstance(err.value, (StoreError, LookupError))
    with pytest.raises(ModelNotFoundError, match=r"no version 9 \(the latest is 3;"):
        Model(ws, "alpha", 9)
    assert parse_ref("alpha") == ("alpha", None) and parse_ref("alpha:12") == ("alpha", 12)
    assert parse_ref("alpha:latest") == ("alpha", None)
    for bad in ("", "alpha:", "alpha:0", "alpha:x", ":3", "a/b:1", "alpha:1:2"):
        with pytest.raises(SpecError):
            parse_ref(bad)

    (home / "models" / "alpha" / "4").mkdir()  # unreadable metadata: skipped by readers, never reused
    (home / "models" / "alpha" / "4" / "model.json").write_text("{")
    assert Model(ws, "alpha").version == 3 and len(Model.list(ws, "alpha")) == 3
    assert register_from_run(record, "alpha", "outputs/model.keras").version == 5


def test_refuses_bad_input_and_escapes(home, run_with_models, tmp_path):
    record = run_with_models
    out = Path(record.dir) / "outputs"
    for name in ("", "-x", "a/b", "a b", "x" * 256, "..", "a:b", ".new-x"):
        with pytest.raises(SpecError, match="model name .* letters, digits"):
            register_from_run(record, name, "outputs/model.keras")
    with pytest.raises(SpecError, match="tag 'epochs'"):
        register_from_run(record, "m", "outputs/model.keras", tags={"epochs": 10})
    with pytest.raises(SpecError, match="property 'p'"):
        register_from_run(record, "m", "outputs/model.keras", properties={"p": [1]})
    for path in ("../../../etc/passwd", "/etc/passwd", "outputs/../../x", "", "."):
        with pytest.raises(PathSafetyError):
            register_from_run(record, "m", path)
    (out / "etc").symlink_to("/etc")
    with pytest.raises(PathSafetyError, match="outside run"):
        register_from_run(record, "m", "outputs/etc")
    with pytest.raises(PathSafetyError, match=f"`tflaunch runs files {record.id}`"):
        register_from_run(record, "m", "outputs/missing.keras")

    # Links inside a registered tree must stay inside it (relative); anything else is refused, not followed.
    for target in ("../../run.json", "/etc/passwd", str(out / "model" / "saved_model.pb")):
        link = out / "model" / "variables" / "bad"
        link.symlink_to(target)
        with pytest.raises(SpecError, match="model/variables/bad is a symbolic link"):
            register_from_run(record, "m", "outputs/model")
        link.unlink()
    assert Model.list(home) == [] and not os.listdir(home / "models" / "m")  # nothing half-done stays
    with pytest.raises(SpecError, match="contains the model registry"):
        register(home, "m", home.parent)


def test_copy_across_filesystems_and_verify(home):
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(home.parent).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's home")
    src = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        (src / "model" / "sub").mkdir(parents=True)
        weights = os.urandom(3_000_000)
        (src / "model" / "sub" / "w.bin").write_bytes(weights)
        (src / "model" / "a.txt").write_text("a")
        model = register(Workspace(home), "copied", src / "model", source_run=None)
        assert model.to_dict()["source_run"] is None and model.size == 3_000_001
        stored = Path(model.path) / "model" / "sub" / "w.bin"
        assert stored.read_bytes() == weights
        assert stored.stat().st_ino != (src / "model" / "sub" / "w.bin").stat().st_ino  # a copy, not a link
        (src / "model" / "sub" / "w.bin").write_bytes(b"source changed afterwards")
    finally:
        shutil.rmtree(src)
    model.verify()
    with open(stored, "r+b") as fh:
        fh.write(b"X")
    with pytest.raises(StoreError, match="model/sub/w.bin does not match its SHA-256"):
        Model("copied", home=home).verify()
    stored.write_bytes(weights)
    model.verify()
    (Path(model.path) / "model" / "extra").write_text("x")
    with pytest.raises(StoreError, match="model/extra is not in model.json"):
        model.verify()


CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from tflaunch.history.models import register
home, name, source, go = sys.argv[1:5]
while go != "-" and not os.path.exists(go):
    time.sleep(0.001)
print(register(home, name, source, tags={{"pid": str(os.getpid())}}).version)
"""


def _child(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO)), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_twenty_concurrent_registrations_get_distinct_versions(home, tmp_path):
    Store(home).ensure()
    go = tmp_path / "go"
    sources = []
    for i in range(20):
        (tmp_path / f"src{i}").mkdir()
        sources.append(tmp_path / f"src{i}" / "model.keras")
        sources[-1].write_bytes(f"model from process {i}\n".encode() * (i + 1))
    procs = [_child(home, "shared", src, go) for src in sources]
    time.sleep(0.3)
    go.touch()
    versions = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        versions.append(int(stdout))
    assert sorted(versions) == list(range(1, 21))
    models = Model.list(home, "shared")
    assert [m.version for m in models] == list(range(1, 21))
    for model in models:
        model.verify()
    assert sorted(m.files[0]["sha256"] for m in models) == sorted(sha256(s) for s in sources)  # none overwritten
    assert os.listdir(home / "models") == ["shared"] and sorted(os.listdir(home / "models" / "shared")) == \
        sorted(str(v) for v in range(1, 21))


def _wait_for(found, proc: subprocess.Popen, timeout: float = 30):
    """Poll ``found()`` until it returns something true (returned) or ``proc`` ended (None)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        result = found()
        if result:
            return result
    return None


@pytest.mark.slow
def test_sigkill_while_registering_leaves_nothing_half_done(home, tmp_path):
    tree = tmp_path / "big" / "model"
    for d in range(20):
        (tree / f"d{d:02d}").mkdir(parents=True)
        for f in range(100):
            (tree / f"d{d:02d}" / f"f{f:03d}").write_bytes(os.urandom(512))
    (tree / "zz_weights.bin").write_bytes(os.urandom(64 << 20))
    Store(home).ensure()
    name_dir = home / "models" / "big"
    name_dir.mkdir(parents=True)
    # Kill points: as staging starts, mid-way through the tree, while hashing the large file, at the end.
    markers = ["", "files/model/d08", "files/model/zz_weights.bin", "model.json"]
    interrupted = 0
    for marker in markers:
        before = set(glob.glob(str(name_dir / ".new-*")))
        proc = _child(home, "big", tree, "-")
        new = _wait_for(lambda: sorted(set(glob.glob(str(name_dir / ".new-*"))) - before), proc)
        if new:
            _wait_for(lambda: os.path.exists(os.path.join(new[0], marker)), proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        interrupted += len(set(glob.glob(str(name_dir / ".new-*"))) - before)
        for model in Model.list(home, "big"):  # a version that appeared is whole
            model.verify()
        assert all((d / "model.json").is_file() for d in name_dir.iterdir() if not d.name.startswith("."))
    assert interrupted >= 2, "the registrations finished before they could be killed"

    complete = len(Model.list(home, "big"))
    leftovers = glob.glob(str(name_dir / ".new-*"))
    old = time.time() - 7200
    for path in leftovers:
        os.utime(path, (old, old))
    (name_dir / ".new-recent").mkdir()  # a registration in progress elsewhere: left alone
    small = tmp_path / "small.keras"
    small.write_bytes(b"small")
    model = register(home, "big", small)
    assert model.version == complete + 1 and Model("big", home=home).files[0]["path"] == "small.keras"
    assert sorted(p.name for p in name_dir.glob(".new-*")) == [".new-recent"]


@pytest.mark.slow
def test_list_over_a_thousand_versions(home, tmp_path):  # its speed: bench/scale_checks.py
    src = tmp_path / "model.keras"
    src.write_bytes(b"m")
    for i in range(1000):
        register(home, f"m{i % 4}", src, tags={"i": str(i)})
    models = Model.list(home)
    assert len(models) == 1000 and [m.version for m in models[:3]] == [1, 2, 3] and models[-1].id == "m3:250"
