"""The store's shared vocabulary: run statuses, the names and patterns of the on-disk layout, where the
home is, and timestamps as the records write them (the layout itself: :mod:`tflaunch.history.store`).

Everything here is importable from :mod:`tflaunch.history.store` too, as the rest of the package does.
"""
from __future__ import annotations

import calendar
import os
import re
import signal
import time
from datetime import datetime, timezone

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = [
    "PREPARING", "QUEUED", "RUNNING", "RECOVERING", "FINALIZING", "COMPLETED", "FAILED", "CANCELED", "TERMINAL",
    "DAMAGED", "STORE_FORMAT", "RUN_ID_RE", "EXPERIMENT_RE", "LOG_DIR", "RANK_LOG_PREFIX", "RESERVE_BYTES",
    "STATUS_FROM_DEFINITION", "USER_FILE_DIRS", "RERUNS_DIR", "TRASH_DIR",
    "rank_log", "resolve_home", "now_iso", "parse_iso", "exit_code_for", "validate_experiment_name",
]

PREPARING, QUEUED, RUNNING, FINALIZING = "Preparing", "Queued", "Running", "Finalizing"
RECOVERING = "Recovering"  # between two attempts of a run that restarts (tflaunch.supervise.restart)
COMPLETED, FAILED, CANCELED = "Completed", "Failed", "Canceled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED})
DAMAGED = "Damaged"  # listed for a run whose status.json does not read (damaged outside tflaunch); never recorded
STORE_FORMAT = 1
RUN_ID_RE = re.compile(r"^\d{8}-\d{6}-\d{3}-[0-9a-f]{8}$")
EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
LOG_DIR = "tflaunch_logs"
RANK_LOG_PREFIX = "rank-"  # rank_log()
RESERVE_BYTES = 256 * 1024
STATUS_FROM_DEFINITION = ("kind", "parent", "trial", "hyperparameters",  # sweeps (tflaunch.sweep)
                          "rerun_of")  # reruns (tflaunch.rerun)
USER_FILE_DIRS = ("outputs", "logs", LOG_DIR, "hosts")  # hosts/: see tflaunch.history.collect
RERUNS_DIR = "reruns"  # in a run's directory: <id>.json for each rerun made of it (tflaunch.rerun)
TRASH_DIR = "trash"  # in the home: deleted runs, <id>/ and <id>.json (tflaunch.history.trash)


def rank_log(rank: int, stream: str) -> str:
    """A process's output file in the record: ``tflaunch_logs/rank-N.stdout`` / ``.stderr``."""
    return f"{LOG_DIR}/{RANK_LOG_PREFIX}{rank}.{stream}"


def resolve_home(home: str | os.PathLike | None = None) -> str:
    """The store directory: ``home`` if given, else ``$TFLAUNCH_HOME``, else ``~/.tflaunch``."""
    if home is None or os.fspath(home) == "":
        home = os.environ.get("TFLAUNCH_HOME") or os.path.join(os.path.expanduser("~"), ".tflaunch")
    return os.path.abspath(os.path.expanduser(os.fspath(home)))


def now_iso(t: float | None = None) -> str:
    """UTC timestamp as ISO 8601 with milliseconds, e.g. ``2026-11-23T10:15:30.123Z``."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_iso(value: str | None) -> float | None:
    """Seconds since the epoch for a :func:`now_iso` timestamp (fixed layout: sliced, not strptime-d,
    which is 20x slower and dominated ``runs list`` over 10,000 runs)."""
    if not value:
        return None
    try:
        seconds = calendar.timegm((int(value[0:4]), int(value[5:7]), int(value[8:10]), int(value[11:13]),
                                   int(value[14:16]), int(value[17:19]), 0, 0, 0))
        return seconds + int(value[20:23]) / 1000
    except (ValueError, IndexError, TypeError):
        return None

def exit_code_for(run: dict[str, Any]) -> int:
    """Exit status for ``tflaunch run``: 0 Completed, the script's own code, 128+N for signal N,
    124 timeout, 130 Canceled, 1 for any other failure."""
    status = run.get("status")
    if status == COMPLETED:
        return 0
    if status == CANCELED:
        return 130
    error = run.get("error") or {}
    if error.get("reason") == "timeout":
        return 124
    code = run.get("exit_code")
    if isinstance(code, int) and 0 < code < 256:
        return code
    sig = run.get("signal")
    if sig:
        try:
            return 128 + int(signal.Signals[sig])
        except KeyError:
            pass
    return 1


def validate_experiment_name(name: Any) -> str:
    if not isinstance(name, str) or not EXPERIMENT_RE.match(name):
        raise SpecError(f"experiment name {name!r} is invalid: use 1-255 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit")
    return name
