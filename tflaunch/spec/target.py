"""Compute targets: where a job's processes run (``compute_target=`` of an estimator).

``"local"`` (or ``None``) is this machine, or the hosts of the Slurm/PBS allocation tflaunch runs in
(inside Slurm the processes start as one ``srun`` step); :class:`SSHTarget` is a list of hosts reached
with the OpenSSH client; :class:`SlurmTarget` is an allocation still to be asked for with ``sbatch``.
:func:`resolve_target` turns any of them into the recorded form (``JobSpec.compute_target``): the
hosts the job uses, how to reach them (:func:`allocation_target` fills in a submitted job's hosts
once it runs). Any object with a ``recorded(node_count, procs_per_node, world)`` method is a compute
target (a scheduler's target class need not be listed here); the recorded ``kind`` of one that is
submitted names its scheduler (:mod:`tflaunch.schedule`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ..errors import SpecError
from .hosts import Host, discover, parse_hostfile, parse_hosts, select_hosts
from ..launch.ssh import DEFAULT_CONNECT_TIMEOUT, SshOptions

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["SSHTarget", "SlurmTarget", "is_target", "resolve_target", "allocation_target", "LAUNCHERS"]

LAUNCHERS = ("srun", "ssh")  # how processes start inside a Slurm allocation (default srun)


class SSHTarget:
    """Hosts reached over SSH, each with a number of slots (processes it takes).

    ``hosts``: ``["node1:4", "node2:4"]``, ``"node1:4,node2:4"`` or :class:`~tflaunch.spec.hosts.Host`
    objects. ``ssh_port``/``ssh_options`` (``"KEY=VALUE"`` each, passed as ``-o``)/``ssh_config`` (``-F``)
    /``connect_timeout`` tune the ssh client; the user's ``~/.ssh/config`` applies otherwise.
    ``oversubscribe`` allows more processes per host than slots; ``keep_remote`` keeps the per-run
    scratch directories on hosts without a shared filesystem; ``remote_scratch`` is where those go
    (default: ``$TMPDIR`` or ``/tmp`` on each host).
    """

    def __init__(self, hosts: Sequence[str | Host] | str, *, ssh_port: int | None = None,
                 ssh_options: Sequence[str] = (), ssh_config: str | os.PathLike | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, oversubscribe: bool = False,
                 keep_remote: bool = False, remote_scratch: str | None = None, source: str = "hosts",
                 launcher: str = "ssh") -> None:
        if isinstance(hosts, str):
            parsed = parse_hosts(hosts, source)
        elif isinstance(hosts, Sequence) and hosts:
            parsed = []
            for item in hosts:
                if isinstance(item, Host):
                    parsed.append(item)
                elif isinstance(item, str):
                    parsed += parse_hosts(item, source)
                else:
                    raise SpecError(f"{source}: expected 'HOST' or 'HOST:SLOTS' strings, got {item!r}")
            parse_hosts(",".join(f"{h.name}:{h.slots}" if ":" not in h.name else f"[{h.name}]:{h.slots}"
                                 for h in parsed), source)  # the same checks (duplicates, names) for every form
        else:
            raise SpecError(f"{source}: give at least one host, got {hosts!r}")
        self.hosts: list[Host] = parsed
        if ssh_port is not None and (isinstance(ssh_port, bool) or not isinstance(ssh_port, int)
                                     or not 0 < ssh_port < 65536):
            raise SpecError(f"ssh_port (--ssh-port): must be a port number 1-65535, got {ssh_port!r}")
        options = list(ssh_options)
        for option in options:
            if not isinstance(option, str) or "=" not in option or option.startswith("-"):
                raise SpecError(f"ssh_options (--ssh-option): expected KEY=VALUE (as ssh -o takes it), got {option!r}")
        if ssh_config is not None:
            ssh_config = os.path.abspath(os.fspath(ssh_config))
            if not os.path.isfile(ssh_config):
                raise SpecError(f"ssh_config (--ssh-config): {ssh_config} is not a file")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise SpecError(f"connect_timeout (--connect-timeout): must be a number of seconds > 0, got {connect_timeout!r}")
        self.ssh = SshOptions(port=ssh_port, options=options, config=ssh_config, connect_timeout=float(connect_timeout))
        self.oversubscribe = bool(oversubscribe)
        self.keep_remote = bool(keep_remote)
        self.remote_scratch = remote_scratch
        self.source = source
        if launcher not in LAUNCHERS or (launcher == "srun" and source != "SLURM_JOB_NODELIST"):
            raise SpecError(f"launcher (--launcher): {launcher!r}: srun only for the hosts of a Slurm allocation, "
                            "ssh otherwise")
        self.launcher = launcher

    @classmethod
    def from_hostfile(cls, path: str | os.PathLike, **kwargs: Any) -> SSHTarget:
        """Hosts from an Open MPI / horovodrun / DeepSpeed hostfile (``host slots=N`` lines)."""
        path = os.fspath(path)
        return cls(parse_hostfile(path), source=f"hostfile {path}", **kwargs)

    def __repr__(self) -> str:
        return f"SSHTarget(hosts={[f'{h.name}:{h.slots}' for h in self.hosts]!r})"

    def recorded(self, node_count: int, procs_per_node: int, world: int = 0) -> dict[str, Any]:
        """The recorded form: the ``node_count`` hosts the job uses and how to reach them."""
        hosts = select_hosts(self.hosts, node_count, procs_per_node, oversubscribe=self.oversubscribe,
                             source=self.source)
        return {"kind": "ssh", "source": self.source, "hosts": [[h.name, h.slots] for h in hosts],
                "ssh": self.ssh.to_dict(), "keep_remote": self.keep_remote, "remote_scratch": self.remote_scratch,
                "oversubscribe": self.oversubscribe, "launcher": self.launcher}


def is_target(target: Any) -> bool:
    """Whether ``target`` is a compute target object (it has ``recorded()``: SSHTarget, SlurmTarget, ...)."""
    return not isinstance(target, str) and callable(getattr(target, "recorded", None))


def resolve_target(target: Any, node_count: int, procs_per_node: int,
                   env: Mapping[str, str] | None = None, *, world: int = 0) -> dict[str, Any]:
    """The recorded compute target: the ``node_count`` hosts used and how to reach them.

    ``None``/``"local"``: the Slurm or PBS allocation tflaunch runs in, else this machine (which
    takes any number of processes: ``world``, the job's process count, becomes its slot count).
    """
    if is_target(target):
        return target.recorded(node_count, procs_per_node, world)
    if target is not None and not (isinstance(target, str) and target.lower() == "local"):
        raise SpecError(f"compute_target (--compute-target): {target!r} is not supported; "
                        "give 'local', an SSHTarget(hosts=[...]) or a SlurmTarget(...)")
    found, source = discover(env)
    hosts = select_hosts(found, node_count, procs_per_node, source=source)
    if found is None:
        hosts = [Host(h.name, max(h.slots, world)) for h in hosts]
    return {"kind": "local" if found is None else "ssh", "source": source,
            "hosts": [[h.name, h.slots] for h in hosts], "ssh": SshOptions().to_dict(), "keep_remote": False,
            "remote_scratch": None, "oversubscribe": False,
            "launcher": "srun" if source == "SLURM_JOB_NODELIST" else "ssh"}


class SlurmTarget:
    """An allocation to ask Slurm for: the run is submitted with ``sbatch`` (``run --slurm``) and
    starts when Slurm gives it nodes. Keyword arguments are :class:`tflaunch.slurm.SlurmOptions`
    (``partition``, ``time``, ``account``, ``qos``, ``job_name``, ``signal``, ``sbatch_args``,
    ``launcher``); ``node_count``/``process_count_per_node``/``gpus_per_node`` come from the estimator."""

    def __init__(self, **options: Any) -> None:
        from ..slurm import SlurmOptions

        try:
            self.options = SlurmOptions(**options)
        except TypeError as exc:
            raise SpecError(f"SlurmTarget: {exc}") from None

    def __repr__(self) -> str:
        return f"SlurmTarget({self.options.to_dict()!r})"

    def recorded(self, node_count: int, procs_per_node: int, world: int = 0) -> dict[str, Any]:
        """The recorded form: placeholders for the nodes Slurm will allocate (``kind: slurm``: submitted)."""
        slots = max(procs_per_node, -(-world // node_count))
        return {"kind": "slurm", "source": "sbatch", "hosts": [[f"(slurm node {i + 1})", slots] for i in range(node_count)],
                "ssh": SshOptions().to_dict(), "keep_remote": False, "remote_scratch": None, "oversubscribe": False,
                "launcher": self.options.launcher, "slurm": self.options.to_dict()}


def allocation_target(target: Mapping[str, Any], node_count: int, procs_per_node: int,
                      env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A submitted job's compute target once it runs: the hosts of the allocation it is in."""
    found, source = discover(env)
    if source != "SLURM_JOB_NODELIST":
        raise SpecError("this run was submitted to Slurm, but this process is not inside a Slurm allocation "
                        "(SLURM_JOB_ID is not set)")
    hosts = select_hosts(found, node_count, procs_per_node, source=source)
    return {**target, "kind": "ssh", "source": source, "hosts": [[h.name, h.slots] for h in hosts]}


def target_hosts(compute_target: Mapping[str, Any] | None) -> list[Host]:
    """The hosts of a recorded compute target (this machine when there is none)."""
    if not compute_target:
        return [Host("localhost", 1)]
    return [Host(str(name), int(slots)) for name, slots in compute_target["hosts"]]
