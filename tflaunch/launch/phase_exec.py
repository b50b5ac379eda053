"""The helper processes of the preparation phases (:mod:`tflaunch.launch.hostprep`), and how a phase fails.

A phase runs one helper process on each of its hosts, through the host's agent (``exec``), and waits for
them all; what each prints comes back over the connection into ``tflaunch_logs/<phase>-<node>.log``, and
to the console when the run is attached. A phase may keep some lines out of its log (the environment
builder's result line: it is no one's reading). A host on which a phase fails ends the run with a
:class:`PrepFailure`, which carries the last lines of that host's log.
"""
from __future__ import annotations

from .. import tail
from ..history.store import LOG_DIR

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .hostrun import HostRun
    from .session import Session

__all__ = ["PhaseExec", "PrepFailure", "TAIL_LINES"]

TAIL_LINES = 15  # of a host's log, in a PrepFailure


class PrepFailure(Exception):
    """A host could not be made ready: the run ends Failed with ``reason``."""

    def __init__(self, reason: str, message: str, tail_text: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.tail = tail_text


class PhaseExec:
    """The helper processes of one run's preparation phases (its :class:`~tflaunch.launch.session.Session`)
    and their logs."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._logs: dict[tuple[str, str], Any] = {}  # (host, phase) -> its log, open
        self._followed: set[str] = set()  # log files already shown on the console
        self._apart: dict[str, bytes] = {}  # phase -> how the lines kept out of its log start
        self._partial: dict[tuple[str, str], bytes] = {}  # such a phase's unfinished line
        self._kept: dict[tuple[str, str], list[bytes]] = {}  # (host, phase) -> the lines kept out

    def keep_apart(self, phase: str, prefix: bytes) -> None:
        """Keep the lines of ``phase`` that start with ``prefix`` out of its logs (see :meth:`kept`)."""
        self._apart[phase] = prefix

    def kept(self, phase: str, run: HostRun) -> list[bytes]:
        """The lines of ``phase`` on ``run`` that were kept out of its log."""
        return self._kept.get((run.name, phase)) or []

    def run_all(self, phase: str, commands: dict[str, dict[str, Any]], runs: list[HostRun], what: str) -> bool:
        """Run one helper process per host (``commands``: host -> exec command) and wait for them all;
        False if the run was stopped meanwhile."""
        for run in runs:
            cmd = commands.get(run.name)
            if cmd is None:
                continue
            run.execs.pop(cmd["id"], None)
            self._follow(phase, run)
            run.conn.send({"cmd": "exec", **cmd})
        ids = {run.name: commands[run.name]["id"] for run in runs if run.name in commands}
        return self.session.wait(lambda: all(i in r.execs for r in runs for i in [ids.get(r.name)] if i), None, what)

    @staticmethod
    def failed(runs: list[HostRun], exec_id: str) -> list[HostRun]:
        """The hosts on which the helper process ``exec_id`` did not succeed."""
        return [run for run in runs if exec_id in run.execs and run.execs[exec_id].get("returncode") != 0]

    def tail(self, phase: str, run: HostRun) -> str:
        """The last lines of ``phase``'s log on ``run``."""
        data_ = tail.tail_bytes(self.session.record.path(self._log_path(phase, run)), 8000)
        lines = data_.decode("utf-8", "replace").replace("\r", "\n").splitlines()
        return "\n".join(lines[-TAIL_LINES:])

    def _log_path(self, phase: str, run: HostRun) -> str:
        return f"{LOG_DIR}/{phase}-{run.node}.log"

    def _follow(self, phase: str, run: HostRun) -> None:
        path = self.session.record.path(self._log_path(phase, run))
        if path in self._followed:
            return
        self._followed.add(path)
        open(path, "ab").close()
        if self.session.stream:
            self.session.followers.append(tail.Follower(path, self.session.stderr, prefix=f"[{phase} {run.name}] "))

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """Handle an ``exec_output``/``exec_done`` event; True if it was one."""
        kind = event.get("event")
        if kind == "exec_output":
            self._write(run, str(event.get("id", "")).split(":")[0], event.get("data") or b"")
            return True
        if kind == "exec_done":
            phase = str(event["id"]).split(":")[0]
            self._write(run, phase, b"", final=True)
            run.execs[str(event["id"])] = event
            return True
        return False

    def _write(self, run: HostRun, phase: str, chunk: bytes, final: bool = False) -> None:
        """Into the phase's log, but for the lines it keeps apart."""
        key = (run.name, phase)
        fh = self._logs.get(key)
        if fh is None:
            fh = self._logs[key] = open(self.session.record.path(self._log_path(phase, run)), "ab", buffering=0)
        prefix = self._apart.get(phase)
        if prefix is None:
            fh.write(chunk)
            return
        text = self._partial.pop(key, b"") + chunk
        lines = text.split(b"\n")
        rest = lines.pop()
        if final and rest:
            lines.append(rest)
        elif rest:
            self._partial[key] = rest
        for line in lines:
            if line.startswith(prefix):
                self._kept.setdefault(key, []).append(line)
            else:
                fh.write(line + b"\n")

    def close(self) -> None:
        """Close the logs."""
        for fh in self._logs.values():
            fh.close()
        self._logs.clear()
