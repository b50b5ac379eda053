"""The sweep as the Python API sees it: :class:`HyperDriveRun`, the parent run of the trials."""
from __future__ import annotations

import json
import math

from ..api import Run
from . import trials as T

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, TextIO

__all__ = ["HyperDriveRun"]


class HyperDriveRun(Run):
    """A sweep (``Experiment(...).submit(HyperDriveConfig(...))``, or ``HyperDriveRun(experiment, run_id)``):
    a run whose children are its trials. ``wait_for_completion(show_output=True)`` prints the sweep's
    progress (trials started, ended, stopped by the policy)."""

    def _state(self) -> dict[str, Any]:
        try:
            return T.load(self._record.dir)
        except (OSError, ValueError):
            return {"trials": [], "config": self._record.definition().get("sweep", {}).get("config", {})}

    def _trials(self) -> list[dict[str, Any]]:
        return [t for t in self._state()["trials"] if t["status"] != T.LOST]

    def _log_files(self, out: TextIO, err: TextIO) -> list[tuple[str, TextIO, str]]:
        return [(self._record.path(T.SWEEP_LOG), out, "")]

    def get_trials(self) -> list[dict[str, Any]]:
        """Every trial as the sweep recorded it (index, run_id, hyperparameters, status, intervals, best, last,
        stopped: the policy's decision), lost ones included."""
        return self._state()["trials"]

    def get_children(self) -> list[Run]:
        """The trials' runs, in the order they were started (lost trials left out)."""
        return [Run(self.experiment, t["run_id"]) for t in self._trials() if t.get("status") != T.STARTING]

    def get_hyperparameters(self) -> dict[str, str]:
        """``{run_id: the trial's hyperparameters as a JSON string}`` (as the reference returns them)."""
        return {t["run_id"]: json.dumps(t["hyperparameters"]) for t in self._trials()}

    def get_metrics(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """``{run_id: that trial's get_metrics()}``."""
        return {child.id: child.get_metrics(name) for child in self.get_children()}

    def _maximize(self) -> bool:
        return self._state()["config"].get("primary_metric_goal") == "maximize"

    def get_best_run_by_primary_metric(self, include_failed: bool = True, include_canceled: bool = True,
                                       include_resume_from_runs: bool = True) -> Run | None:
        """The trial with the best primary metric (the best value it logged), or None when no trial logged it."""
        best = T.best_trial(self._trials(), self._maximize(), include_failed=include_failed,
                            include_canceled=include_canceled)
        return None if best is None else Run(self.experiment, best["run_id"])

    def get_children_sorted_by_primary_metric(self, top: int = 0, reverse: bool = False,
                                              discard_no_metric: bool = False) -> list[dict[str, Any]]:
        """``[{run_id, hyperparameters, best_primary_metric, status}]``, best first (``reverse``: worst first);
        trials without the metric last (or left out with ``discard_no_metric``); ``top``: only that many."""
        maximize = self._maximize()
        rows = []
        for t in self._trials():
            value = t.get("best")
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            if not ok and discard_no_metric:
                continue
            rows.append({"run_id": t["run_id"], "hyperparameters": json.dumps(t["hyperparameters"]),
                         "best_primary_metric": value if ok else None, "status": t["status"]})
        with_value = [r for r in rows if r["best_primary_metric"] is not None]
        with_value.sort(key=lambda r: r["best_primary_metric"], reverse=maximize != reverse)
        rows = with_value + [r for r in rows if r["best_primary_metric"] is None]
        return rows[:top] if top else rows

    def get_portal_url(self) -> str:
        """The sweep's page in the live portal while ``tflaunch ui`` serves the home, else its HTML report
        (every trial's curves, hyperparameters and best value), rendered now into ``report.html`` in its
        record, as a ``file://`` URL."""
        from ..portal.discover import portal_url

        return portal_url(self._record, report_records=[child._record for child in self.get_children()],
                          title=f"sweep {self.id}")

    def cancel(self) -> None:
        """Cancel the sweep: its running trials are canceled, then the sweep ends Canceled."""
        from ..submit import cancel_run

        cancel_run(self._record, "canceled from the Python API")

    def resume(self) -> None:
        """Continue a sweep whose driver was lost (see ``tflaunch sweep resume``)."""
        from .submit import resume_sweep

        resume_sweep(self._record)
