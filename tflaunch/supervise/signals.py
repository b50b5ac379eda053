"""How the supervisor hears about the outside world while a run goes: SIGINT (Ctrl-C: cancel; twice:
kill now), SIGTERM and SIGHUP (``runs cancel``'s request, a scheduler ending the job, else a cancel), and
``runs cancel`` requests written by another machine (:class:`SignalHandling`, a part of
:class:`tflaunch.supervise.supervisor.Supervisor`). Signals only queue themselves; the supervisor's loop
handles them, woken through a pipe (``signal.set_wakeup_fd``).
"""
from __future__ import annotations

import logging
import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..history.store import RunRecord
    from ..schedule import Scheduler
    from .policy import FailFast

__all__ = ["SignalHandling"]

log = logging.getLogger(__name__)


class SignalHandling:
    """The supervisor's signals and cancel requests (it sets ``record``, ``scheduler``, ``policy``)."""

    record: RunRecord
    scheduler: Scheduler
    policy: FailFast
    _signals: list[int]
    _interrupts: int

    # -- signals -------------------------------------------------------------------------------------
    def _install_signals(self) -> tuple[Any, ...]:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_fd = signal.set_wakeup_fd(self._wake_w)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return old_fd, old

    def _restore_signals(self, saved: tuple[Any, ...]) -> None:
        old_fd, old = saved
        signal.set_wakeup_fd(old_fd)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        policy = self.policy
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGINT:
                self._interrupts += 1
                if self._interrupts > 1:
                    policy.kill_now()
                    continue
                policy.cancel("interrupted (Ctrl-C)")
                log.info("press Ctrl-C again to kill the run's processes now")
            else:
                request = self.record.cancel_requested()  # `runs cancel` writes a request, then signals
                if request:
                    policy.cancel(str(request.get("reason")))
                    continue
                ended = self.scheduler.ending(wait=1.0) if signum == signal.SIGTERM else None
                if ended is not None:
                    policy.stop(*ended)
                else:
                    policy.cancel(f"launcher received {signal.Signals(signum).name}")

    def _check_cancel(self) -> None:
        request = self.record.cancel_requested()
        if request is not None:
            self.policy.cancel(str(request.get("reason") or "cancel requested"))
