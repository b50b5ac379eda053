"""tflaunch: run TensorFlow/Keras training on machines you already have, with a file-based run history.

Public API (mirrors the Azure ML SDK v1)::

    from tflaunch import Experiment, TensorFlow
    run = Experiment("tf-mnist").submit(TensorFlow(source_directory=".", entry_script="train.py"))
    run.wait_for_completion(show_output=True)

Names are imported lazily so ``python -m tflaunch`` and the launcher's helpers start fast.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any


from ._version import __version__

_EXPORTS = {
    "Estimator": "spec", "TensorFlow": "spec", "MpiConfiguration": "spec", "TensorflowConfiguration": "spec",
    "MultiWorkerConfiguration": "spec",
    "SSHTarget": "spec.target", "SlurmTarget": "spec.target", "Host": "spec.hosts",
    "Experiment": "api", "Run": "api", "Workspace": "api", "RunStatus": "api",
    "TflaunchError": "errors", "SpecError": "errors", "SnapshotError": "errors", "StoreError": "errors",
    "RunNotFoundError": "errors", "PathSafetyError": "errors", "RunFailedError": "errors",
    "RunDeletedError": "errors", "RunActiveError": "errors",
    "Datastore": "data", "Dataset": "data", "DataReference": "data", "FileDataset": "data",
    "rank_info": "remote.rank", "ModelNotFoundError": "errors", "ExportError": "errors", "Model": "history.models",
    "OfflineRun": "tracking",
}
_SUBMODULES = {"keras": "keras", "onnx": "onnx", "models": "history.models", "metrics": "history.metrics",
               "tracking": "tracking", "report": "history.report", "data": "data", "envs": "envs", "config": "config"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if name in _SUBMODULES:  # tflaunch.keras.MetricsCallback after a bare `import tflaunch`
        from importlib import import_module
        return import_module(f"tflaunch.{_SUBMODULES[name]}")
    if module is None:
        raise AttributeError(f"module 'tflaunch' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"tflaunch.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
