"""SSH backend: the agent runs on a remote host, started by the OpenSSH client.

``ssh -T -o BatchMode=yes -o ConnectTimeout=N [-F config] [-p port] [-o option ...] HOST
exec PYTHON -I -S -c '<bootstrap>'``: the user's ``~/.ssh/config`` applies as for any ssh command;
only the one-line bootstrap goes on the remote command line. The agent's source, the environment
and the script's arguments travel over the connection, so nothing is interpreted by the remote
shell, nothing is limited by ARG_MAX and nothing secret shows in ``ps``. When the connection ends
for any reason (launcher killed, network lost: ``ServerAliveInterval`` notices within ~15 s here) the
agent's stdin closes and it stops the run's processes on that host; where no end of the connection
reaches the host (its link is down), the agent's lease does the same (see :mod:`tflaunch.remote.agent`).
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from . import BOOTSTRAP, AgentConnection

__all__ = ["SshOptions", "ssh_argv", "spawn_ssh_agent", "resolve_addresses"]

DEFAULT_CONNECT_TIMEOUT = 10


@dataclass
class SshOptions:
    """How to reach the hosts: ``port`` (``-p``), ``options`` (each ``-o KEY=VALUE``), ``config`` (``-F``)."""

    port: int | None = None
    options: list[str] = field(default_factory=list)
    config: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def to_dict(self) -> dict:
        return {"port": self.port, "options": list(self.options), "config": self.config,
                "connect_timeout": self.connect_timeout}

    @classmethod
    def from_dict(cls, data: dict | None) -> SshOptions:
        data = data or {}
        return cls(port=data.get("port"), options=list(data.get("options") or []), config=data.get("config"),
                   connect_timeout=float(data.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT))


def ssh_argv(host: str, command: str, options: SshOptions) -> list[str]:
    """The ssh command line that runs ``command`` (a shell command line) on ``host``."""
    argv = ["ssh", "-T", "-x", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(options.connect_timeout))}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if options.config:
        argv += ["-F", options.config]
    if options.port:
        argv += ["-p", str(options.port)]
    for option in options.options:
        argv += ["-o", option]
    return argv + ["--", host, command]


def _ssh_hostname(host: str, options: SshOptions) -> str:
    argv = ssh_argv(host, "", options)[:-1]
    argv.insert(1, "-G")
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return host
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value.strip():
            return value.strip()
    return host


def resolve_addresses(hosts: list[str], options: SshOptions) -> dict[str, str]:
    """How other hosts reach each of ``hosts``: the ``HostName`` ssh's configuration gives it (``ssh -G``),
    so that an alias such as ``Host gpu1 / HostName 10.0.0.11`` becomes ``10.0.0.11``; the name itself
    when the configuration does not rename it. Hosts are asked in parallel (~5 ms each)."""
    if not hosts:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(lambda h: _ssh_hostname(h, options), hosts)))


def agent_command(python: str) -> str:
    """The remote shell command line that starts an agent with ``python``."""
    import shlex

    return f"exec {shlex.quote(python)} -I -S -c '{BOOTSTRAP}'"


def spawn_ssh_agent(host: str, python: str, options: SshOptions) -> AgentConnection:
    """Start ``ssh HOST`` running an agent that waits for its source and setup on stdin."""
    import tempfile

    diagnostics = tempfile.TemporaryFile()
    popen = subprocess.Popen(ssh_argv(host, agent_command(python), options), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=diagnostics, start_new_session=True, close_fds=True)
    return AgentConnection(popen, host, local=False, diagnostics=diagnostics)
