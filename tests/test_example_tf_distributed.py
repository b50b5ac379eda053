"""examples/tf_distributed, trained for real through tflaunch with TensorFlow on CPU:
a ParameterServerStrategy job (chief + 2 workers + 1 ps) on this machine, and a
MultiWorkerMirroredStrategy job across two ssh hosts (network namespaces h1, h2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, pids_with_token

EXAMPLE = REPO / "examples" / "tf_distributed"


def _run(home: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = cli_env(home, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(EXAMPLE), *args],
                            env=env, capture_output=True, text=True, errors="replace", timeout=300)
    runs = sorted(p for p in (home / "runs").iterdir() if not p.name.startswith("."))
    show = subprocess.run([sys.executable, "-m", "tflaunch", "runs", "show", runs[-1].name, "--json"], env=env,
                          capture_output=True, text=True, check=True)
    return result, json.loads(show.stdout)


def _logs(record: Path) -> dict[tuple[str, int], str]:
    """(role, index) -> that process's stdout + stderr, from the record."""
    out = {}
    for row in json.loads((record / "processes.json").read_text()):
        text = "".join((record / row[k]).read_text(errors="replace") for k in ("stdout", "stderr"))
        out[(row["role"], row["index"])] = text
    return out


@pytest.mark.slow
def test_parameter_server_example_trains_across_processes(home):
    pytest.importorskip("tensorflow")
    result, run = _run(home, "--backend", "ps", "--workers", "2", "--ps", "1", "--chief", "train_ps.py", "--",
                       "--epochs", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run["status"] == "Completed" and run["exit_code"] == 0
    record = Path(run["run_dir"])
    metrics = json.loads((record / "outputs" / "metrics.json").read_text())
    assert len(metrics["loss"]) == 3 and metrics["loss"][-1] < metrics["loss"][0]
    assert metrics["workers"] == 2 and metrics["parameter_servers"] == 1
    assert (record / "outputs" / "model.keras").stat().st_size > 0
    logs = _logs(record)
    for index in (0, 1):  # the steps ran on each worker: tf.print inside the step prints in its process
        assert f"worker {index} ran steps" in logs[("worker", index)]
    assert "ran steps" not in logs[("chief", 0)] and "ps 0 serving" in logs[("ps", 0)]
    assert "[chief 0] epoch 3 loss" in result.stdout
    assert pids_with_token(run["id"]) == []


@pytest.mark.slow
def test_multiworker_example_trains_across_two_ssh_hosts(netns_hosts, home):
    pytest.importorskip("tensorflow")
    result, run = _run(home, "--backend", "multiworker", "--ssh-config", netns_hosts.config, "--hosts", "h1,h2",
                       "train_mwms.py", "--", "--epochs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run["status"] == "Completed"
    record = Path(run["run_dir"])
    cluster = json.loads((record / "tf_cluster.json").read_text())
    hosts = {h["name"]: h["address"] for h in json.loads((record / "hosts.json").read_text())}
    assert cluster == {"worker": [f"{hosts['h1']}:{p}" for p in _ports(record, "h1")] +
                       [f"{hosts['h2']}:{p}" for p in _ports(record, "h2")]}
    metrics = json.loads((record / "outputs" / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["loss"][-1] < metrics["loss"][0]
    assert (record / "outputs" / "model.keras").stat().st_size > 0
    logs = _logs(record)
    for index in (0, 1):
        assert f"worker {index} epoch 2 loss" in logs[("worker", index)]
    assert "2 worker(s)" in logs[("worker", 1)]
    assert "[worker 1] worker 1 epoch 2 loss" in result.stdout
    assert pids_with_token(run["id"]) == []


def _ports(record: Path, host: str) -> list[int]:
    return [row["port"] for row in json.loads((record / "processes.json").read_text()) if row["host"] == host]
