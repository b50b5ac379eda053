"""What ``Run.get_context()`` (:mod:`tflaunch.api`) is made of: the writer of a training script's metrics,
and the offline run.

Under tflaunch (``TFLAUNCH_RUN_ID`` set) the script's run logs to this process's own files in the record
(see :mod:`tflaunch.history.metrics`), or under ``./logs/.tflaunch-metrics/`` on a host that does not see the
record (:func:`script_writer`). Outside tflaunch it is an :class:`OfflineRun` that prints what would be
logged, as the reference SDK's offline run does, so the same script runs under ``python train.py`` too.
"""
from __future__ import annotations

import logging
import os
import sys
import uuid

from .history.metrics import FALLBACK_DIR, METRICS_DIR, MetricsWriter, _check_name, _scalar

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["OfflineRun", "script_writer"]

log = logging.getLogger(__name__)

def script_writer(env: dict[str, str] | None = None) -> MetricsWriter:
    """The writer of this process of a tflaunch job: the record's ``metrics/`` when this host sees it."""
    env = os.environ if env is None else env
    run_dir = env.get("TFLAUNCH_RUN_DIR", "")
    rank_text = env.get("TFLAUNCH_RANK", "")
    rank = int(rank_text) if rank_text.isdigit() else None
    if run_dir and os.path.isdir(run_dir) and os.access(run_dir, os.W_OK):
        directory = os.path.join(run_dir, METRICS_DIR)
    else:  # no shared filesystem: kept with ./logs, which is sent back when the job ends
        directory = os.path.abspath(FALLBACK_DIR)
    return MetricsWriter(directory, rank)


class OfflineRun:
    """What ``Run.get_context()`` returns outside tflaunch: logs go to stdout and are kept in memory."""

    def __init__(self) -> None:
        self.id = f"OfflineRun_{uuid.uuid4()}"
        self._metrics: dict[str, list] = {}
        self._tags: dict[str, Any] = {}
        self._properties: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"OfflineRun(id={self.id!r})"

    def _say(self, text: str) -> None:
        sys.stdout.write(text + "\n")

    def get_status(self) -> str:
        return "Running"

    @property
    def input_datasets(self) -> dict[str, str]:
        """Outside tflaunch there are no inputs but those a launcher described in the environment."""
        from .data import input_datasets
        return input_datasets()

    def log(self, name: str, value: Any, description: str = "", step: int | None = None) -> None:
        value = _scalar(value, _check_name(name))
        self._say(f"Attempted to log scalar metric {name}:\n{value}")
        self._metrics.setdefault(name, []).append(value)

    def log_list(self, name: str, value: list, description: str = "") -> None:
        values = [_scalar(v, _check_name(name)) for v in value]
        self._say(f"Attempted to log list metric {name}:\n{values}")
        self._metrics.setdefault(name, []).extend(values)

    def log_row(self, name: str, description: str | None = None, **kwargs: Any) -> None:
        row = {k: _scalar(v, _check_name(name)) for k, v in kwargs.items()}
        self._say(f"Attempted to log table row metric {name}:\n{row}")
        table = self._metrics.setdefault(name, [])
        table.append(row)

    def tag(self, key: str, value: Any = None) -> None:
        self._say(f"Attempted to tag {key}: {value}")
        self._tags[_check_name(key, "tag name")] = "" if value is None else str(value)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.tag(key, value)

    def get_tags(self) -> dict[str, Any]:
        return dict(self._tags)

    def add_properties(self, properties: dict[str, Any]) -> None:
        self._say(f"Attempted to add properties {properties}")
        for key, value in properties.items():
            self._properties.setdefault(_check_name(key, "property name"), value)

    def get_properties(self) -> dict[str, Any]:
        return dict(self._properties)

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        out = {}
        for key, values in self._metrics.items():
            if name is None or key == name:
                out[key] = values[0] if len(values) == 1 and not isinstance(values[0], dict) else list(values)
        return out

    def register_model(self, model_name: str, model_path: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("register_model: an offline run has no record to register a model from; "
                           "run the script with tflaunch, or use `tflaunch models register`")
