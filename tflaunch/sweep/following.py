"""Following a sweep's trials: part of :class:`~tflaunch.sweep.driver.SweepDriver` (a mixin of it).

Each trial's status and primary metric (:func:`curve`) are read from its run record; each new interval
the policy is due to judge is put to it (:mod:`tflaunch.sweep.policy`), and a trial it stops has the
decision recorded (``early_termination.json``, an event) and is canceled. An ended trial gives its slots
back; one whose launcher was lost is recorded ``Lost`` (to be replaced). The first :data:`FAIL_FAST`
failures with nothing succeeded stop the sweep.
"""
from __future__ import annotations

import logging
import math

from .. import fsio
from ..history.store import CANCELED, COMPLETED, FAILED, FINALIZING, RUNNING, TERMINAL, now_iso
from . import trials as T
from .policy import due

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..history.store import RunRecord

__all__ = ["TrialFollowing", "curve", "FAIL_FAST"]

log = logging.getLogger("tflaunch.sweep.driver")  # the driver's: these run in its process

FAIL_FAST = 3  # failed trials with none succeeded yet: stop the sweep


def curve(run_dir: str, name: str) -> list[Any]:
    """The primary metric ``name`` as the trial logged it: its lowest rank's points, in order."""
    from ..history.metrics import load

    series = load(run_dir).get(name)
    if series is None or not len(series):
        return []
    ranks = [r for r in series.rank if r is not None]
    lowest = min(ranks) if ranks else None
    points = [(t if isinstance(t, (int, float)) else 0.0, i, v)
              for i, (v, r, t) in enumerate(zip(series.value, series.rank, series.time)) if r == lowest]
    points.sort()
    return [v for _, _, v in points if not isinstance(v, (list, dict, str))]


class TrialFollowing:
    """The trial-following methods of :class:`~tflaunch.sweep.driver.SweepDriver`; they work on the
    driver's state (``state``, ``curves``, ``policy``, ``pool``, ``stop_reason``: see ``SweepDriver.__init__``)."""

    def _poll(self, trial: dict[str, Any]) -> None:
        child = self._child(trial)
        status = child.read_status() or {}
        state = status.get("status")
        if state is None:
            return
        if state != trial["status"] and state not in TERMINAL:
            trial["status"] = state
            if state == RUNNING:
                trial["started"] = status.get("started")
            self._save()
        if state in (RUNNING, FINALIZING) or state in TERMINAL:
            self._follow_metric(trial, child, judge=state not in TERMINAL)  # an ended trial is not stopped
        if state in TERMINAL:
            self._end(trial, state, status.get("error"), status)

    def _follow_metric(self, trial: dict[str, Any], child: RunRecord, judge: bool = True) -> None:
        try:
            points = curve(child.dir, self.metric)
        except (OSError, ValueError) as exc:
            log.warning("trial %s: cannot read its metrics: %s", trial["index"], exc)
            return
        self.curves[trial["index"]] = points
        seen = trial["intervals"]
        if len(points) <= seen:
            return
        trial["intervals"] = len(points)
        finite = [float(v) for v in points if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)]
        trial["last"] = points[-1] if isinstance(points[-1], (int, float)) and math.isfinite(points[-1]) else None
        trial["best"] = (max(finite) if self.maximize else min(finite)) if finite else None
        if judge and trial["stopped"] is None and trial["status"] not in TERMINAL:
            for n in range(seen + 1, len(points) + 1):
                if due(self.policy, n) and self._evaluate(trial, n):
                    break
        self._save()

    def _evaluate(self, trial: dict[str, Any], n: int) -> bool:
        curves = {str(t["index"]): self.curves.get(t["index"], []) for t in self.state["trials"]
                  if t["status"] != T.LOST}
        finished = [str(t["index"]) for t in self.state["trials"] if t["status"] in TERMINAL]
        decision = self.policy.evaluate(str(trial["index"]), curves, n, self.maximize, finished)
        if decision is None:
            return False
        if "best_trial" in decision:
            leader = self.state["trials"][int(decision["best_trial"])]
            decision.update(best_trial=leader["index"], best_run_id=leader["run_id"])
        trial["stopped"] = decision
        self._save()
        from ..submit import cancel_run

        child = self._child(trial)
        reason = f"stopped by {decision['policy']} at interval {n}: {decision['message']}"
        try:
            fsio.atomic_write_json(child.path("early_termination.json"), decision)
            child.event("early_terminated", **decision)
        except OSError as exc:
            log.warning("trial %s: cannot record the policy's decision: %s", trial["index"], exc)
        cancel_run(child, reason)
        self._say(f"trial {trial['index']} ({trial['run_id']}) {reason}")
        return True

    def _end(self, trial: dict[str, Any], status: str, error: dict[str, Any] | None,
             run: dict[str, Any] | None = None) -> None:
        run = run or {}
        if status == FAILED and (error or {}).get("reason") == "launcher_lost" and trial.get("replaces") is None:
            status = T.LOST
        trial.update(status=status, error=error, ended=run.get("ended") or now_iso(),
                     started=trial.get("started") or run.get("started"))
        self.pool.give(trial.get("allocation"))
        metric = "" if trial["best"] is None else f", best {self.metric} {trial['best']:.6g}"
        why = f" ({error.get('reason')}: {error.get('message')})" if error and status in (FAILED, T.LOST) else ""
        self._say(f"trial {trial['index']} ({trial['run_id']}) {status}{metric}{why}"
                  + (", to be replaced" if status == T.LOST else ""))
        self.record.event("trial_ended", index=trial["index"], run_id=trial["run_id"], status=status,
                          best=trial["best"])
        self._save()

    def _fail_fast(self) -> None:
        counted = [t for t in self.state["trials"] if t["status"] != T.LOST]
        failed = [t for t in counted if t["status"] == FAILED]
        good = [t for t in counted if t["status"] == COMPLETED or (t["status"] == CANCELED and t["stopped"])]
        if not good and len(failed) >= min(FAIL_FAST, self.max_total) and self.stop_reason is None:
            last = failed[-1]
            message = (last.get("error") or {}).get("message", "unknown error")
            self._stop("fail_fast", f"the first {len(failed)} trials failed (trial {last['index']}, run "
                                    f"{last['run_id']}: {message})")
