"""Export a trained Keras model or SavedModel to ONNX, verified against TensorFlow.

:func:`export` runs the conversion in a subprocess of a chosen interpreter (default: the one running
tflaunch), so the core stays standard library only and a model can be converted with another
environment's TensorFlow. That interpreter needs TensorFlow, tf2onnx and onnxruntime, not tflaunch: the
worker (``remote/onnx_worker.py``, read with :func:`pkgutil.get_data`, so it works from the zipapp too) runs as a
standalone script and prints one JSON line.

How a model is converted:

* Keras 3 (TensorFlow >= 2.16): ``model.export()`` to a SavedModel, then tf2onnx on its serving signature
  (``tf2onnx.convert.from_keras`` fails on Keras 3 models); ``method`` is ``"saved_model"``;
* Keras 2 (TensorFlow <= 2.15, or ``tf_keras``): ``tf2onnx.convert.from_keras``; ``method`` ``"from_keras"``;
* a SavedModel directory: its ``serving_default`` signature (or its only one); ``method`` ``"saved_model"``.

Every export is verified: TensorFlow and onnxruntime (CPU) run on the same random inputs (unknown
dimensions = 4, fixed seed; floats uniform in [-1, 1), ints in [0, 4)) and the largest absolute difference
over all outputs must be finite and at most ``tolerance``. The .onnx file is written under a temporary
name next to the output and renamed only when the check passed, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pkgutil
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile

from .errors import ExportError, SpecError

__all__ = ["export", "resolve_model", "ExportError", "KERAS_SUFFIXES"]

logger = logging.getLogger(__name__)

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_BATCH = 4
_SEED = 0
_MISSING_HINT = "pip install 'tflaunch[onnx]' or give --python an interpreter with TensorFlow, tf2onnx and onnxruntime"


def _not_a_model(path: str) -> SpecError:
    return SpecError(f"{path} is not a Keras model (.keras/.h5) or a SavedModel directory")


def _keras_file_ok(path: str) -> bool:
    """Whether a file named like a Keras model has the right format (zip for .keras, HDF5 for .h5)."""
    if path.lower().endswith(".keras"):
        return zipfile.is_zipfile(path)
    try:
        with open(path, "rb") as f:
            return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False


def _is_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt"))


def resolve_model(model_path: str) -> tuple[str, str]:
    """(absolute path, ``"keras"`` | ``"saved_model"``) of the model ``model_path`` names: a Keras file, a
    SavedModel directory, or a directory holding exactly one of those. Raises SpecError otherwise."""
    path = os.path.abspath(os.path.expanduser(os.fspath(model_path)))
    if not os.path.exists(path):
        raise SpecError(f"{model_path} does not exist: give a Keras model (.keras/.h5) or a SavedModel directory")
    if os.path.isfile(path):
        if path.lower().endswith(KERAS_SUFFIXES) and _keras_file_ok(path):
            return path, "keras"
        raise _not_a_model(model_path)
    if not os.path.isdir(path):
        raise _not_a_model(model_path)
    if _is_saved_model(path):
        return path, "saved_model"
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise SpecError(f"cannot read {model_path}: {exc.strerror}") from None
    found = []
    for name in names:
        child = os.path.join(path, name)
        if os.path.isfile(child) and name.lower().endswith(KERAS_SUFFIXES) and _keras_file_ok(child):
            found.append((child, "keras"))
        elif os.path.isdir(child) and _is_saved_model(child):
            found.append((child, "saved_model"))
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(os.path.basename(p) for p, _ in found)
        raise SpecError(f"{model_path} holds {len(found)} models ({listed}): give the one to export")
    raise _not_a_model(model_path)


def _check_args(opset: int | None, tolerance: float, timeout: float) -> None:
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise SpecError(f"opset {opset!r} is invalid: give a positive ONNX opset number such as 15, or none "
                        f"for tf2onnx's default")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        raise SpecError(f"tolerance {tolerance!r} is invalid: give a finite number >= 0 (default 1e-4)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise SpecError(f"timeout {timeout!r} is invalid: give seconds > 0")


def _tmp_output(output: str) -> str:
    directory, name = os.path.split(output)
    return os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stderr_tail(stderr: str, lines: int = 3) -> str:
    tail = [line.strip() for line in stderr.splitlines() if line.strip()][-lines:]
    text = " | ".join(tail) or "no output on stderr"
    return text if len(text) <= 800 else "..." + text[-797:]


def _run_worker(python: str, spec: dict, workdir: str, timeout: float, model_path: str) -> dict:
    """Run the worker script with ``python``; its JSON result (``ok`` true or false)."""
    source = pkgutil.get_data("tflaunch.remote", "onnx_worker.py")
    if source is None:
        raise ExportError("tflaunch/remote/onnx_worker.py is missing from this installation: reinstall tflaunch")
    script = os.path.join(workdir, "tflaunch_onnx_worker.py")
    with open(script, "wb") as f:
        f.write(source)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""  # convert and compare on the CPU, as onnxruntime runs here
    env["KERAS_BACKEND"] = "tensorflow"
    env["PYTHONUNBUFFERED"] = "1"
    try:
        proc = subprocess.Popen([python, script, json.dumps(spec)], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        raise ExportError(f"cannot run the interpreter {python}: {exc.strerror or exc}; give --python the "
                          f"path of a Python with TensorFlow, tf2onnx and onnxruntime") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise ExportError(f"exporting {model_path} took longer than {timeout:g} s and was stopped: give a "
                          f"larger timeout") from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    stderr = err.decode("utf-8", "replace")
    if stderr.strip():
        logger.debug("export worker stderr:\n%s", stderr.rstrip())
    result = None
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            break
    if not isinstance(result, dict) or "ok" not in result:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with status {proc.returncode}")
        raise ExportError(f"the export worker ({python}) {how} without a result: {_stderr_tail(stderr)}")
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def _failure(result: dict, python: str, model_path: str) -> ExportError:
    stage, message = result.get("stage"), result.get("message", "unknown error")
    if stage == "import":
        names = [name for name, _ in result.get("missing", [])]
        broken = [f"{name} ({error})" for name, error in result.get("missing", [])
                  if not error.startswith("ModuleNotFoundError")]
        what = "; ".join(broken) if broken else ", ".join(names)
        return ExportError(f"{python} cannot import {what}: {_MISSING_HINT}")
    if stage == "load":
        return ExportError(f"cannot load {model_path} with {python}: {message}")
    if stage == "export":
        return ExportError(f"Keras could not export {model_path} as a SavedModel: {message}")
    if stage == "convert":
        return ExportError(f"tf2onnx could not convert {model_path}: {message}")
    if stage == "write":
        return ExportError(f"cannot write the ONNX model of {model_path}: {message}")
    return ExportError(f"checking the ONNX model of {model_path} against TensorFlow failed: {message}")


def export(model_path: str, output: str, opset: int | None = None, *, tolerance: float = 1e-4,
           python: str | None = None, timeout: float = 600) -> dict:
    """Convert ``model_path`` to the ONNX file ``output`` and verify it against TensorFlow.

    ``model_path`` is a Keras model file (``.keras``, ``.h5``), a SavedModel directory, or a directory
    holding exactly one of those. ``opset`` is the ONNX opset (default: tf2onnx's). The export fails
    (:class:`ExportError`, nothing written) when onnxruntime's outputs differ from TensorFlow's by more
    than ``tolerance`` (or are not finite) on random inputs. ``python`` is the interpreter that converts
    (default: this one); ``timeout`` bounds the whole conversion in seconds.

    Returns ``{"output", "model_path", "opset", "max_abs_diff", "tolerance", "method", "inputs", "outputs",
    "tensorflow", "keras", "tf2onnx", "onnxruntime", "sha256"}``; ``inputs``/``outputs`` are the ONNX
    model's ``{"name", "shape" (None: any size), "dtype"}``.
    """
    _check_args(opset, tolerance, timeout)
    model, kind = resolve_model(model_path)
    output = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if os.path.isdir(output):
        raise SpecError(f"output {output} is a directory: give a file name such as {output}/model.onnx")
    python = os.fspath(python) if python else sys.executable
    directory = os.path.dirname(output)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {directory}: {exc.strerror}") from None
    tmp = _tmp_output(output)
    workdir = tempfile.mkdtemp(prefix="tflaunch-onnx-")
    logger.info("exporting %s (%s) to %s with %s", model, kind, output, python)
    try:
        spec = {"model": model, "kind": kind, "output": tmp, "workdir": workdir, "opset": opset,
                "batch": _BATCH, "seed": _SEED}
        result = _run_worker(python, spec, workdir, timeout, model)
        if not result["ok"]:
            raise _failure(result, python, model)
        diff = result["max_abs_diff"]
        worst = result.get("worst_output")
        if diff is None or not math.isfinite(diff):
            raise ExportError(f"the ONNX model of {model} gives non-finite values (output {worst!r}) on random "
                              f"inputs, or TensorFlow does: nothing was written")
        if diff > tolerance:
            raise ExportError(f"the ONNX model of {model} differs from TensorFlow by {diff:.3g} (output "
                              f"{worst!r}), more than the tolerance {tolerance:g}: nothing was written (a "
                              f"larger tolerance accepts it)")
        digest = _sha256(tmp)
        os.replace(tmp, output)
    finally:
        _unlink_quietly(tmp)
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info("exported %s to %s (opset %s, max abs diff %.3g)", model, output, result["opset"], diff)
    return {
        "output": output, "model_path": model, "opset": result["opset"], "max_abs_diff": diff,
        "tolerance": tolerance, "method": result["method"], "inputs": result["inputs"],
        "outputs": result["outputs"], "tensorflow": result["tensorflow"], "keras": result["keras"],
        "tf2onnx": result["tf2onnx"], "onnxruntime": result["onnxruntime"], "sha256": digest,
    }
