"""examples/mnist: the IDX loader, the data step, and a real training run through tflaunch."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env

EXAMPLE = REPO / "examples" / "mnist"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"mnist_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_idx_loader_reads_the_mnist_format(tmp_path):
    np = pytest.importorskip("numpy")
    train = _load("train")
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    with gzip.open(tmp_path / "i.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, 2, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / "l.gz", "wb") as fh:
        fh.write(struct.pack(">II", 2049, 2) + bytes([7, 3]))
    assert (train.load_idx(str(tmp_path / "i.gz")) == images).all()
    assert list(train.load_idx(str(tmp_path / "l.gz"))) == [7, 3]
    with gzip.open(tmp_path / "bad.gz", "wb") as fh:
        fh.write(struct.pack(">II", 1234, 2))
    with pytest.raises(ValueError, match="not an IDX file"):
        train.load_idx(str(tmp_path / "bad.gz"))
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(struct.pack(">II", 2049, 5) + b"\x01")
    with pytest.raises(ValueError, match="expected 5 values"):
        train.load_idx(str(tmp_path / "short.gz"))


@pytest.mark.slow
def test_example_trains_through_tflaunch(tmp_path, home):
    pytest.importorskip("tensorflow")
    pytest.importorskip("sklearn")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(data)], check=True,
                   capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "tflaunch", "run", "-e", "tf-mnist", "--framework-version", "2",
         "--source-dir", str(EXAMPLE), "train.py", "--", "--data-folder", str(data), "--epochs", "4"],
        env=cli_env(home), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(subprocess.run([sys.executable, "-m", "tflaunch", "runs", "list", "--json"], env=cli_env(home),
                                    capture_output=True, text=True, check=True).stdout)[0]
    assert run["status"] == "Completed" and run["experiment"] == "tf-mnist"
    record = home / "runs" / run["id"]
    metrics = json.loads((record / "outputs" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.85, metrics
    assert (record / "outputs" / "model.keras").stat().st_size > 10_000
    assert len((record / "logs" / "training.csv").read_text().splitlines()) == 5    # header + 4 epochs
    assert "test_accuracy=" in (record / "tflaunch_logs" / "rank-0.stdout").read_text()

    # tracking: MetricsCallback's epoch metrics, run.log, tags and properties
    assert run["metrics"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert run["tags"]["dataset"] == "data"
    logged = json.loads(subprocess.run([sys.executable, "-m", "tflaunch", "runs", "metrics", run["id"], "--json"],
                                       env=cli_env(home), capture_output=True, text=True, check=True).stdout)
    by_name = {m["name"]: m for m in logged["metrics"]}
    assert {"accuracy", "loss", "val_accuracy", "val_loss", "test_loss"} <= set(by_name)
    assert by_name["accuracy"]["points"]["step"] == [0, 1, 2, 3]

    # TensorBoard over the run's logs/, under a readable run name
    check_tensorboard(home, run["id"], f"tf-mnist/{run['id'][-8:]}")

    # ONNX: the run's Keras 3 model, checked against TensorFlow with onnxruntime, registered
    pytest.importorskip("tf2onnx")
    tfl = [sys.executable, "-m", "tflaunch"]
    out = subprocess.run([*tfl, "export-onnx", f"{run['id']}:outputs/model.keras", "-o", str(tmp_path / "m.onnx"),
                          "--register", "tf-dnn-mnist-onnx", "--json"], env=cli_env(home), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["max_abs_diff"] < 1e-4 and result["method"] == "saved_model" and result["registered"]["version"] == 1
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert session.get_inputs()[0].shape[-1] == 784
    shown = json.loads(subprocess.run([*tfl, "models", "show", "tf-dnn-mnist-onnx:1", "--json"], env=cli_env(home),
                                      capture_output=True, text=True, check=True).stdout)
    assert shown["properties"]["onnx_max_abs_diff"] == result["max_abs_diff"]
    assert shown["source_run"]["id"] == run["id"] and shown["files"][0]["path"] == "m.onnx"
    bad = subprocess.run([*tfl, "export-onnx", f"{run['id']}:outputs/metrics.json", "-o", str(tmp_path / "x.onnx")],
                         env=cli_env(home), capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a Keras model" in bad.stderr, bad.stderr
    assert not (tmp_path / "x.onnx").exists()


def check_tensorboard(home, run_id: str, name: str) -> None:
    pytest.importorskip("tensorboard")
    import re
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "tensorboard", run_id, "--port", "0"],
                            env=cli_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
            found = re.search(r"http://[^:/\s]+:(\d+)/", line)
            if found:
                port = int(found.group(1))
                break
        else:
            raise AssertionError(f"tensorboard did not start: {seen}")
        assert "port" in locals(), f"tensorboard did not start: {seen}"
        runs = []
        while time.monotonic() < deadline and not runs:
            with urllib.request.urlopen(f"http://localhost:{port}/data/runs", timeout=10) as resp:
                runs = json.loads(resp.read())
            time.sleep(0.5)
        assert f"{name}/tensorboard/train" in runs and f"{name}/tensorboard/validation" in runs, runs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_reference_tutorial_flow_with_the_data_downloaded(tmp_path, home):
    """examples/mnist/submit.py: Workspace.from_config (a config.json in the working directory naming the
    home), Dataset.File.from_files(...).as_named_input('mnist').as_download() as --data-folder, the
    TensorFlow estimator, get_portal_url and register_model, for real."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("sklearn")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(data)], check=True,
                   capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps({"home": str(home)}))
    env = cli_env(tmp_path / "not-this-home")  # config.json decides
    result = subprocess.run([sys.executable, str(EXAMPLE / "submit.py"), "--data", str(data), "--epochs", "2"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered tf-dnn-mnist version 1" in result.stdout and "report: file://" in result.stdout
    run_dir = next((home / "runs").iterdir())
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "Completed"
    (row,) = status["inputs"]
    assert (row["name"], row["mode"], row["files"]) == ("mnist", "download", 4) and len(row["sha256"]) == 64
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    copy = next(e for e in events if e["event"] == "data_downloaded")["hosts"]["localhost"]
    stdout = (run_dir / "tflaunch_logs" / "rank-0.stdout").read_text()
    assert copy != str(data) and not os.path.exists(copy)  # read from the copy, removed afterwards
    assert json.loads((run_dir / "outputs" / "metrics.json").read_text())["test_accuracy"] > 0.5, stdout[-2000:]
    assert (run_dir / "report.html").exists()


@pytest.mark.slow
def test_the_reference_sweep_how_to_tunes_and_registers_the_best(tmp_path, home):
    """examples/mnist/sweep.py: a random sweep of the real training script with a Bandit policy on the
    val_accuracy the Keras callback logs each epoch; the best trial's model registered."""
    pytest.importorskip("tensorflow")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(data)], check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, str(EXAMPLE / "sweep.py"), "--data", str(data), "--trials", "3",
                             "--concurrent", "2", "--epochs", "3"], cwd=tmp_path, env=cli_env(home),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "best trial:" in result.stdout and "registered tf-dnn-mnist-tuned version 1" in result.stdout
    sweep = next(p for p in (home / "runs").iterdir()
                 if json.loads((p / "status.json").read_text()).get("kind") == "sweep")
    state = json.loads((sweep / "sweep.json").read_text())
    assert len(state["trials"]) == 3 and state["summary"]["best"]["value"] > 0.3
    for trial in state["trials"]:
        assert trial["status"] in ("Completed", "Canceled") and trial["intervals"] >= 1
        if trial["status"] == "Canceled":
            assert trial["stopped"]["policy"] == "BanditPolicy"
