"""A real two-node Slurm cluster on one machine for tflaunch's tests (Debian's Slurm 22.05 + munge).

Importable without pytest::

    from tests.infra.hosts import start_netns
    from tests.infra.slurm import missing_requirements, start_cluster
    hosts = start_netns("/var/tmp/tflaunch-infra-%d/netns" % os.getpid(), names=("h1", "h2"))
    with start_cluster("/var/tmp/tflaunch-infra-%d/slurm" % os.getpid(), hosts) as cluster:
        cluster.command("srun", "-N2", "-n4", "hostname").stdout     # h1 h1 h2 h2 (some order)
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})
    hosts.stop()

slurmctld runs in the root network namespace (SlurmctldHost = this machine's hostname at the bridge
address PREFIX.1 of ``hosts``); one slurmd per node runs inside that host's network namespace with its own
UTS namespace (``hostname`` prints the node name), so each node has its own address and hostname while
all share the filesystem.  The ports are picked free at start, state, spool, TmpFS and logs live under
``workdir`` (wiped at start), and the configuration is ``workdir/tflaunch-slurm-<pid>.conf``: the pid of
the process that owns the cluster, so that daemons of a crashed session (whose pid is gone) are found and
killed by the next start.  There is no slurmdbd: use ``scontrol show job``, not ``sacct``.

munged is shared by every cluster on the machine: it is started only if none runs, and stopped at
``stop()`` only if this cluster started it and no other Slurm daemon still runs.

Needs root, slurmctld, slurmd, slurm-client and munge (``tests/infra/setup.sh`` installs them).
"""
from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

from tests.infra.hosts import SshHosts, _descendants, _log_tail, _popen, _signal_group

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_SOCKET = MUNGE_RUN_DIR / "munge.socket.2"
CLUSTER_NAME = "tfltest"
PARTITION = "debug"
START_TIMEOUT = 30.0          # seconds until every node is idle
CANCEL_TIMEOUT = 15.0         # seconds cancel_all() waits for squeue to empty
STOP_TIMEOUT = 5.0            # seconds between SIGTERM and SIGKILL
_CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "salloc")
_TOOLS = ("nsenter", "unshare")
_DAEMONS = ("slurmctld", "slurmd", "slurmstepd")
_CONF_RE = re.compile(r"tflaunch-slurm-(\d+)\.conf")
_INFRA_RE = re.compile(r"/var/tmp/tflaunch-infra-(\d+)/")


class SlurmCluster:
    """A running cluster.  Client commands need ``env`` (``SLURM_CONF``) merged into their environment;
    ``command(...)`` does that for you."""

    def __init__(self, workdir: Path, conf: Path, nodes: Sequence[str], namespaces: Dict[str, str]) -> None:
        self.workdir: Path = workdir
        self.conf: str = str(conf)
        self.env: Dict[str, str] = {"SLURM_CONF": str(conf)}
        self.nodes: List[str] = list(nodes)
        self.partition: str = PARTITION
        self.namespaces: Dict[str, str] = dict(namespaces)     # node -> netns name
        self.ctld_port: int = 0
        self.slurmd_port: int = 0
        self.start_seconds: float = 0.0                       # how long start_cluster() took
        self.procs: Dict[str, subprocess.Popen] = {}          # "slurmctld", "slurmd-<node>"
        self.munged: Optional[subprocess.Popen] = None        # only if this cluster started munged
        self._stopped = False
        atexit.register(self.stop)

    # -- clients --------------------------------------------------------------------------------------

    def client_env(self) -> Dict[str, str]:
        """os.environ without inherited SLURM_* variables, plus ``env``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        return env

    def command(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client (``command("srun", "-N2", "hostname")``) to completion with ``env``;
        text output captured, no check of the exit status."""
        return subprocess.run(list(argv), env=self.client_env(), capture_output=True, text=True,
                              errors="replace", stdin=subprocess.DEVNULL, timeout=timeout)

    def jobs(self) -> List[str]:
        """Ids of the jobs slurmctld still has pending, running or completing (``squeue -h -o %i``;
        finished jobs are kept for MinJobAge=600 s but squeue does not list them)."""
        res = self.command("squeue", "-h", "-o", "%i")
        if res.returncode != 0:
            raise RuntimeError(f"squeue failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.split()

    def job_state(self, job_id: str) -> Optional[str]:
        """``JobState`` of a job from ``scontrol show job`` (e.g. RUNNING, COMPLETED), None if unknown."""
        res = self.command("scontrol", "show", "job", str(job_id))
        m = re.search(r"\bJobState=(\S+)", res.stdout)
        return m.group(1) if res.returncode == 0 and m else None

    def wait_job(self, job_id: str, states: Iterable[str] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                              "DEADLINE", "PREEMPTED"),
                 timeout: float = 30) -> str:
        """Poll ``job_state`` until it is one of ``states`` (default: any final state); returns it, or
        raises AssertionError with the job record after ``timeout`` seconds."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                record = self.command("scontrol", "show", "job", str(job_id))
                raise AssertionError(f"job {job_id} is {state}, not one of {sorted(wanted)}, after {timeout} s:\n"
                                     f"{record.stdout}{record.stderr}")
            time.sleep(0.05)

    # -- cleanup --------------------------------------------------------------------------------------

    def cancel_all(self, timeout: float = CANCEL_TIMEOUT) -> None:
        """scancel every job, wait until squeue is empty (at most ``timeout`` s), give the slurmstepd's of
        finished steps a moment to exit, then SIGKILL any slurmstepd left on this cluster's nodes together
        with the tasks under it."""
        deadline = time.monotonic() + timeout
        ids: List[str] = []
        if self._ctld_alive():
            try:
                ids = self.jobs()
                if ids:
                    self.command("scancel", *ids)
                while ids and time.monotonic() < deadline:
                    time.sleep(0.1)
                    ids = self.jobs()
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if not ids:
            grace = time.monotonic() + min(2.0, max(0.0, deadline - time.monotonic()))
            while self.stepd_pids() and time.monotonic() < grace:
                time.sleep(0.05)
        _kill_tree(self.stepd_pids())

    def stepd_pids(self) -> List[int]:
        """slurmstepd processes in this cluster's node namespaces (they outlive slurmd)."""
        inodes = set()
        for ns in self.namespaces.values():
            try:
                inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
            except OSError:
                pass
        out = []
        for pid in _pids_named("slurmstepd"):
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                    out.append(pid)
            except OSError:
                continue
        return out

    def stop(self) -> None:
        """Cancel all jobs, stop the slurmd's and slurmctld (SIGTERM, then SIGKILL after STOP_TIMEOUT s)
        and munged if this cluster started it and no other Slurm daemon runs.  Idempotent; leaves
        ``workdir`` (logs) in place."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.cancel_all(timeout=5)
        except Exception:     # never let a broken cluster keep its daemons
            pass
        _terminate(list(self.procs.values()))
        _kill_tree(self.stepd_pids())
        if self.munged is not None and not _other_slurm_daemons():
            _terminate([self.munged])
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SlurmCluster(conf={self.conf!r}, nodes={self.nodes!r}, ctld_port={self.ctld_port})"

    # -- internals ------------------------------------------------------------------------------------

    def _ctld_alive(self) -> bool:
        proc = self.procs.get("slurmctld")
        return proc is not None and proc.poll() is None


def missing_requirements() -> Optional[str]:
    """Why a Slurm test cluster cannot run here (a reason for pytest.skip), or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the Slurm test cluster needs root (slurmd runs as root in network namespaces)"
    for daemon in (SLURMCTLD, SLURMD, MUNGED):
        if not os.access(daemon, os.X_OK):
            return f"{daemon} not found (run tests/infra/setup.sh or install slurmctld slurmd munge)"
    for tool in _CLIENTS + _TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found (run tests/infra/setup.sh or install slurm-client)"
    try:
        import pwd
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (install munge)"
    return None


def start_cluster(workdir: str, hosts: SshHosts, names: Sequence[str] = ("h1", "h2"),
                  cpus: int = 2) -> SlurmCluster:
    """Start slurmctld (root namespace) and one slurmd per name in ``hosts``' network namespaces;
    return once ``sinfo`` shows every node idle (RuntimeError with log tails after START_TIMEOUT s).

    ``hosts`` must come from ``start_netns`` and contain ``names``.  ``workdir`` is created if missing;
    its state, spool, tmp and logs are wiped so that a cluster can be started again in the same dir."""
    t0 = time.monotonic()
    names = list(names)
    if hosts.bridge is None or not hosts.namespaces:
        raise ValueError("start_cluster needs hosts from start_netns (network namespaces and a bridge)")
    unknown = [n for n in names if n not in hosts.namespaces]
    if unknown:
        raise ValueError(f"no such netns hosts: {unknown} (have {sorted(hosts.namespaces)})")
    _cleanup_stale()
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    conf = wd / f"tflaunch-slurm-{os.getpid()}.conf"
    _kill_tree(_daemons_using(str(conf)))        # an earlier cluster of this process in the same dir
    for sub in ("state", "spool", "tmp"):
        shutil.rmtree(wd / sub, ignore_errors=True)
    for log in wd.glob("*.log"):
        log.unlink()
    for sub in ["state"] + [f"spool/{n}" for n in names] + [f"tmp/{n}" for n in names]:
        (wd / sub).mkdir(parents=True)

    cluster = SlurmCluster(wd, conf, names, {n: hosts.namespaces[n] for n in names})
    try:
        cluster.ctld_port, cluster.slurmd_port = _free_ports(2)
        bridge_addr = _bridge_address(hosts)
        conf.write_text(_slurm_conf(wd, socket.gethostname().split(".")[0], bridge_addr, cluster.ctld_port,
                                    cluster.slurmd_port, {n: hosts.addresses[n] for n in names}, cpus))
        cluster.munged = _ensure_munged(wd)
        env = cluster.client_env()
        cluster.procs["slurmctld"] = _popen([SLURMCTLD, "-D", "-i", "-f", str(conf)], wd / "slurmctld.out", env)
        for name in names:
            q = shlex.quote
            script = f"hostname {q(name)}; exec {SLURMD} -D -N {q(name)} -f {q(str(conf))}"
            cmd = ["nsenter", f"--net=/run/netns/{hosts.namespaces[name]}", "unshare", "--uts", "sh", "-c", script]
            cluster.procs[f"slurmd-{name}"] = _popen(cmd, wd / f"slurmd-{name}.out", env)
        _wait_idle(cluster)
    except BaseException:
        cluster.stop()
        raise
    cluster.start_seconds = time.monotonic() - t0
    return cluster


# ---------------------------------------------------------------------------------------------------

def _slurm_conf(wd: Path, ctld_host: str, ctld_addr: str, ctld_port: int, slurmd_port: int,
                addresses: Dict[str, str], cpus: int) -> str:
    lines = [
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={ctld_host}({ctld_addr})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={wd}/state",
        f"SlurmdSpoolDir={wd}/spool/%n",
        f"TmpFS={wd}/tmp/%n",
        f"SlurmctldPidFile={wd}/slurmctld.pid",
        f"SlurmdPidFile={wd}/slurmd-%n.pid",
        f"SlurmctldLogFile={wd}/slurmctld.log",
        f"SlurmdLogFile={wd}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=0",     # sbatch job COMPLETED in ~1 s instead of 2-3 s
        "MpiDefault=none",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SlurmdParameters=config_overrides",
        "MailProg=/bin/true",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=600",
        "OverTimeLimit=0",
    ]
    for name, addr in addresses.items():
        lines.append(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory=2000 State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _bridge_address(hosts: SshHosts) -> str:
    """The root namespace's address on the hosts' bridge (PREFIX.1)."""
    res = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", str(hosts.bridge)], capture_output=True,
                         text=True)
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", res.stdout)
    if m:
        return m.group(1)
    any_addr = next(iter(hosts.addresses.values()))
    return any_addr.rsplit(".", 1)[0] + ".1"


def _free_ports(n: int) -> List[int]:
    """n distinct TCP ports free on all addresses of the root namespace (held open together so they
    differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ensure_munged(wd: Path) -> Optional[subprocess.Popen]:
    """Start munged (as user munge, foreground, own session) unless one runs and answers; returns it
    if started.  A munged that is still starting (or shutting down) is given a few seconds."""
    deadline = time.monotonic() + 5
    while _pids_named("munged"):
        if _munge_works():
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"munged runs (pids {_pids_named('munged')}) but does not answer on {MUNGE_SOCKET}")
        time.sleep(0.05)
    import pwd
    pw = pwd.getpwnam("munge")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        os.chown(MUNGE_KEY.parent, pw.pw_uid, pw.pw_gid)
        os.chmod(MUNGE_KEY.parent, 0o700)
        fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(MUNGE_KEY, pw.pw_uid, pw.pw_gid)
    MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(MUNGE_RUN_DIR, pw.pw_uid, pw.pw_gid)
    os.chmod(MUNGE_RUN_DIR, 0o755)
    log = wd / "munged.out"
    with open(log, "ab") as f:
        proc = subprocess.Popen([MUNGED, "-F"], stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                start_new_session=True, close_fds=True, user=pw.pw_uid, group=pw.pw_gid,
                                extra_groups=[], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"munged exited with {proc.returncode}; {log}:\n{_log_tail(log)}")
        if _munge_works():
            return proc
        if time.monotonic() > deadline:
            _terminate([proc])
            raise RuntimeError(f"munged not answering on {MUNGE_SOCKET} after 10 s; {log}:\n{_log_tail(log)}")
        time.sleep(0.05)


def _munge_works() -> bool:
    if not MUNGE_SOCKET.exists():
        return False
    if shutil.which("munge") is None:
        return True
    return subprocess.run(["munge", "-n"], capture_output=True, timeout=5).returncode == 0


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while True:
        for label, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {proc.returncode} during start\n{_logs(cluster)}")
        try:
            res = cluster.command("sinfo", "-h", "-o", "%n %t", timeout=10)
            last = (res.stdout + res.stderr).strip()
            states = dict(line.split(None, 1) for line in res.stdout.splitlines() if len(line.split()) == 2)
            if res.returncode == 0 and all(states.get(n) == "idle" for n in cluster.nodes):
                return
        except subprocess.TimeoutExpired:
            last = "sinfo timed out"
        if time.monotonic() > deadline:
            raise RuntimeError(f"Slurm nodes {cluster.nodes} not idle after {START_TIMEOUT} s; sinfo said:\n"
                               f"{last}\n{_logs(cluster)}")
        time.sleep(0.1)


def _logs(cluster: SlurmCluster) -> str:
    wd = cluster.workdir
    files = [wd / "slurmctld.log", wd / "slurmctld.out"]
    for n in cluster.nodes:
        files += [wd / f"slurmd-{n}.log", wd / f"slurmd-{n}.out"]
    return "\n".join(f"--- {f}:\n{_log_tail(f)}" for f in files if f.exists())


def _terminate(procs: List[subprocess.Popen]) -> None:
    """SIGTERM each process group, wait STOP_TIMEOUT s, SIGKILL what is left, reap."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for p in live:
        try:
            p.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _pids_named(comm: str) -> List[int]:
    """Live (not zombie) processes whose comm is ``comm``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            if name == comm and rest.split()[0] != "Z":
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _kill_tree(pids: Iterable[int]) -> None:
    """SIGKILL the processes and all their descendants (collected first), and wait up to 2 s."""
    roots = [p for p in pids if p != os.getpid()]
    if not roots:
        return
    victims: Set[int] = set()
    for root in roots:
        victims.update([root, *_descendants(root)])
    victims.discard(os.getpid())
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2
    while any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _daemon_refs(pid: int) -> str:
    """Command line plus SLURM_CONF of a process (where its configuration lives)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(b"SLURM_CONF="):
                    text += " " + var.decode(errors="replace")
        return text
    except OSError:
        return ""


def _daemons_using(conf: str) -> List[int]:
    """slurmctld/slurmd/slurmstepd processes whose command line or SLURM_CONF names ``conf``."""
    return [pid for comm in _DAEMONS for pid in _pids_named(comm) if conf in _daemon_refs(pid)]


def _other_slurm_daemons() -> bool:
    return any(_pids_named(comm) for comm in _DAEMONS)


def _cleanup_stale() -> None:
    """Kill slurmctld/slurmd/slurmstepd of crashed sessions: their configuration
    (tflaunch-slurm-<pid>.conf or a /var/tmp/tflaunch-infra-<pid>/ dir) names a pid that no longer runs."""
    me = os.getpid()
    stale = []
    for comm in _DAEMONS:
        for pid in _pids_named(comm):
            refs = _daemon_refs(pid)
            owners = {int(m) for m in _CONF_RE.findall(refs) + _INFRA_RE.findall(refs)}
            if any(o != me and not os.path.exists(f"/proc/{o}") for o in owners):
                stale.append(pid)
    _kill_tree(stale)
