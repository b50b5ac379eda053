"""What a run does after a failure (:func:`recovery`): the restart budget (``max_restarts``), the exit
codes that restart without using it (``restart_on_exit_codes``: a script's "preempted, checkpoint saved"
code), the delay between attempts (``restart_delay``, doubled after each failure, at most
:data:`MAX_DELAY`), the hang watchdog (``hang_timeout``: no output and no metric from any rank for that
long stops the attempt, reason ``hung``; not before ``hang_grace`` after the processes start) and, for
a run submitted to Slurm, how often it may be requeued (``max_requeues``). Stored as ``recovery`` in the
job spec; None when the run has none of it (fail fast, as without tflaunch's recovery).
"""
from __future__ import annotations

from .fields import _fail

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["recovery", "FIELDS", "MAX_DELAY", "DEFAULT_DELAY", "DEFAULT_HANG_GRACE"]

MAX_DELAY = 300.0  # the backoff stops growing here
DEFAULT_DELAY = 1.0
DEFAULT_HANG_GRACE = 60.0  # start-up (imports, a TF cluster forming) is quiet: not a hang
FIELDS = ("max_restarts", "restart_on_exit_codes", "restart_delay", "hang_timeout", "hang_grace", "max_requeues")


def _nonnegative(name: str, value: Any, kind: type = float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < 0:
        what = "a number" if kind is float else "an integer"
        raise _fail(name, f"must be {what} >= 0, got {value!r}")
    return kind(value)


def _exit_codes(value: Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise _fail("restart_on_exit_codes", f"must be a list of exit codes such as [75], got {value!r}")
    bad = [c for c in value if not 1 <= c <= 255]
    if bad:
        raise _fail("restart_on_exit_codes", f"exit codes are 1-255 (0 is success), got {bad[0]}")
    return sorted(set(value))


def recovery(max_restarts: int | None = None, restart_on_exit_codes: Sequence[int] | None = None,
             restart_delay: float | None = None, hang_timeout: float | None = None,
             hang_grace: float | None = None, max_requeues: int | None = None) -> dict[str, Any] | None:
    """The checked ``recovery`` of a job spec (None: nothing asked for)."""
    out: dict[str, Any] = {
        "max_restarts": _nonnegative("max_restarts", max_restarts, int) or 0,
        "restart_on_exit_codes": _exit_codes(restart_on_exit_codes),
        "restart_delay": DEFAULT_DELAY if restart_delay is None else _nonnegative("restart_delay", restart_delay),
        "hang_timeout": _nonnegative("hang_timeout", hang_timeout) or None,
        "hang_grace": DEFAULT_HANG_GRACE if hang_grace is None else _nonnegative("hang_grace", hang_grace),
        "max_requeues": _nonnegative("max_requeues", max_requeues, int) or 0,
    }
    if not out["hang_timeout"]:
        if hang_grace is not None:
            raise _fail("hang_grace", "only meaningful with hang_timeout (--hang-timeout)")
        out["hang_grace"] = None
    if not (out["max_restarts"] or out["restart_on_exit_codes"] or out["hang_timeout"] or out["max_requeues"]):
        if restart_delay is not None:
            raise _fail("restart_delay", "only meaningful with max_restarts (--max-restarts) or "
                                         "restart_on_exit_codes (--restart-on-exit-codes)")
        return None
    return out
