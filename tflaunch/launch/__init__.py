"""Launch backends: start a host's processes through a tflaunch agent (:mod:`tflaunch.agent`).

Every backend produces an :class:`AgentConnection`: commands go to the agent's stdin, events come
back on its stdout, and closing the connection (or losing it) makes the agent stop the run's
processes. Only the local backend exists so far (:mod:`tflaunch.launch.local`).
"""
from __future__ import annotations

import json
import os
import subprocess

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["AgentConnection", "agent_payload", "BOOTSTRAP"]

# Run by `python -I -S -c BOOTSTRAP`: reads the agent's source (length-prefixed) from stdin and runs it.
BOOTSTRAP = (
    "# tflaunch agent\n"
    "import os, json, select, signal\n"  # the agent's imports, loaded while it waits for its source
    "def _r(n):\n"
    "    b = b''\n"
    "    while len(b) < n:\n"
    "        c = os.read(0, n - len(b))\n"
    "        if not c:\n"
    "            raise SystemExit(3)\n"
    "        b += c\n"
    "    return b\n"
    "exec(compile(_r(int(_r(10))), 'tflaunch-agent', 'exec'))\n"
)


def _framed(data: bytes) -> bytes:
    return b"%010d" % len(data) + data


def agent_payload(spec: dict[str, Any]) -> bytes:
    """What to write to a freshly started BOOTSTRAP interpreter: the agent's source, then the spec."""
    from .. import agent  # its loader reads the file from a directory or from the zipapp alike

    source = agent.__loader__.get_source(agent.__name__)  # type: ignore[union-attr]
    if source is None:
        raise RuntimeError("the source of tflaunch/agent.py is not available")
    return _framed(source.encode("utf-8")) + _framed(json.dumps(spec).encode("ascii"))


class AgentConnection:
    """A running agent: send commands, read events without blocking."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.eof = False
        self.done = False
        self._buf = b""
        os.set_blocking(popen.stdout.fileno(), False)

    def fileno(self) -> int:
        return self.popen.stdout.fileno()

    def send(self, obj: dict[str, Any]) -> bool:
        try:
            self.popen.stdin.write((json.dumps(obj) + "\n").encode("ascii"))
            self.popen.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def terminate(self, grace: float) -> bool:
        return self.send({"cmd": "terminate", "grace": grace})

    def kill(self) -> bool:
        return self.send({"cmd": "kill"})

    def read_events(self) -> list[dict[str, Any]]:
        """Events that arrived since the last call; sets :attr:`eof` when the agent's output ends."""
        events = []
        while not self.eof:
            try:
                chunk = os.read(self.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.done = self.done or event.get("event") == "done"
            events.append(event)
        return events

    def close(self, timeout: float = 5.0) -> None:
        """Close our end (the agent stops whatever is left) and reap the agent."""
        for stream in (self.popen.stdin, self.popen.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self.done:
            self.popen.wait()  # it exits right after "done"; a blocking wait does not poll-sleep
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
