"""Data references (tflaunch.data): datastores and file datasets, their modes, placeholders, the copy a
host makes of a download and the tar the launcher streams (the same layout), and what the record keeps."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

from tflaunch import Estimator, SpecError, Workspace
from tflaunch.data import (COPY_PROGRAM, Dataset, Datastore, add_input, check_placeholders, describe_inputs,
                           download_dest, host_paths, input_datasets, parse_cli, substitute, write_tar)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "mnist"
    (root / "sub").mkdir(parents=True)
    (root / "train.gz").write_bytes(b"\x1f\x8b images")
    (root / "sub" / "labels.gz").write_bytes(b"labels")
    return root


def _inputs(est):
    return est.job_spec().inputs


def test_datastore_mount_and_dataset_download_become_host_paths(tree, tmp_path):
    store = Datastore(tmp_path, name="shared")
    ds = Dataset.File.from_files(path=str(tree))
    est = Estimator(str(tmp_path), entry_script="t.py", script_params={
        "--data-folder": ds.as_named_input("mnist").as_download(),
        "--store": store.path("mnist").as_mount(),
        "--root": store.as_mount(), "--batch-size": 50})
    spec = est.job_spec()
    assert spec.arguments == ["--data-folder", "{data:mnist}", "--store", "{data:shared_mnist}", "--root",
                              "{data:shared}", "--batch-size", "50"]
    names = {i["name"]: i for i in spec.inputs}
    assert names["mnist"]["mode"] == "download" and names["mnist"]["paths"] == [str(tree)]
    assert names["shared_mnist"]["paths"] == [str(tmp_path / "mnist")] and names["shared"]["mode"] == "mount"
    paths = host_paths(spec.inputs, {"mnist": "/scratch/x/mnist"})
    assert paths["mnist"] == "/scratch/x/mnist"
    assert substitute(["--d={data:mnist}", "{data:mnist}/train.gz"], paths) == [
        "--d=/scratch/x/mnist", "/scratch/x/mnist/train.gz"]


def test_the_same_name_twice_must_be_the_same_input(tree, tmp_path):
    ds = Dataset.File.from_files(path=str(tree))
    inputs = []
    assert add_input(ds.as_named_input("m").as_mount(), inputs, "a") == "{data:m}"
    assert add_input(ds.as_named_input("m").as_mount(), inputs, "b") == "{data:m}"
    assert len(inputs) == 1
    with pytest.raises(SpecError, match="input 'm' is already given with another path or mode"):
        add_input(ds.as_named_input("m").as_download(), inputs, "c")


@pytest.mark.parametrize("make, fragment", [
    (lambda t: Dataset.File.from_files(path=str(t / "nope")), "does not exist on this machine (validate=False"),
    (lambda t: Dataset.File.from_files(path=str(t)).as_named_input("a b"), "'a b' is not a valid input name"),
    (lambda t: Dataset.File.from_files(path=str(t)).as_named_input("a").as_mount(path_on_compute="/x"),
     "a mount is used where it is"),
    (lambda t: Datastore(t).path("../etc"), "leads outside it"),
    (lambda t: Datastore(t).path("/etc"), "give a path inside the datastore"),
    (lambda t: Dataset.Tabular.from_delimited_files("x.csv"), "Dataset.Tabular: not supported"),
    (lambda t: Estimator(str(t), entry_script="t.py", script_params={
        "--d": Dataset.File.from_files([str(t), str(t / "sub")]).as_mount()}).job_spec(),
     "cannot be mounted in place; use as_download()"),
])
def test_bad_data_references_are_one_line_spec_errors(tree, make, fragment):
    with pytest.raises(SpecError) as info:
        make(tree)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_data_values_and_placeholders(tree):
    inputs = parse_cli([f"mnist={tree}:download", f"raw={tree}", f"colon={tree}:mount"])
    assert [(i["name"], i["mode"]) for i in inputs] == [("mnist", "download"), ("raw", "mount"), ("colon", "mount")]
    check_placeholders(["--d", "{data:mnist}"], inputs)
    with pytest.raises(SpecError, match=r"\{data:other\} in the script's arguments: no input 'other'"):
        check_placeholders(["{data:other}"], inputs)
    for bad in ("mnist", "=x", "m="):
        with pytest.raises(SpecError, match="--data"):
            parse_cli([bad])


def test_placeholder_without_input_is_refused_at_job_spec(tmp_path):
    with pytest.raises(SpecError, match="no input 'x'"):
        Estimator(str(tmp_path), entry_script="t.py", arguments=["{data:x}"]).job_spec()


def test_host_copy_and_streamed_tar_have_the_same_layout(tree, tmp_path):
    """The copy a host that sees the data makes (COPY_PROGRAM) and what a host that does not gets (the tar
    the launcher streams) are the same tree, for one directory, a file, and several paths."""
    single = tree / "train.gz"
    for paths in ([str(tree)], [str(single)], [str(tree), str(single)]):
        item = {"name": "d", "paths": paths, "mode": "download"}
        copied = tmp_path / f"copy-{len(paths)}-{os.path.basename(paths[0])}"
        subprocess.run([sys.executable, "-I", "-S", "-c", COPY_PROGRAM, *paths, str(copied)], check=True)
        tar_path = tmp_path / "d.tar"
        write_tar(item, str(tar_path))
        unpacked = tmp_path / f"tar-{len(paths)}-{os.path.basename(paths[0])}"
        with tarfile.open(tar_path) as tar:
            tar.extractall(unpacked)
        def files(root):
            return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
        assert files(copied) == files(unpacked) and files(copied)
        assert not (copied.parent / (copied.name + ".partial")).exists()


def test_describe_inputs_counts_and_fingerprints_downloads(tree):
    mount = {"name": "m", "paths": [str(tree)], "mode": "mount"}
    down = {"name": "d", "paths": [str(tree)], "mode": "download"}
    rows = describe_inputs([mount, down])
    assert rows[0] == {"name": "m", "path": str(tree), "mode": "mount", "files": 2, "bytes": 15}
    assert rows[1]["files"] == 2 and len(rows[1]["sha256"]) == 64
    (tree / "train.gz").write_bytes(b"\x1f\x8b IMAGES")  # same size, other content
    assert describe_inputs([down])[0]["sha256"] != rows[1]["sha256"]
    missing = describe_inputs([{"name": "x", "paths": ["/nonexistent/x"], "mode": "mount"}])[0]
    assert missing["files"] is None and missing["bytes"] is None


def test_download_destination(tmp_path):
    item = {"name": "mnist", "paths": ["/d"], "mode": "download", "path_on_compute": None}
    assert download_dest(item, "/tmp/tflaunch-0/run-0", "/work") == "/tmp/tflaunch-0/run-0/data/mnist"
    assert download_dest(dict(item, path_on_compute="data/in"), "/s", "/work") == "/work/data/in"
    assert download_dest(dict(item, path_on_compute="/fast/in"), "/s", "/work") == "/fast/in"


def test_datastore_upload_and_dataset_download(tree, tmp_path):
    store = Workspace(home=tmp_path / "home").get_default_datastore()
    assert store.root == str(tmp_path / "home" / "datastore") and os.path.isdir(store.root)
    ref = store.upload(src_dir=str(tree), target_path="mnist", overwrite=True, show_progress=False)
    assert (tmp_path / "home" / "datastore" / "mnist" / "sub" / "labels.gz").read_bytes() == b"labels"
    assert str(ref) == os.path.join(store.root, "mnist")
    (tree / "train.gz").write_bytes(b"new")
    store.upload(src_dir=str(tree), target_path="mnist", show_progress=False)  # kept: no overwrite
    assert (tmp_path / "home" / "datastore" / "mnist" / "train.gz").read_bytes() != b"new"
    ds = Dataset.File.from_files(path=(store, "mnist"))
    assert ds.to_path() == ["/sub/labels.gz", "/train.gz"]
    written = ds.download(target_path=str(tmp_path / "dl"))
    assert sorted(os.path.relpath(p, tmp_path / "dl") for p in written) == ["sub/labels.gz", "train.gz"]


def test_input_datasets_reads_the_hosts_paths():
    assert input_datasets({"TFLAUNCH_INPUT_DATASETS": '{"mnist": "/x"}'}) == {"mnist": "/x"}
    assert input_datasets({"TFLAUNCH_INPUT_DATASETS": "garbage"}) == {}
    assert input_datasets({}) == {}
