"""tflaunch agent: the one process tflaunch runs on a host next to the job's processes.

The launcher starts it locally or over ssh and talks to it through its stdin/stdout. It answers a
setup with ``hello`` (host name, whether the launcher's working directory is visible here, ports it
reserved), receives the job's files when they are not, starts each process in a session of its own,
writes their output to files or relays it over the connection, reports ``started``/``exited``/``done``,
obeys ``terminate``/``kill``, sends ``./outputs`` and ``./logs`` back on request, and, when its stdin
reaches end-of-file because the launcher went away for any reason (even ``kill -9``, or a dropped ssh
connection), stops everything the run started: SIGTERM, a short grace, then SIGKILL. So it does when
the setup gives it a lease (``lease_timeout``) and nothing at all arrives on its stdin for that long: the
launcher pings while it lives, and a host cut off from it (a link that is down, where no end-of-file ever
comes) stops its processes on its own; a write to its stdout that cannot go on never holds it past the
lease (stdout is non-blocking; what stdin brings while a write waits counts and is kept). "Everything" is
every member of the processes' process groups plus every process whose environment carries the run's
token (``TFLAUNCH_RUN_ID=<id>``), which catches descendants that started sessions of their own, and
never touches another run's processes.

It uses the standard library only, because it is shipped to the host as source text over the launcher's
connection (nothing is installed on the host beforehand): this module and its parts,
:mod:`tflaunch.remote.agent_host` (the host: ports, GPUs, the report, a run's processes by token) and
:mod:`tflaunch.remote.agent_run` (output relay, processes, helpers, files), joined into ONE program by
:func:`tflaunch.remote.bundle.shipped_source` (:data:`tflaunch.remote.bundle.AGENT`).

Protocol. stdin: the setup (10 ASCII digits giving its length, then JSON), then commands, one JSON
object per line; a command with ``"n": N`` is followed by N raw bytes. stdout: events, same framing.

- setup: ``{"token", "agent_id", "grace", "orphan_grace", "probe": {"path", "content"} | null, "ports": N,
  "scratch_root": dir | null, "gpus": bool (report this host's GPUs), "processes": [...] (optional: start
  at once), "sweep": bool (an MPI job: stopping means every process of the run on this host, whoever
  started it), "rank": {"files": {name: [text, mode]}, "cwd" (optional)} (an MPI job: the rank wrapper
  and mpirun's helper files, written in rank_dir)}``
- process: ``{"index", "argv", "cwd", "env" (added to the agent's environment), "stdout", "stderr"}``
  where the streams are file paths (appended to) or null (relayed as ``output`` events)
- commands: ``start {processes}``, ``terminate {grace, indices (optional: only these processes)}``,
  ``kill``, ``ping`` (nothing to do: the launcher is there), ``data`` + bytes (a tar upload),
  ``unpack {dest, owned (optional: remove dest when the agent ends)}``, ``collect {dir, names}``,
  ``cleanup``, ``rank_cwd {cwd, info}`` (where this host's ranks run, and what else they need: ``info``
  ``{"python", "data"}``, with the ``--setup`` changes added: see tflaunch.remote.rank), ``sweep {grace}`` (stop every
  process of the run on this host now), ``signal {signal, indices (optional)}`` (the hang watchdog's
  stack request: send the signal, by name such as ``"SIGURG"``, to each of these processes that catches
  it; in sweep mode to the run's ranks found on this host by ``TFLAUNCH_RANK``; answered by ``signalled``),
  ``exec {id, argv, cwd, env, capture_env, owns}`` (a helper
  process before the job's: a ``--setup`` shell, an environment build, a data copy; its output comes
  back as ``exec_output`` events; ``capture_env``: the environment it leaves in ``$TFLAUNCH_ENV_OUT``
  (JSON) is what the later processes of this host start from; ``owns``: a path it creates that the agent
  removes when it ends or at ``cleanup``, unless ``keep``)
- setup ``lease_timeout`` (optional; seconds, absent or 0: no lease): hearing nothing on stdin (any bytes
  count) for that long is as if stdin ended; the launcher sends ``ping`` (a command with no answer) often
  enough while it holds the connection
- setup may also carry ``home_probe`` (like ``probe``, for the home: hello says ``home_shared``),
  ``paths`` (hello says which of them exist here: ``{path: "dir" | "file" | null}``) and ``keep`` (keep
  owned paths at the end)
- events: ``hello {hostname, pid, shared, home_shared, scratch, ports, python, executable, paths, gpus: {visible,
  found, error}}``, ``exec_output {id, fd}`` + bytes, ``exec_done {id, returncode}``, ``started {index, pid}``,
  ``spawn_failed {index, error}``, ``output {index, fd}`` + bytes, ``exited {index, pid, returncode}``,
  ``done``, ``unpacked``, ``data`` + bytes then ``collected {bytes, discarded}``, ``cleaned``, ``rank_ready {dir}``,
  ``swept {count}``, ``signalled {signal, ranks: {index: "sent" | "no handler" | "exited"}}``,
  ``error {cmd, error}``
- setup ``report`` (optional; ``{python, packages, mpirun, gpus, home, scratch, timeout}``, see
  :func:`host_report`): the hello then carries ``report``, this host as the job would find it (the job's
  Python and package versions from metadata, mpirun's raw ``--version``, GPUs, free disk, the clock)
"""
import json
import os
import select
import signal
import sys
import time

from .agent_host import PORT_LEASE, find_gpus, host_report, lease_dir, rank_dir, run_pids, stop_run  # joined when shipped
from .agent_run import Files, Helpers, Processes, Relay  # joined when shipped

__all__ = ["Agent", "main", "PORT_LEASE", "find_gpus", "host_report", "rank_dir", "run_pids", "stop_run"]


class Agent:
    """One host's share of a run: the protocol (setup reply, commands, events) and the main loop; the
    work is done by what it owns: :class:`Processes`, :class:`Helpers`, :class:`Files`, :class:`Relay`."""

    def __init__(self, spec):
        self.spec = spec
        self.token = spec["token"]
        self.agent_id = "%s:%s" % (self.token, spec.get("agent_id", 0))
        self.grace = float(spec.get("grace", 10))
        self.orphan_grace = float(spec.get("orphan_grace", 2))
        self.lease = float(spec.get("lease_timeout") or 0)  # 0 (or an older setup without it): no lease
        self.heard = time.monotonic()  # when the launcher was last heard from (any bytes on stdin)
        self.inbox = bytearray()  # what stdin brought while a write waited: read there, run by the loop
        self.orphaned = False
        self.pending = None  # a command waiting for its n bytes of data
        scratch = scratch_dir(spec.get("scratch_root"), "%s-%s" % (self.token, spec.get("agent_id", 0)))
        self.files = Files(self.token, scratch, bool(spec.get("keep")), self.send)
        self.relay = Relay(self.send)
        pgids = set()  # every process group this agent started: the job's and the helpers'
        self.helpers = Helpers(self.token, self.agent_id, pgids, self.relay, self.files, self.send)
        self.processes = Processes(self.token, self.agent_id, self.grace, bool(spec.get("sweep")), pgids,
                                   self.relay, self.helpers.base_env, self.send)

    # -- output ---------------------------------------------------------------------------------------
    def send(self, obj, data=None):
        if self.orphaned:
            return
        if data is not None:
            obj["n"] = len(data)
        payload = (json.dumps(obj) + "\n").encode()
        if data:
            payload += data
        view = memoryview(payload)
        while view:
            try:
                view = view[os.write(1, view):]
            except BlockingIOError:  # the connection is full: wait, but not past the lease
                if not self.writable():
                    self.orphan()
                    return
            except OSError:
                self.orphan()
                return

    def writable(self):
        """Wait until stdout (non-blocking, see :meth:`loop`) takes more; meanwhile read stdin into
        :attr:`inbox`, so that the launcher, which may be writing to us, is heard and never blocked. False:
        stdin ended, or nothing came for the lease time (a link that is down): the launcher is gone."""
        while True:
            wait = max(0.0, self.heard + self.lease - time.monotonic()) if self.lease else None
            try:
                readable, writable, _ = select.select([0], [1], [], wait)
            except InterruptedError:
                continue
            if writable:
                return True
            if readable:
                try:
                    data = os.read(0, 1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    return False
                self.inbox += data
                self.heard = time.monotonic()
            elif self.lease and self.lease_over():
                return False

    def lease_over(self):
        """Whether the lease ran out: nothing heard for its time, and nothing waiting on stdin either (what
        came while a long command ran, unpacking a big upload say, is heard late, not missed)."""
        if time.monotonic() - self.heard < self.lease or select.select([0], [], [], 0)[0]:
            return False
        try:
            sys.stderr.write("tflaunch agent: nothing from the launcher for %g s; stopping the run\n" % self.lease)
        except (OSError, ValueError):  # (stderr shared with the non-blocking stdout, and full)
            pass
        return True

    def orphan(self):
        if not self.orphaned:
            self.orphaned = True
            self.processes.terminate(self.orphan_grace)

    def hello(self):
        spec = self.spec
        shared = None
        probe = spec.get("probe")
        if probe:
            try:
                with open(probe["path"], "r") as fh:
                    shared = fh.read() == probe["content"]
            except (OSError, ValueError):
                shared = False
        home_shared = None
        if spec.get("home_probe"):
            try:
                with open(spec["home_probe"]["path"], "r") as fh:
                    home_shared = fh.read() == spec["home_probe"]["content"]
            except (OSError, ValueError):
                home_shared = False
        paths = {}
        for path in spec.get("paths") or ():
            paths[path] = "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else None
        ports = []
        if spec.get("ports"):  # bound and held until the processes start: no one else gets them
            directory = lease_dir(os.path.dirname(self.files.scratch))
            ports = self.processes.hold_ports(int(spec["ports"]), directory)
        rank = spec.get("rank")
        rank_error = None
        if rank:
            try:
                self.files.write_rank(rank.get("files"), rank.get("cwd"))
            except OSError as exc:
                rank_error = "cannot write the MPI rank wrapper: %s" % exc
        self.send({"event": "hello", "hostname": os.uname().nodename, "pid": os.getpid(), "shared": shared,
                   "home_shared": home_shared, "paths": paths, "executable": sys.executable,
                   "scratch": self.files.scratch, "ports": ports, "python": sys.version.split()[0],
                   "gpus": find_gpus() if spec.get("gpus") else None, "rank_dir": self.files.rank_files,
                   "rank_error": rank_error,
                   **({"report": host_report(spec["report"])} if "report" in spec else {})})

    # -- commands -------------------------------------------------------------------------------------
    def command(self, cmd, data):
        name = cmd.get("cmd")
        try:
            if name == "start":
                self.processes.start(cmd["processes"])
            elif name == "terminate":
                self.processes.terminate(float(cmd.get("grace", self.grace)), cmd.get("indices"))
            elif name == "kill":
                self.processes.kill_now()
            elif name == "data":
                self.files.receive(data)
            elif name == "unpack":
                self.files.unpack(cmd["dest"], cmd.get("owned"))
            elif name == "exec":
                self.helpers.start(cmd)
            elif name == "collect":
                self.files.collect(cmd["dir"], cmd["names"])
            elif name == "cleanup":
                self.files.cleanup()
                self.send({"event": "cleaned"})
            elif name == "rank_cwd":
                info = dict(cmd.get("info") or {})
                if self.helpers.setup_env:
                    info["setup_env"] = self.helpers.setup_env
                files = {"host.%s.json" % os.uname().nodename: [json.dumps(info), 0o644]} if info else None
                directory = self.files.write_rank(files, cmd["cwd"])  # (other files: at hello)
                self.send({"event": "rank_ready", "dir": directory})
            elif name == "sweep":
                count = self.processes.stop_mine(float(cmd.get("grace", 1.0)))
                self.send({"event": "swept", "count": count})
            elif name == "signal":
                ranks = self.processes.signal_ranks(cmd["signal"], cmd.get("indices"))
                self.send({"event": "signalled", "signal": cmd["signal"], "ranks": ranks})
            elif name == "ping":
                pass  # the launcher is there: hearing it (any bytes) is all a ping is for
        except Exception as exc:  # report, never die: the launcher decides what a failure means
            self.send({"event": "error", "cmd": name, "error": "%s: %s" % (type(exc).__name__, exc)})

    def feed(self, buf):
        """Run the complete commands in ``buf``; return what is left (a partial command)."""
        while True:
            if self.pending is not None:
                cmd = self.pending
                if len(buf) < cmd["n"]:
                    return buf
                data, buf = buf[:cmd["n"]], buf[cmd["n"]:]
                self.pending = None
                self.command(cmd, data)
                continue
            line, sep, rest = buf.partition(b"\n")
            if not sep:
                return buf
            buf = rest
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if isinstance(cmd, dict) and cmd.get("n"):
                self.pending = cmd
            elif isinstance(cmd, dict):
                self.command(cmd, b"")

    # -- main loop ------------------------------------------------------------------------------------
    def loop(self):
        processes, helpers = self.processes, self.helpers
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: processes.terminate(self.grace))
        for sig in (signal.SIGINT, signal.SIGHUP):  # a handler, not SIG_IGN: exec resets handlers only
            signal.signal(sig, lambda *_: None)
        for fd in (0, 1):  # a write that cannot go on (a link that is down) must not hold the loop: send()
            try:
                os.set_blocking(fd, False)
            except OSError:
                pass
        self.hello()
        if self.spec.get("processes") is not None:
            processes.start(self.spec["processes"])
        buf = b""
        while True:
            if self.inbox and not self.orphaned:  # read while a write waited: before anything read later
                data, self.inbox = bytes(self.inbox), bytearray()
                buf = self.feed(buf + data)
            if helpers.aux:
                helpers.reap()
            running = processes.reap()
            if processes.started and not running and not processes.finished:
                processes.finish()
            if self.orphaned and not running and not helpers.aux:
                break
            fds = [wake_r] + self.relay.fds() + ([] if self.orphaned else [0])
            timeout = processes.timeout(0.5)
            if self.lease and not self.orphaned:
                timeout = max(0.0, min(timeout, self.heard + self.lease - time.monotonic()))
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                ready = []
            for fd in ready:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd == 0:
                    if self.orphaned:  # (by a write just now)
                        continue
                    try:
                        data = os.read(0, 1 << 20)
                    except BlockingIOError:  # taken already, by a write that waited (see writable())
                        continue
                    if not data:
                        self.orphan()
                    else:
                        self.heard = time.monotonic()
                        if self.inbox:  # what a write took first comes first
                            data, self.inbox = bytes(self.inbox) + data, bytearray()
                        buf = self.feed(buf + data)
                else:
                    self.relay.relay(fd)
            if self.lease and not self.orphaned and self.lease_over():
                self.orphan()  # as if stdin ended: the launcher is gone, or cut off from this host
            processes.kill_overdue()
        if processes.stop_left():
            self.files.leave(kept=bool(processes.procs) or processes.sweep)
        else:
            self.files.cleanup()  # nothing ran: a half-finished upload is of no use to anyone


def scratch_dir(root, name):
    """This agent's private directory on this host: ROOT/tflaunch-UID/NAME (ROOT: $TMPDIR or /tmp)."""
    root = root or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(root, "tflaunch-%d" % os.getuid(), name)


def read_exact(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("launcher closed the connection")
        data += chunk
    return data


def main():
    """Read a length-prefixed spec (10 ASCII digits, then JSON) from stdin and run it."""
    try:
        spec = json.loads(read_exact(0, int(read_exact(0, 10))))
    except (EOFError, ValueError) as exc:
        sys.stderr.write("tflaunch agent: bad spec: %s\n" % exc)
        return 3
    Agent(spec).loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
