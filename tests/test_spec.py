"""Estimator / TensorFlow: script_params to argv, validation that names the field."""
from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from tflaunch import Estimator, MpiConfiguration, SpecError, TensorFlow, TensorflowConfiguration
from tflaunch.spec import JobSpec, script_params_to_argv


def test_script_params_keep_order_bare_flags_lists_and_none():
    params = {"--batch-size": 50, "--learning-rate": 0.01, "--verbose": "", "--skip": None,
              "--layers": [64, 32], "--out": PurePosixPath("outputs/m"), "--flag": True, "pos": "x y"}
    assert script_params_to_argv(params) == [
        "--batch-size", "50", "--learning-rate", "0.01", "--verbose", "--layers", "64", "32",
        "--out", "outputs/m", "--flag", "True", "pos", "x y"]


@pytest.mark.parametrize("params, fragment", [
    ([("--a", 1)], "script_params: must be a dict"),
    ({"--a": {"x": 1}}, "script_params['--a']: unsupported type dict"),
    ({"--a": [1, {2}]}, "unsupported type set"),
    ({"--a": b"bytes"}, "unsupported type bytes"),
    ({1: "x"}, "keys must be non-empty strings"),
])
def test_invalid_script_params_name_the_field(params, fragment):
    with pytest.raises(SpecError, match=None) as info:
        Estimator(".", entry_script="train.py", script_params=params)
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(node_count=0), "node_count (--nodes): must be an integer >= 1"),
    (dict(process_count_per_node="2"), "process_count_per_node (--procs-per-node)"),
    (dict(use_gpu="yes"), "use_gpu (--gpu)"),
    (dict(max_run_duration_seconds=-1), "max_run_duration_seconds (--timeout)"),
    (dict(environment_variables={"TFLAUNCH_RANK": "3"}), "TFLAUNCH_RANK is set by tflaunch"),
    (dict(environment_variables={"A=B": "1"}), "invalid variable name"),
    (dict(environment_variables={"A": None}), "A: value must be a string"),
    (dict(compute_target="gpu-cluster"), "compute_target (--compute-target): 'gpu-cluster' is not supported"),
    (dict(distributed_training=MpiConfiguration(node_count=3), node_count=2),
     "node_count (--nodes): 2 here but 3 in MpiConfiguration: give it once"),
    (dict(distributed_training=TensorflowConfiguration(2, 1), process_count_per_node=2),
     "process_count_per_node (--procs-per-node): does not apply to a parameter-server job"),
    (dict(gpus_per_node=2), "gpus_per_node (--gpus-per-node): only meaningful with use_gpu=True"),
    (dict(use_gpu=True, gpus_per_node=0), "gpus_per_node (--gpus-per-node): must be an integer >= 1"),
    (dict(distributed_training="mpi"), "distributed_training: must be MpiConfiguration()"),
    (dict(entry_script=""), "entry_script"),
])
def test_validation_errors_name_the_field(kwargs, fragment):
    kwargs = {"entry_script": "train.py", **kwargs}
    with pytest.raises(SpecError) as info:
        Estimator("src", **kwargs)
    assert fragment in str(info.value)


def test_single_process_distributed_placeholders_are_accepted():
    Estimator("src", entry_script="t.py", distributed_training=MpiConfiguration())
    Estimator("src", entry_script="t.py", distributed_training=TensorflowConfiguration(1, 0))
    TensorFlow("src", entry_script="t.py", distributed_backend="ps", worker_count=1, parameter_server_count=0)


def test_tensorflow_framework_version_format_and_backend():
    with pytest.raises(SpecError, match="framework_version .*must look like"):
        TensorFlow("src", entry_script="t.py", framework_version="latest")
    with pytest.raises(SpecError, match="distributed_backend: must be 'mpi', 'ps' or 'multiworker'"):
        TensorFlow("src", entry_script="t.py", distributed_backend="nccl")
    est = TensorFlow("src", entry_script="t.py", distributed_backend="ps")  # reference default: 1 worker + 1 ps
    assert est.distributed_training.to_dict()["worker_count"] == 1 and est.job_spec().world_size == 2
    est = TensorFlow("src", entry_script="t.py", distributed_backend="multiworker", process_count_per_node=3)
    assert est.job_spec().world_size == 3 and est.job_spec().distributed["backend"] == "multiworker"
    with pytest.raises(SpecError, match="worker_count/parameter_server_count: a multiworker job"):
        TensorFlow("src", entry_script="t.py", distributed_backend="multiworker", worker_count=2)
    spec = TensorFlow("src", entry_script="t.py", framework_version="2.21").job_spec()
    assert spec.framework == {"name": "tensorflow", "version": "2.21"}


def test_job_spec_round_trips_through_json(tmp_path):
    est = Estimator(tmp_path, entry_script="t.py", script_params={"--x": 1}, arguments=["y"],
                    environment_variables={"A.B": "multi\nline"}, max_run_duration_seconds=5)
    spec = est.job_spec()
    assert spec.source_directory == str(tmp_path) and spec.arguments == ["--x", "1", "y"]
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert spec.world_size == 1


def test_mpi_configuration_counts_and_fields():
    est = Estimator("src", entry_script="t.py", distributed_training=MpiConfiguration(process_count_per_node=4,
                                                                                    node_count=2))
    assert (est.node_count, est.process_count_per_node) == (2, 4)
    for kwargs, message in [(dict(launcher="ssh"), "launcher (--mpi-launcher): must be 'mpirun' or 'srun'"),
                            (dict(srun_mpi="pmix"), "srun_mpi (--srun-mpi): only with launcher='srun'"),
                            (dict(mpi_args="--mca x"), "mpi_args (--mpi-arg): must be a list of strings"),
                            (dict(mpi_iface="eth0; rm"), "mpi_iface (--mpi-iface): must be a network interface")]:
        with pytest.raises(SpecError) as info:
            MpiConfiguration(**kwargs)
        assert message in str(info.value)
