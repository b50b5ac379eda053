"""tflaunch.onnx.export for real: Keras 3 (.venv, TensorFlow 2.21) and Keras 2 (.venv-horovod, TensorFlow
2.15) models converted by tf2onnx in a subprocess, checked here again with onnxruntime; bad paths, a
Python without the libraries, a crashing or hanging worker and a failed check leave nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, pids_with_token, wait_no_processes
from tflaunch import onnx
from tflaunch.errors import SpecError, TflaunchError

HOROVOD_PYTHON = REPO / ".venv-horovod" / "bin" / "python"

# Two inputs (float features, int token through an Embedding) and two outputs; a 64-wide tanh layer makes
# TensorFlow and onnxruntime round differently (a difference > 0 for the tolerance test).
BUILD = r"""
import os, sys
import numpy as np
import tensorflow as tf
keras = tf.keras
out = sys.argv[1]
tf.keras.utils.set_random_seed(1)
features = keras.Input(shape=(32,), name="features")
token = keras.Input(shape=(1,), dtype="int32", name="token")
embedded = keras.layers.Flatten()(keras.layers.Embedding(5, 3)(token))
hidden = keras.layers.Dense(64, activation="tanh")(keras.layers.Concatenate()([features, embedded]))
probs = keras.layers.Dense(3, activation="softmax", name="probs")(hidden)
score = keras.layers.Dense(1, name="score")(hidden)
model = keras.Model([features, token], [probs, score])
model.compile("adam", ["sparse_categorical_crossentropy", "mse"])
rng = np.random.default_rng(7)
x = {"features": rng.normal(size=(16, 32)).astype("float32"), "token": rng.integers(0, 5, (16, 1)).astype("int32")}
model.fit([x["features"], x["token"]], [rng.integers(0, 3, 16), rng.normal(size=(16, 1))], epochs=1, verbose=0)
expected = model([x["features"], x["token"]], training=False)
np.savez(os.path.join(out, "sample.npz"), features=x["features"], token=x["token"],
         probs=expected[0].numpy(), score=expected[1].numpy())
keras3 = int(getattr(tf.keras, "__version__", "2").split(".")[0]) >= 3
os.mkdir(os.path.join(out, "file"))
model.save(os.path.join(out, "file", "model.keras" if keras3 else "model.h5"))
if keras3:
    model.export(os.path.join(out, "saved_model"))
else:
    model.save(os.path.join(out, "saved_model"), save_format="tf")
"""


def _build(python: Path | str, directory: Path) -> Path:
    directory.mkdir()
    result = subprocess.run([str(python), "-c", BUILD, str(directory)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def _horovod_python() -> Path:
    if not HOROVOD_PYTHON.exists():
        if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS"):
            pytest.fail(f"{HOROVOD_PYTHON} missing: make test builds it (tests/infra/horovod_env.sh)")
        pytest.skip(f"{HOROVOD_PYTHON} missing: make horovod")
    return HOROVOD_PYTHON


@pytest.fixture(scope="module")
def keras3_models(tmp_path_factory) -> Path:
    return _build(sys.executable, tmp_path_factory.mktemp("onnx") / "keras3")


@pytest.fixture(scope="module")
def keras2_models(tmp_path_factory) -> Path:
    return _build(_horovod_python(), tmp_path_factory.mktemp("onnx") / "keras2")


@pytest.fixture(scope="module")
def keras3_export(keras3_models: Path) -> dict:
    """The Keras 3 model's directory (holding only model.keras) exported once, shared by the tests."""
    return onnx.export(str(keras3_models / "file"), str(keras3_models / "out" / "model.onnx"))


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch) -> Path:
    """tempfile's directory for this test only, to see that export's scratch directory is removed."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def _check_with_onnxruntime(result: dict, models: Path, names: list[str] | None = None) -> None:
    """Run the .onnx file here on the builder's sample; outputs (in order) must match the Keras model's."""
    import hashlib

    import numpy as np
    import onnxruntime

    data = Path(result["output"]).read_bytes()
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    sample = np.load(models / "sample.npz")
    session = onnxruntime.InferenceSession(result["output"], providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == ["features", "token"]
    got = session.run(None, {i.name: sample[i.name] for i in session.get_inputs()})
    if names is not None:
        assert [o.name for o in session.get_outputs()] == names
    assert len(got) == 2
    np.testing.assert_allclose(got[0], sample["probs"], atol=1e-5)
    np.testing.assert_allclose(got[1], sample["score"], atol=1e-5)


def _check_result(result: dict, models: Path, model: Path, method: str, tf_major: str, keras_major: str) -> None:
    assert set(result) == {"output", "model_path", "opset", "max_abs_diff", "tolerance", "method", "inputs",
                           "outputs", "tensorflow", "keras", "tf2onnx", "onnxruntime", "sha256"}
    assert result["model_path"] == str(model)
    assert result["method"] == method
    assert result["tensorflow"].startswith(tf_major) and result["keras"].startswith(keras_major)
    assert result["tf2onnx"] and result["onnxruntime"] and isinstance(result["opset"], int)
    assert 0 <= result["max_abs_diff"] <= result["tolerance"] == 1e-4
    inputs = {i["name"]: i for i in result["inputs"]}
    assert inputs["features"]["shape"] == [None, 32] and inputs["features"]["dtype"] == "float32"
    assert inputs["token"]["shape"] == [None, 1] and inputs["token"]["dtype"] == "int32"
    assert [o["shape"] for o in result["outputs"]] == [[None, 3], [None, 1]]
    _check_with_onnxruntime(result, models, names=["probs", "score"] if method == "from_keras" else None)
    assert os.listdir(Path(result["output"]).parent) == [Path(result["output"]).name]  # no temporary left


@pytest.mark.slow
def test_keras3_model_file_via_saved_model(keras3_models, keras3_export):
    _check_result(keras3_export, keras3_models, keras3_models / "file" / "model.keras", "saved_model", "2.", "3.")
    assert keras3_export["max_abs_diff"] > 0  # what test_failed_check_writes_nothing relies on


@pytest.mark.slow
def test_keras3_saved_model_directory(keras3_models, tmp_path):
    result = onnx.export(str(keras3_models / "saved_model"), str(tmp_path / "m.onnx"), 13)
    assert result["opset"] == 13
    _check_result(result, keras3_models, keras3_models / "saved_model", "saved_model", "2.", "3.")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["file/model.h5", "saved_model"])
def test_keras2_environment(which, keras2_models, tmp_path):
    """TensorFlow 2.15 / Keras 2 in .venv-horovod, which has no tflaunch: .h5 by from_keras, SavedModel."""
    python = _horovod_python()
    result = onnx.export(str(keras2_models / which), str(tmp_path / "new dir" / "m.onnx"), python=str(python))
    method = "from_keras" if which.endswith(".h5") else "saved_model"
    _check_result(result, keras2_models, keras2_models / which, method, "2.15", "2.")


@pytest.mark.slow
def test_failed_check_writes_nothing(keras3_models, keras3_export, tmp_path, private_tmp):
    """A difference above the tolerance fails; the output (even one that existed) and scratch stay as they were."""
    output = tmp_path / "out" / "m.onnx"
    output.parent.mkdir()
    output.write_text("old")
    with pytest.raises(onnx.ExportError, match=r"differs from TensorFlow by .* more than the tolerance"):
        onnx.export(str(keras3_models / "saved_model"), str(output),
                    tolerance=keras3_export["max_abs_diff"] / 2)
    assert os.listdir(output.parent) == ["m.onnx"] and output.read_text() == "old"
    assert os.listdir(private_tmp) == []


@pytest.mark.slow
def test_unloadable_model_is_one_line(tmp_path):
    bad = tmp_path / "model.keras"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("config.json", "{not json")
    with pytest.raises(onnx.ExportError, match=r"^cannot load .*model\.keras with ") as info:
        onnx.export(str(bad), str(tmp_path / "m.onnx"))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]


def test_python_without_tensorflow(tmp_path, private_tmp):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    model = tmp_path / "m.h5"
    model.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(onnx.ExportError, match=r"cannot import numpy, tensorflow, tf2onnx, onnxruntime: "
                                               r"pip install 'tflaunch\[onnx\]' or give --python"):
        onnx.export(str(model), str(tmp_path / "m.onnx"), python=str(tmp_path / "bare" / "bin" / "python"))
    assert sorted(os.listdir(tmp_path)) == ["bare", "m.h5", "scratch"] and os.listdir(private_tmp) == []


def _fake_python(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fakepython"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_worker_crash_and_timeout(tmp_path, private_tmp):
    model = tmp_path / "saved"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"")
    crash = _fake_python(tmp_path, "echo noise >&2; echo 'Fatal Python error: boom' >&2; exit 3")
    with pytest.raises(onnx.ExportError, match=r"exited with status 3 without a result: noise \| Fatal Python "
                                               r"error: boom$"):
        onnx.export(str(model), str(tmp_path / "m.onnx"), python=crash)
    token = f"hanging-worker-{os.urandom(4).hex()}"  # carried by its children (how they are found)
    hang = _fake_python(tmp_path, f"export TFLAUNCH_RUN_ID={token}; sleep 600 </dev/null >/dev/null 2>&1 & sleep 60")
    try:
        with pytest.raises(onnx.ExportError, match=r"took longer than 0.5 s and was stopped"):
            onnx.export(str(model), str(tmp_path / "m.onnx"), python=hang, timeout=0.5)
        # the children in its group are stopped too: the sleep holding its pipes (else export would only
        # return when it ends) and the one in the background (else alive for 600 s)
        wait_no_processes(token, 20)
    finally:
        for pid in pids_with_token(token):
            os.kill(pid, signal.SIGKILL)
    with pytest.raises(onnx.ExportError, match=r"cannot run the interpreter .*nonexistent"):
        onnx.export(str(model), str(tmp_path / "m.onnx"), python=str(tmp_path / "nonexistent"))
    assert sorted(os.listdir(tmp_path)) == ["fakepython", "saved", "scratch"] and os.listdir(private_tmp) == []


def test_model_path_resolution(tmp_path):
    keras_file = tmp_path / "one" / "model.keras"
    keras_file.parent.mkdir()
    with zipfile.ZipFile(keras_file, "w") as z:
        z.writestr("config.json", "{}")
    (tmp_path / "one" / "notes.txt").write_text("x")
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 8)
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    assert onnx.resolve_model(str(keras_file)) == (str(keras_file), "keras")
    assert onnx.resolve_model(str(tmp_path / "one")) == (str(keras_file), "keras")
    assert onnx.resolve_model(str(h5)) == (str(h5), "keras")
    assert onnx.resolve_model(str(saved)) == (str(saved), "saved_model")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.h5").write_bytes(h5.read_bytes())
    os.symlink(saved, tmp_path / "two" / "b")
    with pytest.raises(SpecError, match=r"two holds 2 models \(a.h5, b\): give the one to export"):
        onnx.resolve_model(str(tmp_path / "two"))

    not_a_model = r"is not a Keras model \(.keras/.h5\) or a SavedModel directory$"
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.keras").write_text("not a zip")
    for path in ["one/notes.txt", "empty", "fake.keras"]:
        with pytest.raises(SpecError, match=not_a_model):
            onnx.export(str(tmp_path / path), str(tmp_path / "m.onnx"))
    with pytest.raises(SpecError, match=r"missing does not exist"):
        onnx.export(str(tmp_path / "missing"), str(tmp_path / "m.onnx"))


def test_bad_arguments(tmp_path):
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    for kwargs, pattern in [({"tolerance": -1e-6}, "tolerance"), ({"tolerance": float("nan")}, "tolerance"),
                            ({"opset": 0}, "opset"), ({"opset": "15"}, "opset"), ({"timeout": 0}, "timeout")]:
        with pytest.raises(SpecError, match=pattern):
            onnx.export(str(saved), str(tmp_path / "m.onnx"), **kwargs)
    with pytest.raises(SpecError, match="is a directory"):
        onnx.export(str(saved), str(tmp_path))
    assert issubclass(onnx.ExportError, TflaunchError) and sorted(os.listdir(tmp_path)) == ["sm"]
