"""Launch backends: start a tflaunch agent (:mod:`tflaunch.remote.agent`) on each host and talk to it.

Every backend produces an :class:`AgentConnection`: commands go to the agent's stdin, events come
back on its stdout, and closing the connection (or losing it) makes the agent stop the run's
processes. Backends: :mod:`tflaunch.launch.local` (a child process) and :mod:`tflaunch.launch.ssh`
(the OpenSSH client); :class:`tflaunch.supervise.Supervisor` drives the agents of a run together.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import IO, Any

__all__ = ["AgentConnection", "agent_payload", "agent_source", "BOOTSTRAP", "LEASE_TIMEOUT", "PING_EVERY",
           "lease_timeout"]

LEASE_TIMEOUT = 30.0  # an agent that hears nothing from the launcher this long stops the run's processes
PING_EVERY = 5.0  # the longest the launcher stays silent to an agent with a lease (else: a quarter of it)

# Run by `python -I -S -c BOOTSTRAP`: reads the agent's source (length-prefixed) from stdin and runs it.
# One line, no single quotes: it travels inside '...' through whatever login shell a remote host has.
BOOTSTRAP = (
    'import os,json,select,signal;'  # the agent's imports, loaded while it waits for its source
    'R=lambda n,b=b"":b if len(b)>=n else R(n,b+(os.read(0,n-len(b)) or os._exit(3)));'
    'exec(compile(R(int(R(10))),"tflaunch-agent","exec"))'
)


def _framed(data: bytes) -> bytes:
    return b"%010d" % len(data) + data


def agent_source() -> str:
    """The agent as the hosts run it: its parts joined into one program (read from a directory or from the
    zipapp alike)."""
    from ..remote.bundle import AGENT, shipped_source

    return shipped_source(AGENT)


def lease_timeout() -> float:
    """The agents' lease (``lease_timeout`` in their setup): ``TFLAUNCH_LEASE_TIMEOUT`` seconds (0: none),
    :data:`LEASE_TIMEOUT` by default or when the variable is not a number."""
    value = os.environ.get("TFLAUNCH_LEASE_TIMEOUT")
    try:
        return max(0.0, float(value)) if value else LEASE_TIMEOUT
    except ValueError:
        return LEASE_TIMEOUT


def agent_payload(setup: dict[str, Any]) -> bytes:
    """What to write to a freshly started BOOTSTRAP interpreter: the agent's source, then the setup."""
    return _framed(agent_source().encode("utf-8")) + _framed(json.dumps(setup).encode("ascii"))


class AgentConnection:
    """A running agent on ``host``: send commands, read events without blocking.

    ``diagnostics`` is a file that receives the agent's (or ssh's) stderr, read back for error messages.
    An agent set up with a ``lease_timeout`` is sent ``ping`` by :meth:`keepalive` whenever nothing else
    went to it for a while. Commands may be sent from several threads (a frame is written whole).
    """

    def __init__(self, popen: subprocess.Popen, host: str = "localhost", *, local: bool = True,
                 diagnostics: IO[bytes] | None = None) -> None:
        self.popen = popen
        self.host = host
        self.local = local
        self.diagnostics = diagnostics
        self.eof = False
        self.done = False
        self._buf = bytearray()
        self._need: dict[str, Any] | None = None  # an event waiting for its n bytes
        self._lock = threading.Lock()  # one frame at a time on stdin (uploads run in threads)
        self._ping_every = 0.0  # 0: the agent has no lease, nothing to keep alive
        self._last_sent = 0.0  # time.monotonic() of the last write to the agent
        os.set_blocking(popen.stdout.fileno(), False)

    def fileno(self) -> int:
        return self.popen.stdout.fileno()

    def start(self, setup: dict[str, Any]) -> None:
        """Send the agent its source and setup (raises OSError if it is already gone)."""
        lease = float(setup.get("lease_timeout") or 0)
        with self._lock:
            self.popen.stdin.write(agent_payload(setup))
            self.popen.stdin.flush()
            self._last_sent = time.monotonic()
        self._ping_every = min(lease / 4, PING_EVERY) if lease > 0 else 0.0

    def send(self, obj: dict[str, Any], data: bytes | None = None) -> bool:
        if data is not None:
            obj = {**obj, "n": len(data)}
        with self._lock:
            return self._write(obj, data)

    def _write(self, obj: dict[str, Any], data: bytes | None) -> bool:
        try:
            self.popen.stdin.write((json.dumps(obj) + "\n").encode("ascii"))
            if data:
                self.popen.stdin.write(data)
            self.popen.stdin.flush()
            self._last_sent = time.monotonic()
            return True
        except (OSError, ValueError):
            return False

    def keepalive(self, now: float) -> None:
        """Ping the agent if it has a lease and nothing went to it for a while (``now``: time.monotonic());
        never waits for a frame another thread is writing (those bytes keep the agent's lease too)."""
        if not self._ping_every or now - self._last_sent < self._ping_every or self.eof or self.popen.stdin.closed:
            return
        if self._lock.acquire(blocking=False):
            try:
                self._write({"cmd": "ping"}, None)
            finally:
                self._lock.release()

    def terminate(self, grace: float) -> bool:
        return self.send({"cmd": "terminate", "grace": grace})

    def kill(self) -> bool:
        return self.send({"cmd": "kill"})

    def read_events(self) -> list[dict[str, Any]]:
        """Events that arrived since the last call; sets :attr:`eof` when the agent's output ends.

        An event that carries bytes has them under ``"data"``.
        """
        for _ in range(8):  # bounded: a chatty agent must not keep the launcher reading forever
            if self.eof:
                break
            try:
                chunk = os.read(self.fileno(), 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        events = []
        buf, pos = self._buf, 0  # parse by offset: slicing the rest off after each event would copy it
        while True:
            if self._need is not None:
                n = self._need["n"]
                if len(buf) - pos < n:
                    break
                self._need["data"] = bytes(buf[pos:pos + n])
                pos += n
                events.append(self._need)
                self._need = None
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line, pos = buf[pos:end], end + 1
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("n"):
                self._need = event
                continue
            self.done = self.done or event.get("event") == "done"
            events.append(event)
        del buf[:pos]  # a bytearray drops its head without copying the rest
        return events

    def stderr_tail(self, limit: int = 2000) -> str:
        """The last lines the agent (or ssh) wrote to stderr."""
        if self.diagnostics is None:
            return ""
        try:
            self.diagnostics.flush()
            size = os.fstat(self.diagnostics.fileno()).st_size
            data = os.pread(self.diagnostics.fileno(), limit, max(0, size - limit))
        except (OSError, ValueError):
            return ""
        return data.decode("utf-8", "replace").strip()

    def close(self, timeout: float = 5.0) -> None:
        """Close our end (the agent stops whatever is left) and reap the agent."""
        for stream in (self.popen.stdin, self.popen.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self.done:
            self.popen.wait()  # it exits right after our end closes; a blocking wait does not poll-sleep
        else:
            self._wait_or_kill(timeout)
        if self.diagnostics is not None:
            self.diagnostics.close()

    def _wait_or_kill(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
