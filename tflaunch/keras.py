"""``tflaunch.keras.MetricsCallback``: Keras epoch (and optionally batch) metrics into the run's history.

    model.fit(x, y, epochs=10, callbacks=[tflaunch.keras.MetricsCallback()])

TensorFlow is imported when the class is first used, not when tflaunch is imported; the callback derives
from ``tf.keras.callbacks.Callback``, so it fits the Keras that ``tf.keras`` is (Keras 3 on TensorFlow >=
2.16, Keras 2 on older releases or with ``TF_USE_LEGACY_KERAS=1``).
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

_classes: dict[str, type] = {}


def _build() -> type:
    import tensorflow as tf

    from .remote.rank import rank_info
    from .api import Run

    class MetricsCallback(tf.keras.callbacks.Callback):
        """Logs every value of Keras' ``logs`` at the end of each epoch as metric ``<prefix><name>`` with
        step = epoch (and every ``batch_frequency`` batches as ``<prefix>batch/<name>``, step = the global
        batch count). Only rank 0 logs unless ``all_ranks`` (data-parallel ranks report the same numbers)."""

        def __init__(self, run: Any = None, *, prefix: str = "", batch_frequency: int | None = None,
                     all_ranks: bool = False) -> None:
            super().__init__()
            if batch_frequency is not None and (not isinstance(batch_frequency, int) or batch_frequency < 1):
                raise ValueError(f"MetricsCallback: batch_frequency must be an integer >= 1, got {batch_frequency!r}")
            self.run = run if run is not None else Run.get_context()
            self.prefix = prefix
            self.batch_frequency = batch_frequency
            self.active = all_ranks or rank_info()["rank"] == 0
            self._batches = 0

        def _log(self, logs: Any, prefix: str, step: int) -> None:
            for key, value in (logs or {}).items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                self.run.log(f"{prefix}{key}", number, step=step)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.active:
                self._log(logs, self.prefix, epoch)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self._batches += 1
            if self.active and self.batch_frequency and self._batches % self.batch_frequency == 0:
                self._log(logs, f"{self.prefix}batch/", self._batches)

    return MetricsCallback


def __getattr__(name: str) -> Any:
    if name == "MetricsCallback":
        if name not in _classes:
            _classes[name] = _build()
        return _classes[name]
    raise AttributeError(f"module 'tflaunch.keras' has no attribute {name!r}")


def __dir__() -> list[str]:
    return ["MetricsCallback"]
