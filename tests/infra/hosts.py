"""Real SSH test hosts for tflaunch: sshd on loopback, or one sshd per network namespace.

Importable without pytest (benchmark scripts use it too)::

    from tests.infra.hosts import missing_requirements, start_loopback, start_netns
    reason = missing_requirements(netns=True)
    if reason is None:
        hosts = start_netns("/var/tmp/tflaunch-infra-%d" % os.getpid())
        subprocess.run(["ssh", "-F", hosts.config, "h1", "hostname"])   # prints h1
        hosts.stop()

Both need root, /usr/sbin/sshd, ssh, ssh-keygen, ip, unshare and nsenter (``tests/infra/setup.sh``
installs the packages on Debian/Ubuntu).

``workdir`` holds keys, sshd configs, pid and log files; it is created if missing and left in place
(the caller removes it).  Pass a directory of its own such as ``/var/tmp/tflaunch-infra-<pid>``:
it must not lie under any of the ``private_dirs`` (a host would not see its own keys) and should not be
under pytest's base temp dir, which the test fixtures hide from one host.

Loopback: one sshd on 127.0.0.1 and a free port; every alias (``loop1``, ``loop2``) is that sshd.  The
aliases exist because tflaunch treats the literal 127.0.0.1/localhost as local and would not use ssh.

Network namespaces: per host a namespace ``tfl<pid><name>`` with a veth into a bridge
``tflbr<pid>`` (subnet 10.<100+pid%100>.<(pid//100)%250>.0/24 unless taken; bridge .1, hosts .11,
.12, ...), its own UTS namespace (``hostname`` prints the alias) and, with ``private_dirs``, its own
mount namespace in which empty tmpfs mounts hide those directories (a host without the launcher's
shared filesystem).  sshd listens on port 22 inside each namespace.  Leftovers of crashed sessions
(namespaces/links named after a pid that no longer runs) are removed at start.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

SSHD = "/usr/sbin/sshd"
HOST_KEY_ALIAS = "tflaunch-test"
START_TIMEOUT = 10.0
_TOOLS = ("ssh", "ssh-keygen", "ip", "unshare", "nsenter")
_counter = 0          # SshHosts started with network namespaces by this process (keeps names unique)


class SshHosts:
    """Running test hosts.  ``ssh -F hosts.config NAME 'command'`` reaches host NAME."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config: str = str(workdir / "ssh_config")
        self.names: List[str] = []
        self.addresses: Dict[str, str] = {}
        self.ports: Dict[str, int] = {}
        self.namespaces: Dict[str, str] = {}    # alias -> netns name (netns hosts only)
        self.bridge: Optional[str] = None
        self.links: List[str] = []              # veths in the root namespace
        self.procs: Dict[str, subprocess.Popen] = {}
        self._stopped = False
        atexit.register(self.stop)

    def ssh_command(self, name: str, command: str) -> List[str]:
        return ["ssh", "-F", self.config, name, command]

    def stop(self) -> None:
        """Kill the sshd processes started (and what runs under them), delete namespaces, veths and
        bridge.  Idempotent; leaves workdir alone."""
        if self._stopped:
            return
        self._stopped = True
        pids = set()
        for proc in self.procs.values():
            pids.add(proc.pid)
            pids.update(_descendants(proc.pid))
        for ns in self.namespaces.values():
            pids.update(_netns_pids(ns))
        if not self.namespaces:
            # loopback: commands run over ssh that detached from sshd (their SSH_CONNECTION names our port)
            for port in set(self.ports.values()):
                pids.update(_ssh_session_pids(port))
        pids.discard(os.getpid())
        pgids = set()
        for proc in self.procs.values():
            pgids.add(proc.pid)          # started with start_new_session: pgid == pid
        for pgid in pgids:
            _signal_group(pgid, signal.SIGTERM)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in self.procs.values():
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pgid in pgids:
            _signal_group(pgid, signal.SIGKILL)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.namespaces.values():
            _remove_netns(ns)
        for link in self.links + ([self.bridge] if self.bridge else []):
            _ip("link", "del", link, check=False)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def __enter__(self) -> "SshHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SshHosts(config={self.config!r}, addresses={self.addresses!r})"


def missing_requirements(netns: bool = False) -> Optional[str]:
    """Why test hosts cannot run here (a reason for pytest.skip), or None if they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "SSH test hosts need root (sshd runs as root with its own config)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (run tests/infra/setup.sh or install openssh-server)"
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found (run tests/infra/setup.sh)"
    if netns:
        probe = f"tflprobe{os.getpid()}"
        res = _ip("netns", "add", probe, check=False)
        if res.returncode != 0:
            return f"network namespaces not permitted here: ip netns add: {res.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        res = _ip("link", "add", probe, "type", "bridge", check=False)
        if res.returncode != 0:
            return f"cannot create a bridge here: {res.stderr.strip()}"
        _ip("link", "del", probe, check=False)
        res = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True, text=True)
        if res.returncode != 0:
            return f"unshare --uts --mount not permitted here: {res.stderr.strip()}"
    return None


def start_loopback(workdir: str, names: Iterable[str] = ("loop1", "loop2")) -> SshHosts:
    """One sshd on 127.0.0.1 (free port); every name is an alias for it."""
    names = list(names)
    wd = _prepare_workdir(workdir)
    _cleanup_stale()
    hosts = SshHosts(wd)
    try:
        _make_keys(wd)
        port = _free_port()
        cfg = _write_sshd_config(wd, "loopback", port, "127.0.0.1")
        log = wd / "sshd-loopback.log"
        proc = _popen([SSHD, "-D", "-e", "-f", str(cfg)], log)
        hosts.procs["loopback"] = proc
        for name in names:
            hosts.names.append(name)
            hosts.addresses[name] = "127.0.0.1"
            hosts.ports[name] = port
        _write_client_config(hosts)
        _wait_listening(proc, "127.0.0.1", port, log)
    except BaseException:
        hosts.stop()
        raise
    return hosts


def start_netns(workdir: str, names: Iterable[str] = ("h1", "h2"),
                private_dirs: Optional[Dict[str, List[str]]] = None) -> SshHosts:
    """One network namespace + sshd (port 22) per name, bridged to the root namespace.

    ``private_dirs={"h2": ["/some/dir"]}`` mounts an empty tmpfs over those directories in h2's own
    mount namespace only: files the launcher writes there are invisible on h2."""
    global _counter
    names = list(names)
    private_dirs = {k: [os.path.abspath(d) for d in v] for k, v in (private_dirs or {}).items()}
    unknown = set(private_dirs) - set(names)
    if unknown:
        raise ValueError(f"private_dirs for unknown hosts: {sorted(unknown)}")
    wd = _prepare_workdir(workdir)
    for dirs in private_dirs.values():
        for d in dirs:
            if _is_under(wd, Path(d)):
                raise ValueError(f"workdir {wd} lies under private dir {d}: the host could not read its keys")
            if not os.path.isdir(d):
                raise ValueError(f"private dir {d} does not exist")
    _cleanup_stale()
    pid = os.getpid()
    tag = str(pid) if _counter == 0 else f"{pid}-{_counter}"
    _counter += 1
    hosts = SshHosts(wd)
    try:
        _make_keys(wd)
        bridge = f"tflbr{tag}"
        _check_ifname(bridge)
        prefix = _pick_subnet(pid)
        _ip("link", "del", bridge, check=False)
        _ip("link", "add", bridge, "type", "bridge")
        hosts.bridge = bridge
        _ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(names, start=1):
            ns = f"tfl{tag}{name}"
            outer, inner = f"tv{tag}-{i}", f"tp{tag}-{i}"
            _check_ifname(outer)
            _check_ifname(inner)
            addr = f"{prefix}.{10 + i}"
            _remove_netns(ns)
            _ip("link", "del", outer, check=False)
            _ip("netns", "add", ns)
            hosts.namespaces[name] = ns
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            hosts.links.append(outer)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{prefix}.1")
            hosts.names.append(name)
            hosts.addresses[name] = addr
            hosts.ports[name] = 22
        for name in names:
            ns = hosts.namespaces[name]
            cfg = _write_sshd_config(wd, name, 22, None)
            script = f"hostname {_q(name)}; "
            for d in private_dirs.get(name, []):
                script += f"mount -t tmpfs -o mode=1777 tflaunch-private {_q(d)} || exit 1; "
            script += f"exec {SSHD} -D -e -f {_q(str(cfg))}"
            cmd = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts"]
            if private_dirs.get(name):
                cmd.append("--mount")       # util-linux makes the new mount namespace private
            cmd += ["sh", "-c", script]
            hosts.procs[name] = _popen(cmd, wd / f"sshd-{name}.log")
        _write_client_config(hosts)
        for name in names:
            _wait_listening(hosts.procs[name], hosts.addresses[name], 22, wd / f"sshd-{name}.log")
    except BaseException:
        hosts.stop()
        raise
    return hosts


# ---------------------------------------------------------------------------------------------------

def _q(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def _check_ifname(name: str) -> None:
    if len(name) > 15:
        raise RuntimeError(f"interface name {name!r} longer than 15 characters")


def _is_under(path: Path, parent: Path) -> bool:
    path, parent = Path(os.path.realpath(path)), Path(os.path.realpath(parent))
    return path == parent or parent in path.parents


def _prepare_workdir(workdir: str) -> Path:
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", exist_ok=True)
    return wd


def _make_keys(wd: Path) -> None:
    for key in ("host_ed25519", "client_ed25519"):
        for f in (wd / key, wd / (key + ".pub")):
            if f.exists():
                f.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"tflaunch-{key}",
                        "-f", str(wd / key)], check=True, capture_output=True)
    os.chmod(wd / "client_ed25519", 0o600)
    shutil.copyfile(wd / "client_ed25519.pub", wd / "authorized_keys")
    kind, blob = (wd / "host_ed25519.pub").read_text().split()[:2]
    (wd / "known_hosts").write_text(f"{HOST_KEY_ALIAS} {kind} {blob}\n")


def _write_sshd_config(wd: Path, label: str, port: int, listen: Optional[str]) -> Path:
    lines = [
        f"Port {port}",
        "AddressFamily inet",
        *([f"ListenAddress {listen}"] if listen else []),
        f"HostKey {wd / 'host_ed25519'}",
        f"AuthorizedKeysFile {wd / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        f"PidFile {wd / f'sshd-{label}.pid'}",
        "LogLevel ERROR",
    ]
    if os.path.exists("/usr/lib/openssh/sftp-server"):     # scp uses the sftp protocol since OpenSSH 9
        lines.append("Subsystem sftp /usr/lib/openssh/sftp-server")
    path = wd / f"tflaunch-sshd-{os.getpid()}-{label}.conf"   # owner pid in the name: see _cleanup_stale
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_client_config(hosts: SshHosts) -> None:
    wd = hosts.workdir
    out = []
    for name in hosts.names:
        out += [f"Host {name}", f"    HostName {hosts.addresses[name]}", f"    Port {hosts.ports[name]}", ""]
    out += [
        "Host *",
        "    User root",
        f"    IdentityFile {wd / 'client_ed25519'}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {wd / 'known_hosts'}",
        "    GlobalKnownHostsFile /dev/null",
        f"    HostKeyAlias {HOST_KEY_ALIAS}",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
        "    BatchMode yes",
        "    ConnectTimeout 5",
        "    LogLevel ERROR",
    ]
    Path(hosts.config).write_text("\n".join(out) + "\n")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popen(cmd: List[str], log: Path, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        # start_new_session = setsid: the daemon leads its own process group (pgid == pid), and
        # nsenter/unshare/sh exec in place, so the pid recorded is the daemon's.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env,
                                start_new_session=True, close_fds=True)


def _log_tail(log: Path, n: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_listening(proc: subprocess.Popen, addr: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd for {addr}:{port} exited with {proc.returncode}; log {log}:\n{_log_tail(log)}")
        try:
            with socket.create_connection((addr, port), timeout=0.5) as s:
                s.settimeout(2)
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {addr}:{port} not reachable after {START_TIMEOUT} s; log {log}:\n"
                               f"{_log_tail(log)}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _netns_pids(ns: str) -> List[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()] if res.returncode == 0 else []


def _ssh_session_pids(port: int) -> List[int]:
    suffix = f" 127.0.0.1 {port}".encode()   # SSH_CONNECTION=client_ip client_port server_ip server_port
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for var in env:
            if var.startswith(b"SSH_CONNECTION=") and var.endswith(suffix):
                out.append(int(entry))
                break
    return out


def _remove_netns(ns: str) -> None:
    if not os.path.exists(f"/run/netns/{ns}"):
        return
    pids = _netns_pids(ns)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    _ip("netns", "del", ns, check=False)


def _pick_subnet(pid: int) -> str:
    """10.a.b (a /24) derived from pid, skipping subnets already assigned to an interface."""
    used = set(re.findall(r"inet (10\.\d+\.\d+)\.\d+/", _ip("-4", "addr", check=False).stdout))
    a, b = 100 + pid % 100, (pid // 100) % 250
    for k in range(250):
        prefix = f"10.{a}.{(b + k) % 250}"
        if prefix not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet for test hosts")




def _cleanup_stale() -> None:
    """Remove sshd daemons, namespaces and links left by crashed sessions (their pid no longer runs)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "sshd":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        m = re.search(r"-f \S*/tflaunch-sshd-(\d+)-\S*\.conf", cmdline)
        if m and int(m.group(1)) != me and not os.path.exists(f"/proc/{m.group(1)}"):
            _signal(int(entry), signal.SIGKILL)
    try:
        namespaces = os.listdir("/run/netns")
    except OSError:
        namespaces = []
    for ns in namespaces:
        m = re.match(r"^tfl(\d+)", ns)
        if m and not ns.startswith("tflbr") and int(m.group(1)) != me and not os.path.exists(f"/proc/{m.group(1)}"):
            _remove_netns(ns)
    links = re.findall(r"^\d+: ([^:@\s]+)", _ip("-o", "link", check=False).stdout, re.M)
    for link in links:
        m = re.match(r"^(?:tflbr|tv|tp)(\d+)", link)
        if m and int(m.group(1)) != me and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("link", "del", link, check=False)
