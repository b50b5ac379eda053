"""examples/mnist: the IDX loader, the data step, and a real training run through tflaunch."""
from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import subprocess
import sys

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
