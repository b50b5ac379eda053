"""Local backend: the agent runs on this machine as a child of the launcher."""
from __future__ import annotations

import os
import subprocess
import sys

from ..plan.processes import ProcessPlan
from . import BOOTSTRAP, AgentConnection

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import IO, Sequence

__all__ = ["spawn_agent", "discard_agent", "start_local"]


def spawn_agent(log: IO[bytes] | int | None = None, python: str | None = None) -> subprocess.Popen:
    """Start an agent interpreter that waits for its source and setup on stdin.

    Starting it early (``tflaunch run`` does so before taking the snapshot) hides its start-up time;
    closing its stdin unused makes it exit.
    """
    return subprocess.Popen([python or sys.executable, "-I", "-S", "-c", BOOTSTRAP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, start_new_session=True, close_fds=True)


def discard_agent(popen: subprocess.Popen) -> None:
    """Dispose of an agent that was never given a setup."""
    for stream in (popen.stdin, popen.stdout):
        stream.close()
    popen.wait()


def process_spec(p: ProcessPlan, run_dir: str | None) -> dict:
    """The agent's view of a process (known to it by its rank); ``run_dir`` None = relay its output."""
    return {"index": p.rank, "argv": p.argv, "cwd": p.cwd, "env": p.environment(),
            "stdout": os.path.join(run_dir, p.stdout) if run_dir else None,
            "stderr": os.path.join(run_dir, p.stderr) if run_dir else None}


def start_local(processes: Sequence[ProcessPlan], *, token: str, run_dir: str, grace: float,
                orphan_grace: float, log: IO[bytes] | int | None = None,
                agent: subprocess.Popen | None = None) -> AgentConnection:
    """Have an agent (``agent``, or a new one) start ``processes`` at once; output goes to files in ``run_dir``."""
    connection = AgentConnection(agent or spawn_agent(log))
    connection.start({"token": token, "grace": grace, "orphan_grace": orphan_grace,
                      "processes": [process_spec(p, run_dir) for p in processes]})
    return connection
