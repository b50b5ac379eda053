"""A sweep's state: ``sweep.json`` in the parent run's record, rewritten atomically at every change.

It holds what the sweep was asked for (``config``), every trial (its index, run id, hyperparameters,
status, primary-metric intervals and best value, the slots it holds, the policy decision that stopped
it) and the sweep's best trial. The driver is the only writer; readers (``sweep show``, the Python API,
``runs report``) read it and each trial's own record. A trial is written here *before* its run is
created, so a driver killed at any point leaves nothing a resumed driver cannot account for.

Trial status: ``Starting`` (recorded, its run maybe not yet created), the run's own statuses (Preparing,
Queued, Running, ... Completed, Failed, Canceled) and ``Lost`` (its launcher died with the driver: it is
replaced by a new trial with the same hyperparameters).
"""
from __future__ import annotations

import math
import os

from .. import fsio

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable

__all__ = ["STATE", "SWEEP_LOG", "STARTING", "LOST", "ENDED", "load", "save", "best_trial", "summary",
           "trial_argv", "better", "value_text"]

STATE = "sweep.json"
SWEEP_LOG = os.path.join("tflaunch_logs", "sweep.log")
STARTING = "Starting"
LOST = "Lost"
ENDED = frozenset({"Completed", "Failed", "Canceled", LOST})
FORMAT = 1


def load(run_dir: str) -> dict[str, Any]:
    return fsio.read_json(os.path.join(run_dir, STATE))


def save(run_dir: str, state: dict[str, Any], *, sync: bool = False) -> None:
    """Replace the state atomically (a crash of the driver leaves the old or the new one); ``sync``: on
    disk before returning (before a trial's run is created: so a power loss cannot repeat it either)."""
    fsio.atomic_write_json(os.path.join(run_dir, STATE), state, fsync=sync, compact=True)


def better(a: float, b: float, maximize: bool) -> bool:
    return a > b if maximize else a < b


def best_trial(trials: Iterable[dict[str, Any]], maximize: bool, *, include_failed: bool = True,
               include_canceled: bool = True) -> dict[str, Any] | None:
    """The trial with the best primary metric (its best logged value), or None when none logged it."""
    best = None
    for t in trials:
        value = t.get("best")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or t.get("status") == LOST:
            continue
        if (t.get("status") == "Failed" and not include_failed) or (t.get("status") == "Canceled" and not include_canceled):
            continue
        if best is None or better(value, best["best"], maximize):
            best = t
    return best


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """Counts by status and the best trial, as the parent's status shows them (``sweep`` field)."""
    counts: dict[str, int] = {}
    for t in state["trials"]:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    maximize = state["config"]["primary_metric_goal"] == "maximize"
    best = best_trial(state["trials"], maximize)
    return {"trials": sum(1 for t in state["trials"] if t["status"] != LOST), "counts": counts,
            "primary_metric_name": state["config"]["primary_metric_name"],
            "primary_metric_goal": state["config"]["primary_metric_goal"],
            "max_total_runs": state["config"]["max_total_runs"],
            "best": None if best is None else {"index": best["index"], "run_id": best["run_id"], "value": best["best"],
                                               "hyperparameters": best["hyperparameters"]}}


def trial_argv(arguments: list[str], hyperparameters: dict[str, Any]) -> list[str]:
    """The script's arguments with the trial's values: a name already among the arguments (``--lr 0.1`` or
    ``--lr=0.1``) gets the trial's value there, others are appended as ``--name value``."""
    out = list(arguments)
    for name, value in hyperparameters.items():
        flag = name if name.startswith("-") else f"--{name}"
        text = value_text(value)
        for i, arg in enumerate(out):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = text
                break
            if arg.startswith(flag + "="):
                out[i] = f"{flag}={text}"
                break
        else:
            out += [flag, text]
    return out


def value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)
