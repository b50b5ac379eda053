"""The reference documentation's own examples (../shared/reference: the Azure ML SDK v1 TensorFlow /
Estimator how-tos), with only the import changed to tflaunch and the compute target set to this machine
or two ssh hosts: each call works with the reference's meaning, or, for what tflaunch cannot do (containers),
is a one-line SpecError saying what to use instead, never a TypeError."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import REPO, pids_with_token
from tflaunch import (Dataset, Estimator, Experiment, MpiConfiguration, SpecError, SSHTarget, TensorFlow,
                      TensorflowConfiguration, Workspace)

TRAIN = """\
import argparse, json, os
from tflaunch import Run
p = argparse.ArgumentParser()
p.add_argument("--data-folder")
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--regularization", type=float, default=0)
args = p.parse_args()
files = sorted(os.listdir(args.data_folder)) if args.data_folder else []
os.makedirs("outputs/model", exist_ok=True)
json.dump({"files": files, "folder": args.data_folder, "batch": args.batch_size,
           "inputs": Run.get_context().input_datasets}, open("outputs/model/summary.json", "w"))
open("outputs/weights.bin", "wb").write(b"w" * 64)
Run.get_context().log("accuracy", 0.5)
"""


@pytest.fixture
def proj(project):
    return project(**{"train.py": TRAIN})


def test_tensorflow_configuration_attributes_set_after_construction_count(proj):
    distributed_training = TensorflowConfiguration()
    distributed_training.worker_count = 2
    est = TensorFlow(source_directory=str(proj), compute_target=SSHTarget(hosts=["h1", "h2"]), script_params={},
                     entry_script="train.py", node_count=2, process_count_per_node=1,
                     distributed_training=distributed_training, use_gpu=True, gpus_per_node=1)
    spec = est.job_spec()
    assert spec.distributed["worker_count"] == 2 and spec.distributed["parameter_server_count"] == 1
    with pytest.raises(SpecError, match=r"worker_count \(--workers\): must be an integer >= 1, got 0"):
        distributed_training.worker_count = 0
    mpi = MpiConfiguration()
    mpi.process_count_per_node = 3
    assert Estimator(str(proj), entry_script="train.py", distributed_training=mpi).job_spec().process_count_per_node == 3


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(custom_docker_image="continuumio/miniconda", conda_packages=["tensorflow", "keras"]),
     "custom_docker_image: tflaunch runs no containers; give the packages as pip_packages"),
    (dict(custom_docker_base_image="mcr.microsoft.com/x"), "custom_docker_base_image: tflaunch runs no containers"),
    (dict(use_docker=True), "use_docker: tflaunch runs no containers"),
    (dict(shm_size="2g"), "shm_size: tflaunch runs no containers"),
    (dict(vm_size="STANDARD_NC6"), "vm_size: tflaunch runs on the machines you give it"),
    (dict(environment_definition=object()), "environment_definition: tflaunch builds the job's environment"),
    (dict(resume_from="x"), "resume_from: pass the checkpoint directory"),
    (dict(conda_dependencies_file="env.yml"), "conda_dependencies_file: give the packages as conda_packages"),
    (dict(no_such_argument=1), "Estimator: unknown argument 'no_such_argument'"),
    (dict(user_managed=True, pip_packages=["keras"]), "user_managed: True uses the interpreter as it is"),
    (dict(pip_packages="keras"), "pip_packages (--pip): must be a list of strings"),
])
def test_what_tflaunch_cannot_honour_is_one_line_spec_error(proj, kwargs, fragment):
    with pytest.raises(SpecError) as info:
        Estimator(source_directory=str(proj), compute_target="local", entry_script="train.py",
                  node_count=2, process_count_per_node=1, distributed_training=MpiConfiguration(), **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    with pytest.raises(SpecError, match="source_directory is the only positional argument"):
        Estimator(str(proj), "train.py")
    assert Estimator(str(proj), entry_script="train.py", _disable_validation=True, use_docker=False)


def test_workspace_from_config_default_datastore_and_dataset_mounts(proj, tmp_path, monkeypatch):
    data = tmp_path / "shared" / "mnist"
    data.mkdir(parents=True)
    for name in ("train-images.gz", "train-labels.gz"):
        (data / name).write_bytes(b"x")
    (tmp_path / "config.json").write_text(json.dumps({"home": "tfl-home", "default_datastore": str(tmp_path / "shared")}))
    monkeypatch.chdir(proj)
    ws = Workspace.from_config()
    exp = Experiment(workspace=ws, name="tf-mnist")
    script_params = {"--data-folder": ws.get_default_datastore().as_mount(), "--batch-size": 50}
    est = TensorFlow(source_directory=".", script_params=script_params, entry_script="train.py",
                     compute_target="local")
    run = exp.submit(est)
    run.wait_for_completion(show_output=False)
    summary = json.loads(Path(run.download_file("outputs/model/summary.json", str(tmp_path / "s.json"))).read_text())
    assert summary["folder"] == str(tmp_path / "shared") and summary["files"] == ["mnist"] and summary["batch"] == 50
    assert run.run_dir.startswith(str(tmp_path / "tfl-home"))

    ds = Dataset.File.from_files(path=str(data))
    script_params = {"--data-folder": ds.as_named_input("mnist").as_mount(), "--regularization": 0.8}
    sk_est = Estimator(source_directory=".", script_params=script_params, compute_target="local",
                       entry_script="train.py")
    run = exp.submit(sk_est)
    run.wait_for_completion()
    summary = json.loads(Path(run.run_dir, "outputs", "model", "summary.json").read_text())
    assert summary["files"] == ["train-images.gz", "train-labels.gz"]
    assert summary["inputs"] == {"mnist": str(data)} and run.input_datasets == {"mnist": str(data)}
    url = run.get_portal_url()
    assert url.startswith("file:///")
    report = Path(unquote(urlparse(url).path))
    assert report == Path(run.run_dir, "report.html") and "accuracy" in report.read_text()
    model = run.register_model(model_name="sklearn-sample", model_path=None)  # the run's whole outputs/
    assert model.version == 1
    downloaded = Path(model.download(str(tmp_path / "model")))
    got = sorted(p.relative_to(downloaded).as_posix() for p in downloaded.rglob("*") if p.is_file())
    assert got == ["model/summary.json", "weights.bin"], got


@pytest.mark.slow
def test_reference_parameter_server_example_on_two_hosts(netns_hosts, home):
    """node_count=2, worker_count=2, parameter_server_count=1 on two hosts of one slot each: node 0 runs
    worker 0, node 1 worker 1 and ps 0 (a ps takes no slot); worker 0 coordinates (no chief, as in the
    reference) and the job trains for real (examples/tf_distributed/train_ps.py, TensorFlow on CPU)."""
    pytest.importorskip("tensorflow")
    compute_target = SSHTarget(hosts=["h1", "h2"], ssh_config=netns_hosts.config)
    tf_est = TensorFlow(source_directory=str(REPO / "examples" / "tf_distributed"),
                        script_params={"--epochs": 2}, compute_target=compute_target, entry_script="train_ps.py",
                        node_count=2, worker_count=2, parameter_server_count=1, distributed_backend="ps",
                        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"})
    run = Experiment("tf-ps", home=str(home)).submit(tf_est)
    details = run.wait_for_completion(raise_on_error=False, timeout=300)
    assert details["status"] == "Completed", (details, run.get_file_names())
    record = Path(run.run_dir)
    placed = {(row["role"], row["index"]): row["host"] for row in json.loads((record / "processes.json").read_text())}
    assert placed == {("worker", 0): "h1", ("worker", 1): "h2", ("ps", 0): "h2"}
    cluster = json.loads((record / "tf_cluster.json").read_text())
    assert sorted(cluster) == ["ps", "worker"] and len(cluster["worker"]) == 2
    metrics = json.loads((record / "outputs" / "metrics.json").read_text())
    assert metrics["loss"][-1] < metrics["loss"][0] and metrics["parameter_servers"] == 1
    assert pids_with_token(run.id) == []


KERAS_TRAIN = """\
import argparse, keras, numpy as np, sys
p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int)
p.add_argument("--learning-rate", type=float)
args = p.parse_args()
model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(2)])
model.compile(optimizer=keras.optimizers.SGD(args.learning_rate), loss="mse")
x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
history = model.fit(x, x[:, :2], batch_size=args.batch_size, epochs=2, verbose=0)
print("keras", keras.__version__, "loss", history.history["loss"][-1], "python", sys.executable)
"""


@pytest.fixture
def one_gpu(monkeypatch):
    """use_gpu=True as the reference's examples say: this machine has no GPU, so one is simulated with
    CUDA_VISIBLE_DEVICES (the only mock here: a GPU cannot exist on this machine or in CI)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")


def test_reference_conda_example_without_conda_says_what_to_use(proj, one_gpu, home, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no conda, mamba or micromamba here
    tf_est = TensorFlow(source_directory=str(proj), script_params={"--batch-size": 50}, compute_target="local",
                        entry_script="train.py", conda_packages=["scikit-learn"], use_gpu=True)
    with pytest.raises(SpecError) as info:
        Experiment("tf", home=str(home)).submit(tf_est)
    assert str(info.value) == ("conda_packages (--conda): building a conda environment needs conda, mamba or "
                               "micromamba on PATH, and none was found; give the packages as pip_packages (--pip) "
                               "instead")
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())  # nothing recorded


@pytest.mark.slow
def test_reference_keras_example_with_pip_packages(project, one_gpu, home, tmp_path):
    """pip_packages=['keras'] (the reference's Keras section): the job's interpreter has Keras already, so
    the environment inherits it and downloads nothing (offline: --no-index with an empty wheelhouse)."""
    pytest.importorskip("keras")
    src = project(**{"keras_train.py": KERAS_TRAIN})
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    script_params = {"--batch-size": 50, "--learning-rate": 0.01}
    keras_est = TensorFlow(source_directory=str(src), script_params=script_params, compute_target="local",
                           entry_script="keras_train.py", pip_packages=["keras"], use_gpu=True,
                           no_index=True, find_links=[str(empty)],
                           environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"})
    run = Experiment("keras", home=str(home)).submit(keras_est)
    details = run.wait_for_completion(raise_on_error=False, timeout=300)
    assert details["status"] == "Completed", details
    assert details["environment"]["built"] and details["environment"]["freeze"] == []  # keras: inherited
    out = Path(run.run_dir, "tflaunch_logs", "rank-0.stdout").read_text()
    assert f"python {details['environment']['python']}" in out and "loss" in out
