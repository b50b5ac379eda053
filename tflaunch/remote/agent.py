"""tflaunch agent: the one process tflaunch runs on a host next to the job's processes.

The launcher starts it locally or over ssh and talks to it through its stdin/stdout. It answers a
setup with ``hello`` (host name, whether the launcher's working directory is visible here, ports it
reserved), receives the job's files when they are not, starts each process in a session of its own,
writes their output to files or relays it over the connection, reports ``started``/``exited``/``done``,
obeys ``terminate``/``kill``, sends ``./outputs`` and ``./logs`` back on request, and, when its stdin
reaches end-of-file because the launcher went away for any reason (even ``kill -9``, or a dropped ssh
connection), stops everything the run started: SIGTERM, a short grace, then SIGKILL. "Everything" is
every member of the processes' process groups plus every process whose environment carries the run's
token (``TFLAUNCH_RUN_ID=<id>``), which catches descendants that started sessions of their own, and
never touches another run's processes.

The file is self-contained and uses the standard library only, because it is shipped to the host as
source text over the launcher's connection (nothing is installed on the host beforehand).

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
  ``kill``, ``data`` + bytes (a tar upload),
  ``unpack {dest, owned (optional: remove dest when the agent ends)}``, ``collect {dir, names}``,
  ``cleanup``, ``rank_cwd {cwd, info}`` (where this host's ranks run, and what else they need: ``info``
  ``{"python", "data"}``, with the ``--setup`` changes added: see tflaunch.remote.rank), ``sweep {grace}`` (stop every
  process of the run on this host now), ``exec {id, argv, cwd, env, capture_env, owns}`` (a helper
  process before the job's: a ``--setup`` shell, an environment build, a data copy; its output comes
  back as ``exec_output`` events; ``capture_env``: the environment it leaves in ``$TFLAUNCH_ENV_OUT``
  (JSON) is what the later processes of this host start from; ``owns``: a path it creates that the agent
  removes when it ends or at ``cleanup``, unless ``keep``)
- setup may also carry ``home_probe`` (like ``probe``, for the home: hello says ``home_shared``),
  ``paths`` (hello says which of them exist here: ``{path: "dir" | "file" | null}``) and ``keep`` (keep
  owned paths at the end)
- events: ``hello {hostname, pid, shared, home_shared, scratch, ports, python, executable, paths, gpus: {visible,
  found, error}}``, ``exec_output {id, fd}`` + bytes, ``exec_done {id, returncode}``, ``started {index, pid}``,
  ``spawn_failed {index, error}``, ``output {index, fd}`` + bytes, ``exited {index, pid, returncode}``,
  ``done``, ``unpacked``, ``data`` + bytes then ``collected {bytes}``, ``cleaned``, ``rank_ready {dir}``,
  ``swept {count}``, ``error {cmd, error}``
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

TOKEN_VAR = "TFLAUNCH_RUN_ID"
AGENT_VAR = "TFLAUNCH_AGENT_ID"  # "<run id>:<node>": one agent's processes when several share a machine
PORT_LEASE = 300.0  # seconds a port handed to a run is not handed to another (its process may bind late)


def lease_dir(fallback):
    """Where this user's port leases live on this host: /tmp/tflaunch-UID (the same for every run,
    whatever its TMPDIR or scratch root), or ``fallback`` if that is not a directory of this user's."""
    path = "/tmp/tflaunch-%d" % os.getuid()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        import stat
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return path
    except OSError:
        pass
    return fallback


def rank_dir(token):
    """Where an MPI job's rank wrapper and working directories live on this host (the path the
    ranks' bootstrap computes: see tflaunch.remote.rank.bootstrap)."""
    return "/tmp/tflaunch-%d/mpi-%s" % (os.getuid(), token)


def write_rank_files(token, files=None, cwd=None):
    """Write an MPI job's files (``{name: [text, mode]}``: the rank wrapper, mpirun's ssh wrapper and
    hostfile, the same paths on every host) and ``cwd.HOSTNAME`` for run ``token``; return the directory."""
    directory = rank_dir(token)
    if lease_dir(None) is None:
        raise OSError("/tmp/tflaunch-%d is not a directory of this user's" % os.getuid())
    os.makedirs(directory, mode=0o700, exist_ok=True)
    items = [(name, text, int(mode)) for name, (text, mode) in sorted((files or {}).items())]
    if cwd is not None:
        items.append(("cwd." + os.uname().nodename, cwd, 0o644))
    for name, text, mode in items:
        tmp = os.path.join(directory, ".%s.%d" % (name, os.getpid()))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, os.path.join(directory, name))
    return directory


def reserve_ports(count, directory):
    """Bind ``count`` free TCP ports and return the bound sockets (held until the processes start).

    A port is free when nothing is bound to it and no tflaunch agent of this user handed it out in the
    last PORT_LEASE seconds (``ports.json`` in ``directory``, see :func:`lease_dir`, under a lock): a
    TensorFlow server binds its port only once TensorFlow has been imported, seconds after the agent
    let go of it, and in that window another run on this host must not be given the same port.
    """
    import fcntl
    import socket
    path = os.path.join(directory, "ports.json")
    for attempt in range(3):  # another agent may remove an empty per-user folder between the two calls
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            lock = open(path + ".lock", "a")
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    held, refused = [], []
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = time.time()
        try:
            with open(path) as fh:
                leases = {k: v for k, v in json.load(fh).items() if isinstance(v, (int, float)) and v > now}
        except (OSError, ValueError, AttributeError):
            leases = {}
        try:
            while len(held) < count:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind(("", 0))
                except OSError:
                    s.close()
                    raise
                port = str(s.getsockname()[1])
                if port in leases:
                    refused.append(s)  # kept bound until we are done, so bind() cannot return it again
                    continue
                held.append(s)
                leases[port] = now + PORT_LEASE
            tmp = "%s.%d" % (path, os.getpid())
            with open(tmp, "w") as fh:
                json.dump(leases, fh)
            os.replace(tmp, path)
        except BaseException:
            for s in held:
                s.close()
            raise
        finally:
            for s in refused:
                s.close()
    return held


def find_gpus(env=None):
    """This host's GPUs as the job would see them: ``{"visible": CUDA_VISIBLE_DEVICES or None,
    "found": indices listed by ``nvidia-smi -L`` or None, "error": why nvidia-smi gave none}``."""
    env = os.environ if env is None else env
    report = {"visible": env.get("CUDA_VISIBLE_DEVICES"), "found": None, "error": None}
    if report["visible"] is not None:
        return report
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "-L"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        report["error"] = "nvidia-smi: %s" % (getattr(exc, "strerror", None) or exc)
        return report
    text = out.stdout.decode("utf-8", "replace")
    report["found"] = [line.split(":")[0][4:] for line in text.splitlines()
                       if line.startswith("GPU ") and line.split(":")[0][4:].isdigit()]
    if out.returncode != 0:
        report["error"] = "nvidia-smi -L exited with %d: %s" % (
            out.returncode, out.stderr.decode("utf-8", "replace").strip()[-200:])
    return report


def host_report(request):
    """This host as a job would find it: the answer to a setup's ``report`` (see
    :func:`tflaunch.doctor.report_request`), sent back in the hello as ``report``. Never raises.

    Request: ``python`` (the job's interpreter), ``packages`` (distribution names), ``mpirun`` (None:
    not asked; a path; or a bare name, looked up next to the job's Python, then on PATH, then next to
    this interpreter), ``gpus`` (bool), ``home`` and ``scratch`` (directories; scratch defaults to
    $TMPDIR or /tmp), ``timeout`` (for the interpreter, default 60 s). Report: ``python {path, version,
    executable, error}``; ``packages {name: {version, distribution} | null (not importable)}`` or null when
    the interpreter could not be asked; ``mpirun {path, output (of --version, raw), returncode, error}`` or
    null; ``gpus`` (:func:`find_gpus`) or null; ``disk {home, scratch: {path, visible, free_bytes,
    total_bytes}}``; ``time`` (this host's clock once the report is complete); ``error``.

    The job's interpreter runs WITH its site-packages in a subprocess (this agent runs with -I -S) and
    reads package metadata only: nothing is imported. The code is compiled only when a report is asked
    for, so that an agent that is not asked starts as fast as before."""
    program = r'''
import subprocess
python = request.get("python") or sys.executable
report = {"python": {"path": python, "version": None, "executable": None, "error": None}, "packages": None,
          "mpirun": None, "gpus": None, "disk": {}, "time": None, "error": None}
metadata_probe = """
import json, os, sys
out = {"version": sys.version.split()[0], "executable": sys.executable, "packages": {}}
try:
    import importlib.util
    from importlib import metadata
except ImportError:
    metadata = None
TF = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos",
      "tensorflow-aarch64", "tensorflow-rocm", "intel-tensorflow", "tf-nightly", "tf-nightly-cpu")
for name in json.loads(sys.argv[1]):
    module = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except Exception:
        spec = None
    if spec is None:
        out["packages"][name] = None
        continue
    found = None
    for dist_name in (TF if module == "tensorflow" else (name, module)) if metadata else ():
        try:
            dist = metadata.distribution(dist_name)
        except Exception:
            continue
        item = {"version": dist.version, "distribution": dist.metadata["Name"] or dist_name}
        try:
            where = os.path.realpath(str(dist.locate_file(module + "/__init__.py")))
            if spec.origin and where == os.path.realpath(spec.origin):
                found = item
                break
        except Exception:
            pass
        found = found or item
    out["packages"][name] = found or {"version": "unknown", "distribution": None}
sys.stdout.write(json.dumps(out) + "\\n")
"""
probe = None
try:  # started first: it runs while mpirun and nvidia-smi answer
    probe = subprocess.Popen([python, "-c", metadata_probe, json.dumps(list(request.get("packages") or ()))],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
except OSError as exc:
    report["python"]["error"] = "cannot run %s: %s" % (python, exc.strerror or exc)
want = request.get("mpirun")
if want:
    path_dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    if "/" in want:
        candidates = [want]
    else:
        candidates = [os.path.join(d or ".", want)
                      for d in [os.path.dirname(python)] + path_dirs + [os.path.dirname(sys.executable)]]
    found = next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)
    mpi = report["mpirun"] = {"path": found and os.path.abspath(found), "output": None, "returncode": None,
                              "error": None}
    if found is None:
        mpi["error"] = ("%s is not an executable file" % want if "/" in want
                        else "no %s next to %s or on PATH" % (want, python))
    else:
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(mpi["path"])] + path_dirs))
        try:
            done = subprocess.run([mpi["path"], "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=env, timeout=30, check=False)
            mpi["output"] = done.stdout.decode("utf-8", "replace")[:8000]
            mpi["returncode"] = done.returncode
        except (OSError, subprocess.SubprocessError) as exc:
            mpi["error"] = "%s --version: %s" % (mpi["path"], getattr(exc, "strerror", None) or exc)
if request.get("gpus"):
    report["gpus"] = find_gpus()
for key, path in (("home", request.get("home")),
                  ("scratch", request.get("scratch") or os.environ.get("TMPDIR") or "/tmp")):
    if path:
        entry = report["disk"][key] = {"path": path, "visible": False, "free_bytes": None, "total_bytes": None}
        try:
            st = os.statvfs(path)
            entry.update(visible=True, free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize)
        except OSError:
            pass
if probe is not None:
    limit = float(request.get("timeout") or 60)
    try:
        out, err = probe.communicate(timeout=limit)
        lines = out.decode("utf-8", "replace").strip().splitlines()
        if probe.returncode == 0 and lines:
            answer = json.loads(lines[-1])
            report["python"].update(version=answer["version"], executable=answer["executable"])
            report["packages"] = answer["packages"]
        else:
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            report["python"]["error"] = "%s exited with status %s: %s" % (python, probe.returncode, last[0][-300:])
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        report["python"]["error"] = "%s did not answer within %g s" % (python, limit)
    except (ValueError, KeyError, TypeError) as exc:
        report["python"]["error"] = "%s gave an unreadable answer: %s" % (python, exc)
'''
    scope = dict(globals(), request=request)  # one namespace: the program's comprehensions see its names
    try:
        exec(compile(program, "tflaunch-report", "exec"), scope)
        report = scope["report"]
    except Exception as exc:  # a report that went wrong still says why; the agent goes on
        report = dict(scope.get("report") or {}, error="%s: %s" % (type(exc).__name__, exc))
    report["time"] = time.time()
    return report


def _proc_pids():
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid, "rb") as fh:
        data = fh.read()
    return data[data.rindex(b")") + 2:].split()


def run_pids(token, pgids=(), exclude=(), var=TOKEN_VAR):
    """Live pids that belong to the run: in one of ``pgids`` or carrying ``var=token`` in their environment."""
    needle = ("%s=%s" % (var, token)).encode() if token else None
    uid = os.getuid()
    found = set()
    if not os.path.isdir("/proc"):
        return found
    for pid in _proc_pids():
        if pid in exclude:
            continue
        try:
            fields = _stat_fields(pid)
            if fields[0] == b"Z":
                continue
            if int(fields[2]) in pgids:
                found.add(pid)
                continue
            if needle is None or (uid != 0 and os.stat("/proc/%d" % pid).st_uid != uid):
                continue
            with open("/proc/%d/environ" % pid, "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def signal_run(sig, token, pgids, exclude=(), var=TOKEN_VAR):
    """Send ``sig`` to every process of the run; return how many were signalled."""
    count = 0
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in run_pids(token, pgids, exclude, var):
        try:
            os.kill(pid, sig)
            count += 1
        except OSError:
            pass
    return count


def stop_run(token, pgids, grace, exclude=(), var=TOKEN_VAR):
    """SIGTERM every process of the run, wait up to ``grace`` seconds, SIGKILL what is left."""
    if not signal_run(signal.SIGTERM, token, pgids, exclude, var):
        return 0
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not run_pids(token, pgids, exclude, var):
            return 0
        time.sleep(0.05)
    return signal_run(signal.SIGKILL, token, pgids, exclude, var)


def exit_code(status):
    """Like ``subprocess``: the exit code, or minus the number of the signal that killed it."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _find_executable(name, env):
    if "/" in name:
        return name
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, "No such file or directory: %r" % name)


def _output_fd(path):
    """(fd for the child, fd the agent reads or None): a file appended to, or a pipe relayed."""
    if path:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), None
    r, w = os.pipe()
    return w, r


def add_pythonpath(env, cwd):
    """Append ``TFLAUNCH_PYTHONPATH`` (tflaunch for the script's imports) to PYTHONPATH; a host without the
    shared filesystem has the copy that came with the job's files (``cwd/.tflaunch-lib``)."""
    lib = env.get("TFLAUNCH_PYTHONPATH")
    if lib and not os.path.exists(lib):
        lib = os.path.join(cwd, ".tflaunch-lib")
    if lib and os.path.exists(lib):
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + lib if env.get("PYTHONPATH") else lib


def spawn(argv, cwd, env, stdout_path, stderr_path):
    """fork + exec ``argv`` in a session of its own, stdin from /dev/null; return (pid, relayed fds).

    Output is appended to the given files, or, for a path of None, goes to a pipe the agent relays:
    the fds come back as ``[(fd, 1 | 2)]``. Hand-written instead of ``subprocess`` (which costs the
    agent ~10 ms of imports at every launch); an exec failure comes back through a close-on-exec pipe
    as an OSError, as with ``subprocess``.
    """
    executable = _find_executable(argv[0], env)
    out, out_r = _output_fd(stdout_path)
    err, err_r = _output_fd(stderr_path)
    null = os.open(os.devnull, os.O_RDONLY)
    report_r, report_w = os.pipe()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)  # no agent handler may run in the child
    try:
        pid = os.fork()
        if pid == 0:  # child: reset signals, redirect, exec
            try:
                signal.set_wakeup_fd(-1)
                for sig in _HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                os.close(report_r)
                os.setsid()
                os.chdir(cwd)
                os.dup2(null, 0)
                os.dup2(out, 1)
                os.dup2(err, 2)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; a script must not
                    signal.signal(sig, signal.SIG_DFL)
                os.execve(executable, argv, env)
            except BaseException as exc:  # report and die without running any Python cleanup
                code = getattr(exc, "errno", None) or 0
                os.write(report_w, ("%d:%s" % (code, exc)).encode("utf-8", "replace"))
            finally:
                os._exit(127)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in (out, err, null, report_w):
            os.close(fd)
    report = b""
    while True:
        chunk = os.read(report_r, 4096)
        if not chunk:
            break
        report += chunk
    os.close(report_r)
    relayed = [(fd, stream) for fd, stream in ((out_r, 1), (err_r, 2)) if fd is not None]
    if report:
        for fd, _ in relayed:
            os.close(fd)
        os.waitpid(pid, 0)
        code, _, message = report.decode("utf-8", "replace").partition(":")
        raise OSError(int(code or 0), "cannot start %s: %s" % (argv[0], message))
    for fd, _ in relayed:
        os.set_blocking(fd, False)
        try:  # fewer, larger reads and frames for chatty processes (Linux)
            import fcntl
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except (ImportError, OSError):
            pass
    return pid, relayed


class Relay:
    """The output that goes back over the connection: pipes from the job's processes (``output``
    events) and from helper processes (``exec_output`` events, keyed ``"aux:<id>"``)."""

    def __init__(self, send):
        self.send = send
        self.pipes = {}  # read fd -> (index | "aux:<id>", 1 | 2)

    def add(self, key, fds):
        for fd, stream in fds:
            self.pipes[fd] = (key, stream)

    def fds(self):
        return list(self.pipes)

    def relay(self, fd, block=False):
        if block:
            select.select([fd], [], [], 1.0)
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            if not block:
                return
            data = b""
        except OSError:
            data = b""
        index, stream = self.pipes[fd]
        if data and isinstance(index, str):
            self.send({"event": "exec_output", "id": index[4:], "fd": stream}, data)
        elif data:
            self.send({"event": "output", "index": index, "fd": stream}, data)
        else:
            os.close(fd)
            del self.pipes[fd]

    def drain_key(self, key):
        """Relay what the pipes of ``key`` still hold, until they close (a process that exited)."""
        for fd, (index, _) in list(self.pipes.items()):
            if index == key:
                while fd in self.pipes:
                    self.relay(fd, block=True)

    def drain(self, seconds):
        """Relay what every pipe still holds for up to ``seconds``, then close them all."""
        deadline = time.monotonic() + seconds
        while self.pipes and time.monotonic() < deadline:
            ready, _, _ = select.select(list(self.pipes), [], [], max(0.0, deadline - time.monotonic()))
            for fd in ready:
                self.relay(fd)
        for fd in list(self.pipes):
            os.close(fd)
        self.pipes.clear()


class Processes:
    """The job's processes on this host: start them, signal them (``terminate``, ``kill``, a grace
    then SIGKILL), reap them, report ``started``/``exited``/``done``, stop what the run left behind."""

    def __init__(self, token, agent_id, grace, sweep, pgids, relay, base_env, send):
        self.token = token
        self.agent_id = agent_id
        self.grace = grace
        self.sweep = sweep  # stop = the whole run on this host (MPI daemons and ranks)
        self.pgids = pgids  # shared with the helpers: every process group this agent started
        self.relay = relay
        self.base_env = base_env  # () -> the environment a process starts from
        self.send = send
        self.procs = {}
        self.returncodes = {}
        self.kill_at = None
        self.kill_some = {}  # index -> when to SIGKILL its process group
        self.started = False
        self.finished = False  # "done" sent
        self.exclude = {os.getpid(), os.getppid()}
        self.sockets = []  # reserved ports, held until the processes start

    def hold_ports(self, count, directory):
        """Bind ``count`` ports (see :func:`reserve_ports`) and hold them until :meth:`start`."""
        self.sockets = reserve_ports(count, directory)
        return [s.getsockname()[1] for s in self.sockets]

    def start(self, specs):
        for s in self.sockets:
            s.close()
        self.sockets = []
        self.started = True
        for p in specs:
            env = self.base_env()
            env.update(p.get("env", {}))
            add_pythonpath(env, p["cwd"])
            env[TOKEN_VAR] = self.token
            env[AGENT_VAR] = self.agent_id
            try:
                pid, fds = spawn(p["argv"], p["cwd"], env, p.get("stdout"), p.get("stderr"))
            except (OSError, ValueError, TypeError) as exc:
                self.send({"event": "spawn_failed", "index": p["index"], "error": str(exc)})
                self.terminate(0)
                return
            self.procs[p["index"]] = pid
            self.pgids.add(pid)
            self.relay.add(p["index"], fds)
            self.send({"event": "started", "index": p["index"], "pid": pid})

    def whose(self):
        if self.sweep:
            return self.token, self.pgids, self.exclude, TOKEN_VAR
        return self.agent_id, self.pgids, self.exclude, AGENT_VAR

    def mine(self, sig):
        """Signal this agent's processes (and their descendants, found by AGENT_VAR); in sweep mode,
        every process of the run on this host (found by TOKEN_VAR)."""
        return signal_run(sig, *self.whose())

    def stop_mine(self, grace):
        """:func:`stop_run` on :meth:`whose` processes; return how many needed SIGKILL."""
        token, pgids, exclude, var = self.whose()
        return stop_run(token, pgids, grace, exclude, var)

    def terminate(self, grace, indices=None):
        if indices is not None:  # some processes only: their process groups, SIGKILL after the grace
            at = time.monotonic() + grace
            for index in indices:
                pid = self.procs.get(index)
                if pid is None or index in self.returncodes:
                    continue
                try:
                    os.killpg(pid, signal.SIGTERM)
                except OSError:
                    continue
                self.kill_some[index] = min(self.kill_some.get(index, at), at)
            return
        self.mine(signal.SIGTERM)
        at = time.monotonic() + grace
        self.kill_at = at if self.kill_at is None else min(self.kill_at, at)

    def kill_now(self):
        self.kill_at = time.monotonic()

    def timeout(self, longest):
        """How long the loop may wait: ``longest``, or less when a SIGKILL falls due sooner."""
        timeout = longest
        for at in [self.kill_at] + list(self.kill_some.values()):
            if at is not None:
                timeout = max(0.0, min(timeout, at - time.monotonic()))
        return timeout

    def kill_overdue(self):
        """SIGKILL what a grace is over for: everything (``kill_at``), or some process groups."""
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            self.mine(signal.SIGKILL)
            self.kill_at = None
        if self.kill_some:
            self.kill_due()

    def kill_due(self):
        """SIGKILL the process groups whose grace (``terminate`` with indices) is over."""
        now = time.monotonic()
        for index, at in list(self.kill_some.items()):
            if index in self.returncodes:
                del self.kill_some[index]
            elif now >= at:
                del self.kill_some[index]
                try:
                    os.killpg(self.procs[index], signal.SIGKILL)
                except OSError:
                    pass

    def reap(self):
        """Collect exited processes; return how many are still running."""
        for index, pid in list(self.procs.items()):
            if index in self.returncodes:
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 255 << 8
            if done:
                self.returncodes[index] = code = exit_code(status)
                self.send({"event": "exited", "index": index, "pid": pid, "returncode": code})
        return len(self.procs) - len(self.returncodes)

    def finish(self):
        """All processes exited: stop leftovers, drain relayed output, report "done"."""
        leftovers = self.stop_mine(min(self.grace, 1.0))
        self.relay.drain(2.0)
        self.finished = True
        self.send({"event": "done", "killed_leftovers": leftovers})

    def stop_left(self):
        """The agent ends: stop what is left of the run here (only the helpers' process groups when the
        job's processes never started); return whether they started (or this is an MPI sweep)."""
        if self.pgids and not (self.started or self.sweep):  # helper processes only (setup, builds, copies)
            stop_run(self.agent_id, self.pgids, min(self.grace, 1.0), self.exclude, AGENT_VAR)
        if self.started or self.sweep:
            self.stop_mine(min(self.grace, 1.0))
            return True
        return False


class Helpers:
    """Helper processes (``exec``) before the job's: a ``--setup`` shell, an environment build, a data
    copy. Their output is relayed, their end reported as ``exec_done``; what the ``--setup`` shell changed
    in the environment is what the job's processes start from (:meth:`base_env`)."""

    IGNORED = (TOKEN_VAR, AGENT_VAR, "TFLAUNCH_ENV_OUT", "_", "SHLVL", "PWD", "OLDPWD")

    def __init__(self, token, agent_id, pgids, relay, files, send):
        self.token = token
        self.agent_id = agent_id
        self.pgids = pgids  # shared with the job's processes: every process group this agent started
        self.relay = relay
        self.files = files
        self.send = send
        self.aux = {}  # exec id -> {"pid", "capture", "env"}
        self.setup_env = None  # {"set": {...}, "unset": [...]}: what the --setup shell changed

    def base_env(self):
        """The environment processes start from: the agent's, with what the ``--setup`` shell changed."""
        env = dict(os.environ)
        if self.setup_env:
            env.update(self.setup_env["set"])
            for name in self.setup_env["unset"]:
                env.pop(name, None)
        return env

    def start(self, cmd):
        """Start a helper process (``exec``): its output is relayed, its end reported as ``exec_done``."""
        aux_id = str(cmd["id"])
        env = self.base_env()
        env.update(cmd.get("env") or {})
        env[TOKEN_VAR] = self.token
        env[AGENT_VAR] = self.agent_id
        capture = None
        if cmd.get("capture_env"):
            directory = lease_dir(os.path.dirname(self.files.scratch))
            capture = os.path.join(directory, "env-%s-%s-%d.json" % (self.agent_id.replace(":", "-"),
                                                                   aux_id, os.getpid()))
            env["TFLAUNCH_ENV_OUT"] = capture
        if cmd.get("owns"):
            self.files.owned.append(cmd["owns"])  # before it starts: a half-made copy goes too
        try:
            pid, fds = spawn(cmd["argv"], cmd.get("cwd") or "/", env, None, None)
        except (OSError, ValueError, TypeError) as exc:
            self.send({"event": "exec_done", "id": aux_id, "returncode": 127, "error": str(exc)})
            return
        self.aux[aux_id] = {"pid": pid, "capture": capture, "env": env}
        self.pgids.add(pid)
        self.relay.add("aux:" + aux_id, fds)

    def reap(self):
        for aux_id, info in list(self.aux.items()):
            try:
                done, status = os.waitpid(info["pid"], os.WNOHANG)
            except ChildProcessError:
                done, status = info["pid"], 255 << 8
            if not done:
                continue
            del self.aux[aux_id]
            self.relay.drain_key("aux:" + aux_id)  # its last output first
            code = exit_code(status)
            event = {"event": "exec_done", "id": aux_id, "returncode": code}
            if info["capture"]:
                self.read_capture(info, code, event)
            self.send(event)

    def read_capture(self, info, code, event):
        """Take what a ``capture_env`` helper changed in the environment (when it succeeded) as
        :attr:`setup_env`, say so in its ``exec_done`` ``event``; remove the file it wrote."""
        try:
            if code == 0:
                with open(info["capture"]) as fh:
                    after = json.load(fh)
                before = info["env"]
                ignore = self.IGNORED
                self.setup_env = {
                    "set": {k: v for k, v in after.items() if before.get(k) != v and k not in ignore},
                    "unset": [k for k in before if k not in after and k not in ignore]}
                event["env_changed"] = sorted(self.setup_env["set"]) + sorted(self.setup_env["unset"])
        except (OSError, ValueError) as exc:
            event.update(returncode=code or 1, error="cannot read the environment it left: %s" % exc)
        finally:
            try:
                os.unlink(info["capture"])
            except OSError:
                pass


class Files:
    """This agent's files on the host: its scratch directory, uploads (``data`` then ``unpack``),
    ``collect``, the MPI rank files, the paths it owns, and their removal (``cleanup``, the end)."""

    def __init__(self, token, scratch, keep, send):
        self.token = token
        self.scratch = scratch
        self.keep = keep  # keep owned paths at the end
        self.send = send
        self.made_scratch = False
        self.upload = None  # open file receiving "data" frames
        self.rank_files = None  # the rank wrapper's directory, written for an MPI job
        self.owned = []  # paths made for the run here (downloaded data): removed at the end unless keep

    def make_scratch(self):
        if not self.made_scratch:
            os.makedirs(os.path.dirname(self.scratch), mode=0o700, exist_ok=True)
            os.makedirs(self.scratch, mode=0o700, exist_ok=True)
            self.made_scratch = True

    def write_rank(self, files, cwd):
        """:func:`write_rank_files` for this run; return (and remember) the directory."""
        self.rank_files = write_rank_files(self.token, files, cwd)
        return self.rank_files

    def receive(self, data):
        """A chunk of an upload (``data``): appended to the scratch directory's tar file."""
        if self.upload is None:
            self.make_scratch()
            self.upload = open(os.path.join(self.scratch, ".upload.tar"), "wb")
        self.upload.write(data)

    def unpack(self, dest, owned=False):
        import tarfile
        if owned:
            self.owned.append(dest)
        path = os.path.join(self.scratch, ".upload.tar")
        if self.upload is not None:
            self.upload.close()
            self.upload = None
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(path) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
        os.unlink(path)
        self.send({"event": "unpacked", "dest": dest})

    def collect(self, directory, names):
        import tarfile
        self.make_scratch()
        path = os.path.join(self.scratch, ".collect.tar")
        with tarfile.open(path, "w") as tar:
            for name in names:
                if os.path.lexists(os.path.join(directory, name)):
                    tar.add(os.path.join(directory, name), arcname=name)
        total = 0
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                self.send({"event": "data"}, chunk)
        os.unlink(path)
        self.send({"event": "collected", "bytes": total})

    def remove_owned(self):
        import shutil
        for path in list(self.owned):
            for victim in (path, path + ".partial"):  # a copy is made aside, then renamed
                if os.path.isdir(victim) and not os.path.islink(victim):
                    shutil.rmtree(victim, ignore_errors=True)
                elif os.path.lexists(victim):
                    try:
                        os.unlink(victim)
                    except OSError:
                        pass
            self.owned.remove(path)
            parent = os.path.dirname(path)
            while parent.startswith(self.scratch) and parent != os.path.dirname(self.scratch):
                try:
                    os.rmdir(parent)  # the agent's folders, once empty
                except OSError:
                    break
                parent = os.path.dirname(parent)

    def cleanup(self):
        if not self.keep:
            self.remove_owned()
        if self.rank_files:
            import shutil
            shutil.rmtree(self.rank_files, ignore_errors=True)
            self.rank_files = None
        if self.made_scratch:
            import shutil
            shutil.rmtree(self.scratch, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(self.scratch))  # the per-user folder, when it is empty
            except OSError:
                pass

    def leave(self, kept):
        """The launcher went away after the job ran: remove the owned paths (unless keep) and the rank
        files; the scratch directory stays, and when ``kept`` (processes ran there) stderr says so."""
        if self.owned and not self.keep:
            self.remove_owned()
        if self.rank_files:
            import shutil
            shutil.rmtree(self.rank_files, ignore_errors=True)
        if self.made_scratch and kept and os.path.isdir(self.scratch):
            sys.stderr.write("tflaunch agent: launcher gone; kept %s\n" % self.scratch)


class Agent:
    """One host's share of a run: the protocol (setup reply, commands, events) and the main loop; the
    work is done by what it owns: :class:`Processes`, :class:`Helpers`, :class:`Files`, :class:`Relay`."""

    def __init__(self, spec):
        self.spec = spec
        self.token = spec["token"]
        self.agent_id = "%s:%s" % (self.token, spec.get("agent_id", 0))
        self.grace = float(spec.get("grace", 10))
        self.orphan_grace = float(spec.get("orphan_grace", 2))
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
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(1, view):]
        except OSError:
            self.orphan()

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
        self.hello()
        if self.spec.get("processes") is not None:
            processes.start(self.spec["processes"])
        buf = b""
        while True:
            if helpers.aux:
                helpers.reap()
            running = processes.reap()
            if processes.started and not running and not processes.finished:
                processes.finish()
            if self.orphaned and not running and not helpers.aux:
                break
            fds = [wake_r] + self.relay.fds() + ([] if self.orphaned else [0])
            try:
                ready, _, _ = select.select(fds, [], [], processes.timeout(0.5))
            except InterruptedError:
                ready = []
            for fd in ready:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd == 0:
                    data = os.read(0, 1 << 20)
                    if not data:
                        self.orphan()
                    else:
                        buf = self.feed(buf + data)
                else:
                    self.relay.relay(fd)
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
