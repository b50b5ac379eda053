"""The hang watchdog (``hang_timeout``, ``--hang-timeout``; see :mod:`tflaunch.spec.recovery`).

A run is hung when no rank has written output or logged a metric for ``hang_timeout`` seconds, once it is
``hang_grace`` seconds past the start of the attempt's processes (start-up is quiet: imports, a TF cluster
forming). Activity is what reaches the record: an ``output`` event (a rank's relayed output: a flag, no
work per chunk), and, every :attr:`HangWatchdog.period` (a tenth of the timeout, between
:data:`MIN_PERIOD` and :data:`MAX_PERIOD`), the total size of the ranks' logs (``tflaunch_logs/rank-*``:
written by the processes themselves on this machine, by the supervisor for relayed output and by the
demultiplexer of mpirun's) and of the metric files (``metrics/``): a few ``stat`` calls, and none when
an event was seen. Metrics that a host without the shared filesystem keeps in its own ``logs/`` (they come
back at the end) are not seen; its output is. Nothing is watched while the ranks wind down after the lead
ended (its outcome stands) or while some ranks are due to start again (a restart within the attempt).

When the run is hung, the watchdog first asks every rank for its Python stacks: the run's processes were
started with ``TFLAUNCH_STACKS_SIGNAL`` (SIGURG), which had tflaunch's ``sitecustomize``
(:mod:`tflaunch.remote.stacks`) register a :mod:`faulthandler` dump to stderr for it; the launcher has the
agents send it (:meth:`tflaunch.launch.launcher.Launcher.signal_ranks`, the agent command ``signal``) to
the processes that catch it and answer ``signalled``. The events are served as usual meanwhile, until the
answers are in and a little more (:data:`SETTLE`) or :data:`STACKS_WAIT` has passed; then what each rank's
stderr log gained since the signal is written to ``tflaunch_logs/hang-<attempt>.txt``, with why a rank has
no stack (it did not catch the signal: not Python, or tflaunch's copy was not on its ``PYTHONPATH`` on that
host; it had exited; no agent found it, as on an srun step's nodes). Then the attempt is stopped with
reason ``hung`` (``session.stop``), which the outcome policy treats like any failure.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from ..history.metrics import METRICS_DIR
from ..history.store import LOG_DIR, now_iso
from ..remote.stacks import STACKS_SIGNAL
from ..spec.recovery import DEFAULT_HANG_GRACE

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..launch.hostrun import HostRun
    from ..launch.session import Session

__all__ = ["HangWatchdog", "StackRequest", "hang_file", "MIN_PERIOD", "MAX_PERIOD", "STACKS_WAIT", "SETTLE"]

log = logging.getLogger(__name__)

MIN_PERIOD = 0.2  # seconds between two looks at the files, at least
MAX_PERIOD = 2.0  # and at most
STACKS_WAIT = 3.0  # the longest the stack request waits for the answers and the dumps
SETTLE = 0.5  # after the last answer: relayed dumps are still on their way
MAX_STACK_BYTES = 256 * 1024  # of each rank's stderr, in the hang file

_WHY = {
    "no handler": "it does not catch {signal}: not a Python process, or tflaunch's copy (TFLAUNCH_PYTHONPATH) "
                  "was not on its PYTHONPATH on that host, or its sitecustomize was shadowed",
    "exited": "it had exited",
}


def hang_file(attempt: int) -> str:
    """Where the stacks of a hung attempt are kept (relative to the record)."""
    return f"{LOG_DIR}/hang-{attempt}.txt"


@dataclass
class StackRequest:
    """A stack request under way: what was asked, what has been answered."""

    until: float  # when the hang file is written, whatever has come
    offsets: dict[int, int]  # rank -> the size of its stderr log before the signal
    asked: list[str]  # the hosts whose agents were asked
    launcher: str
    quiet: float  # seconds without activity
    waiting: set[int] = field(default_factory=set)  # id() of the agents that have not answered yet
    answered: set[str] = field(default_factory=set)
    answers: dict[int, tuple[str, str]] = field(default_factory=dict)  # rank -> (status, host)


class HangWatchdog:
    """Watches one run's activity, attempt by attempt; created only for a run with a ``hang_timeout``."""

    def __init__(self, session: Session) -> None:
        recovery = session.spec.recovery or {}
        self.session = session
        self.timeout = float(recovery["hang_timeout"])
        grace = recovery.get("hang_grace")
        self.grace = float(DEFAULT_HANG_GRACE if grace is None else grace)
        self.period = min(MAX_PERIOD, max(MIN_PERIOD, self.timeout / 10))
        self.start: float | None = None  # when the watched attempt's processes started (None: not watching)
        self.attempt = 0
        self.last = 0.0  # the last activity seen
        self.next_check = 0.0
        self.heard = False  # an output event since the last check
        self.total = -1  # bytes in the ranks' logs and the metric files at the last check (-1: not known)
        self._paths: list[str] = []
        self._planned: Any = None  # the session.processes the paths are of
        self.asking: StackRequest | None = None

    # -- what the supervisor calls -------------------------------------------------------------------
    def started(self, now: float) -> None:
        """The attempt's processes have started: watch from ``now`` (the grace counts from here)."""
        self.start = self.last = now
        self.attempt = self.session.attempt
        self.next_check = now + self.period
        self.total = -1
        self.asking = None

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """Note an agent's event; True if it was one only the watchdog wants (``signalled``)."""
        kind = event.get("event")
        if kind == "output":
            self.heard = True
        elif kind == "started":
            if self.start is None or self.attempt != self.session.attempt:
                self.started(time.monotonic())
        elif kind == "signalled":
            if self.asking is not None:
                self._answered(run, event)
            return True
        return False

    def wakeup(self) -> float | None:
        """When :meth:`tick` has something to do next (None: not watching)."""
        if self.start is None:
            return None
        return self.asking.until if self.asking is not None else self.next_check

    def tick(self, now: float) -> None:
        """Look for activity when a check is due; ask for the stacks, or stop the attempt once they are in."""
        if self.start is None:
            return
        session, policy = self.session, self.session.policy
        if session.stop_reason is not None or self.attempt != session.attempt or policy.lead_done \
                or policy.pending():
            # stopped; the lead has ended (the others wind down: its outcome stands); some ranks are due to
            # start again; another attempt: watched again from the next start
            self.start = self.asking = None
            return
        if self.asking is not None:
            if now >= self.asking.until:
                self._hung()
            return
        if now < self.next_check:
            return
        self.next_check = now + self.period
        if self._active():
            self.last = now
        elif now - self.last >= self.timeout and now - self.start >= self.grace:
            self._ask(now)

    # -- activity ------------------------------------------------------------------------------------
    def _log_paths(self) -> list[str]:
        processes = self.session.processes
        if processes is not self._planned or len(self._paths) != 2 * len(processes):
            record = self.session.record
            self._paths = [record.path(name) for p in processes.values() for name in (p.stdout, p.stderr)]
            self._planned = processes
        return self._paths

    def _active(self) -> bool:
        """Whether anything reached the record since the last check."""
        if self.heard:
            self.heard = False
            self.total = -1  # the sizes are not looked at: the next look counts as activity, never as silence
            return True
        total = 0
        for path in self._log_paths():
            try:
                total += os.stat(path).st_size
            except OSError:
                pass
        try:
            with os.scandir(self.session.record.path(METRICS_DIR)) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):  # (readers' cache)
                        try:
                            total += entry.stat().st_size
                        except OSError:
                            pass
        except OSError:
            pass
        if total != self.total:
            self.total = total
            return True
        return False

    # -- the stack request ---------------------------------------------------------------------------
    def _ask(self, now: float) -> None:
        session = self.session
        log.warning("run %s: no output and no metric from any rank for %.1f s; asking the ranks for their stacks",
                    session.record.id, now - self.last)
        offsets = {}
        for rank, p in session.processes.items():
            try:
                offsets[rank] = os.stat(session.record.path(p.stderr)).st_size
            except OSError:
                offsets[rank] = 0
        launcher = session.policy.launcher
        asked = launcher.signal_ranks(STACKS_SIGNAL) if launcher is not None else []
        self.asking = StackRequest(until=now + STACKS_WAIT, offsets=offsets, asked=[run.name for run in asked],
                                   launcher=getattr(launcher, "name", "launcher"), quiet=now - self.last,
                                   waiting={id(run) for run in asked})
        if not asked:
            self._hung()

    def _answered(self, run: HostRun, event: dict[str, Any]) -> None:
        asking = self.asking
        for index, status in (event.get("ranks") or {}).items():
            if str(index).isdigit():
                asking.answers.setdefault(int(index), (str(status), run.name))
        asking.waiting.discard(id(run))
        asking.answered.add(run.name)
        if not asking.waiting:
            asking.until = min(asking.until, time.monotonic() + SETTLE)

    def _hung(self) -> None:
        session, asking = self.session, self.asking
        self.asking = None
        self.start = None  # one stop per attempt
        path = hang_file(session.attempt)
        try:
            with open(session.record.path(path), "w", encoding="utf-8") as fh:
                fh.write(self._report(asking))
        except OSError as exc:
            log.warning("run %s: cannot write %s: %s", session.record.id, path, exc)
        session.record.event("hung", attempt=session.attempt, timeout=self.timeout, stacks=path)
        session.stop("hung", f"no rank wrote output or logged a metric for {self.timeout:g} s (hang_timeout); "
                             f"their stacks are in {path}")

    def _report(self, asking: StackRequest) -> str:
        session = self.session
        lines = [f"tflaunch: run {session.record.id}, attempt {session.attempt}: no rank wrote output or logged "
                 f"a metric for {asking.quiet:.0f} s (hang_timeout {self.timeout:g} s), {now_iso()}",
                 f"Each rank's Python stacks, as faulthandler wrote them to its stderr on {STACKS_SIGNAL} "
                 f"(most recent call first), with anything else it wrote there meanwhile."]
        if not asking.asked:
            lines.append(f"The {asking.launcher} launcher cannot signal the ranks: no stacks.")
        for rank in sorted(session.processes):
            p = session.processes[rank]
            status, host = asking.answers.get(rank, (None, p.host))
            who = f"rank {rank}" + (f" ({p.role} {p.index})" if p.tf_cluster else "") + f", host {host}"
            if status == "sent":
                text = self._stderr_since(p.stderr, asking.offsets.get(rank, 0))
                lines += ["", f"== {who} ==", text.rstrip("\n") or
                          f"(nothing on its stderr within {STACKS_WAIT:g} s of the signal)"]
                continue
            exited = getattr(session.policy, "returncodes", {}).get(rank)
            if exited is not None:
                why = f"it had exited (return code {exited})"
            elif status is None:
                why = ("not asked" if not asking.asked else
                       f"the agent on host {host} did not find it" if host in asking.answered else
                       f"no answer from the agent on host {host} within {STACKS_WAIT:g} s" if host in asking.asked
                       else "no tflaunch agent found its process")
            else:
                why = _WHY.get(status, status).format(signal=STACKS_SIGNAL)
            lines += ["", f"== {who}: no stack: {why} =="]
        return "\n".join(lines) + "\n"

    def _stderr_since(self, rel: str, offset: int) -> str:
        try:
            with open(self.session.record.path(rel), "rb") as fh:
                fh.seek(offset)
                data = fh.read(MAX_STACK_BYTES + 1)
        except OSError as exc:
            return f"(cannot read {rel}: {exc})"
        more = "\n[... cut at %d bytes]" % MAX_STACK_BYTES if len(data) > MAX_STACK_BYTES else ""
        return data[:MAX_STACK_BYTES].decode("utf-8", "replace") + more
