"""Worker of :func:`tflaunch.onnx.export`: convert one model to ONNX and verify it, in its own interpreter.

Run as a standalone script (``python _onnx_worker.py SPEC_JSON``) by the interpreter that has TensorFlow,
tf2onnx and onnxruntime; it imports nothing from tflaunch, which that interpreter need not have. SPEC_JSON
holds ``model`` (absolute path), ``kind`` (``keras`` or ``saved_model``), ``output`` (where to write the
.onnx file), ``workdir`` (a private scratch directory), ``opset`` (int or null), ``batch`` (the size given
to unknown dimensions) and ``seed``.

Everything the libraries print goes to stderr; stdout carries exactly one JSON line: ``{"ok": true, ...}``
with the conversion's facts, or ``{"ok": false, "stage": ..., "message": ...}`` (then the exit status is 1).
Stages: ``import`` (with ``missing``: [[module, error], ...]), ``load``, ``export`` (Keras 3 model to a
SavedModel), ``convert``, ``write``, ``verify``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

__all__ = ["main"]

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "string",
}


class Failure(Exception):
    """A failure with a message meant for the user (no traceback needed)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, Failure):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def _import_all() -> dict:
    """Import the libraries; {name: module}, or raise Failure listing every one that is missing."""
    modules, missing = {}, []
    for name in ("numpy", "tensorflow", "tf2onnx", "onnxruntime"):
        try:
            modules[name] = __import__(name)
        except Exception as exc:  # a broken install raises more than ImportError (numpy ABI, protobuf)
            missing.append([name, _one_line(exc)])
    if missing:
        raise _ImportFailure(missing)
    return modules


class _ImportFailure(Failure):
    def __init__(self, missing: list) -> None:
        super().__init__("cannot import " + ", ".join(name for name, _ in missing))
        self.missing = missing


def _keras_version(model) -> str | None:
    """The version of the Keras package the model's class comes from (keras 2/3, tf_keras)."""
    package = sys.modules.get(type(model).__module__.split(".")[0])
    version = getattr(package, "__version__", None)
    if version is None:
        version = _installed_keras()
    return version


def _installed_keras() -> str | None:
    try:
        from importlib.metadata import version
        return version("keras")
    except Exception:
        return None


def _random_inputs(np, tf, specs: list, batch: int, seed: int) -> list:
    """One array per TensorSpec: None dimensions become ``batch``; floats uniform in [-1, 1), ints in
    [0, 4), bools random."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        dtype = spec.dtype
        if dtype.is_floating and dtype.name in ("float16", "float32", "float64"):
            arrays.append(rng.uniform(-1.0, 1.0, size=shape).astype(dtype.name))
        elif dtype.is_integer:
            arrays.append(rng.integers(0, 4, size=shape).astype(dtype.name))
        elif dtype.is_bool:
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            raise Failure(f"input {spec.name!r} has dtype {dtype.name}: only float, int and bool inputs can be "
                          f"verified")
    return arrays


def _signature(tf, saved_model_dir: str):
    """The serving signature of a SavedModel: ``serving_default``, else its only signature."""
    loaded = tf.saved_model.load(saved_model_dir)
    signatures = dict(loaded.signatures)
    if "serving_default" in signatures:
        return loaded, signatures["serving_default"]
    if len(signatures) == 1:
        return loaded, next(iter(signatures.values()))
    if not signatures:
        raise Failure(f"SavedModel {saved_model_dir} has no signature to convert (save it with a serving "
                      f"signature: Keras model.export() or tf.saved_model.save(..., signatures=...))")
    raise Failure(f"SavedModel {saved_model_dir} has signatures {sorted(signatures)} and no serving_default")


def _convert_signature(tf, tf2onnx, loaded, signature, opset):
    """Convert a SavedModel's serving signature; (model_proto, specs, reference function)."""
    _, kwargs = signature.structured_input_signature
    names = sorted(kwargs)
    specs = [tf.TensorSpec(kwargs[n].shape, kwargs[n].dtype, name=n) for n in names]

    def call(*args):
        return signature(**dict(zip(names, args)))

    function = tf.function(call, input_signature=specs)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=opset)

    def reference(arrays: list) -> tuple:
        outputs = signature(**{n: tf.constant(a) for n, a in zip(names, arrays)})
        if not isinstance(outputs, dict):
            outputs = {"output_0": outputs}
        keys = sorted(outputs)
        return keys, [outputs[k].numpy() for k in keys]

    reference.keep_alive = loaded  # the signature's variables live as long as the loaded object
    return proto, specs, reference


def _convert_keras2(tf, tf2onnx, model, opset):
    """Convert a Keras 2 model with tf2onnx.convert.from_keras; (model_proto, specs, reference function)."""
    if not model.inputs:
        raise Failure("the Keras 2 model has no defined inputs (a subclassed model?): save it as a SavedModel "
                      "(model.save(DIR, save_format='tf')) and export that directory")
    names = list(getattr(model, "input_names", None) or [t.name.split(":")[0] for t in model.inputs])
    specs = [tf.TensorSpec(t.shape, t.dtype, name=n) for t, n in zip(model.inputs, names)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=specs, opset=opset)
    output_names = list(getattr(model, "output_names", None) or [])

    def reference(arrays: list) -> tuple:
        outputs = model(arrays if len(arrays) > 1 else arrays[0], training=False)
        flat = [t.numpy() for t in tf.nest.flatten(outputs)]
        keys = output_names if len(output_names) == len(flat) else [f"output_{i}" for i in range(len(flat))]
        return keys, flat

    return proto, specs, reference


def _io_list(values) -> list:
    return [{"name": v.name, "shape": [d if isinstance(d, int) else None for d in (v.shape or [])],
             "dtype": _ORT_TYPES.get(v.type, v.type)} for v in values]


def _compare(np, ref_names: list, ref_values: list, onnx_names: list, onnx_values: list) -> dict:
    """{output name: max |TF - ONNX|} (NaN where not finite); outputs are matched by name, else in order."""
    if len(ref_values) != len(onnx_values):
        raise Failure(f"TensorFlow gives {len(ref_values)} outputs, the ONNX model {len(onnx_values)}")
    if set(ref_names) == set(onnx_names):
        by_name = dict(zip(ref_names, ref_values))
        ref_values = [by_name[n] for n in onnx_names]
    diffs = {}
    for name, expected, got in zip(onnx_names, ref_values, onnx_values):
        expected, got = np.asarray(expected), np.asarray(got)
        if expected.shape != got.shape:
            raise Failure(f"output {name!r} has shape {list(got.shape)} in ONNX, {list(expected.shape)} in "
                          f"TensorFlow")
        if expected.size == 0:
            diffs[name] = 0.0
            continue
        delta = np.abs(expected.astype(np.float64) - got.astype(np.float64))
        diffs[name] = float(delta.max()) if np.all(np.isfinite(delta)) else float("nan")
    return diffs


def run(spec: dict) -> dict:
    stage = {"name": "import"}
    try:
        return _run(spec, stage)
    except _ImportFailure as exc:
        return {"ok": False, "stage": "import", "message": _one_line(exc), "missing": exc.missing}
    except BaseException as exc:  # reported as one line; the traceback goes to stderr for --log-level debug
        if not isinstance(exc, Failure):
            traceback.print_exc()
        return {"ok": False, "stage": stage["name"], "message": _one_line(exc)}


def _run(spec: dict, stage: dict) -> dict:
    mods = _import_all()
    np, tf, tf2onnx, ort = mods["numpy"], mods["tensorflow"], mods["tf2onnx"], mods["onnxruntime"]
    try:  # verification compares float32 results: no TF32 matmuls on GPUs that have them
        tf.config.experimental.enable_tensor_float_32_execution(False)
    except Exception:
        pass
    facts = {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnxruntime": ort.__version__}

    stage["name"] = "load"
    if spec["kind"] == "keras":
        model = tf.keras.models.load_model(spec["model"], compile=False)
        facts["keras"] = _keras_version(model)
        keras_major = int(str(facts["keras"] or "3").split(".")[0])
        if keras_major >= 3:  # from_keras fails on Keras 3 (KeyError on output names): go through a SavedModel
            stage["name"] = "export"
            saved = os.path.join(spec["workdir"], "saved_model")
            model.export(saved)
            loaded, signature = _signature(tf, saved)
            stage["name"] = "convert"
            proto, specs, reference = _convert_signature(tf, tf2onnx, loaded, signature, spec["opset"])
            facts["method"] = "saved_model"
        else:
            stage["name"] = "convert"
            proto, specs, reference = _convert_keras2(tf, tf2onnx, model, spec["opset"])
            facts["method"] = "from_keras"
    else:
        facts["keras"] = _installed_keras()
        loaded, signature = _signature(tf, spec["model"])
        stage["name"] = "convert"
        proto, specs, reference = _convert_signature(tf, tf2onnx, loaded, signature, spec["opset"])
        facts["method"] = "saved_model"
    facts["opset"] = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)

    stage["name"] = "write"
    data = proto.SerializeToString()
    with open(spec["output"], "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

    stage["name"] = "verify"
    arrays = _random_inputs(np, tf, specs, spec["batch"], spec["seed"])
    ref_names, ref_values = reference(arrays)
    session = ort.InferenceSession(spec["output"], providers=["CPUExecutionProvider"])
    onnx_inputs = session.get_inputs()
    onnx_input_names = [i.name for i in onnx_inputs]
    spec_names = [s.name for s in specs]
    if sorted(onnx_input_names) == sorted(spec_names):
        feed = dict(zip(spec_names, arrays))
    elif len(onnx_input_names) == len(arrays):
        feed = dict(zip(onnx_input_names, arrays))
    else:
        raise Failure(f"the ONNX model has inputs {onnx_input_names}, TensorFlow {spec_names}")
    onnx_outputs = session.get_outputs()
    onnx_values = session.run(None, feed)
    diffs = _compare(np, ref_names, ref_values, [o.name for o in onnx_outputs], onnx_values)
    # the output that differs most; NaN (not finite) counts as the most
    worst = max(diffs, key=lambda n: float("inf") if diffs[n] != diffs[n] else diffs[n], default=None)
    facts.update({
        "ok": True, "max_abs_diff": 0.0 if worst is None else diffs[worst], "worst_output": worst, "diffs": diffs,
        "inputs": _io_list(onnx_inputs), "outputs": _io_list(onnx_outputs),
    })
    return facts


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    result_fd = os.dup(1)  # the one JSON line goes here; whatever the libraries print goes to stderr
    os.dup2(2, 1)
    result = run(json.loads(argv[0]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(result_fd, (json.dumps(result) + "\n").encode("utf-8"))
    os.close(result_fd)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
