"""The agent's view of its host (part of the tflaunch agent, :mod:`tflaunch.remote.agent`): where a run's
rank files and reserved ports live, the GPUs, the host report, finding and stopping a run's processes by
their token, starting one process in a session of its own.

Standard library only, and shipped to the hosts joined with the agent's other parts into ONE source
string (:func:`tflaunch.remote.bundle.shipped_source`): it imports nothing from them.
"""
import json
import os
import signal
import time


TOKEN_VAR = "TFLAUNCH_RUN_ID"
AGENT_VAR = "TFLAUNCH_AGENT_ID"  # "<run id>:<node>": one agent's processes when several share a machine
STACKS_VAR = "TFLAUNCH_STACKS_SIGNAL"  # a run with a hang timeout: the job's Python dumps its stacks on it
STACKS_DIR = os.path.join("tflaunch", "remote", "stacks")  # its sitecustomize, in tflaunch's copy
RANK_VAR = "TFLAUNCH_RANK"
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


def catches(pid, sig):
    """Whether process ``pid`` has a handler for ``sig`` (``SigCgt`` in /proc; True where unknown)."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def rank_processes(token, exclude=()):
    """The job's programs of run ``token`` on this host by rank (an MPI job, whose ranks mpirun started):
    ``{rank: pid}`` of the topmost process whose environment carries ``TFLAUNCH_RANK`` (the rank wrapper
    sets it for the program it starts, whose own children inherit it; the wrapper has none)."""
    needle = ("%s=%s" % (TOKEN_VAR, token)).encode()
    prefix = ("%s=" % RANK_VAR).encode()
    uid = os.getuid()
    found = {}  # pid -> (parent pid, rank)
    if not os.path.isdir("/proc"):
        return {}
    for pid in _proc_pids():
        if pid in exclude:
            continue
        try:
            if uid != 0 and os.stat("/proc/%d" % pid).st_uid != uid:
                continue
            with open("/proc/%d/environ" % pid, "rb") as fh:
                items = fh.read().split(b"\0")
            if needle not in items:
                continue
            rank = next((item[len(prefix):] for item in items if item.startswith(prefix)), b"")
            fields = _stat_fields(pid)
            if rank.isdigit() and fields[0] != b"Z":
                found[pid] = (int(fields[1]), int(rank))
        except (OSError, ValueError, IndexError):
            continue
    ranks = {}
    for pid, (parent, rank) in sorted(found.items()):
        if found.get(parent, (0, None))[1] != rank and rank not in ranks:
            ranks[rank] = pid
    return ranks


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
    shared filesystem has the copy that came with the job's files (``cwd/.tflaunch-lib``). With
    ``TFLAUNCH_STACKS_SIGNAL`` (a hang timeout), the copy's stack-dump hook too (:data:`STACKS_DIR`)."""
    lib = env.get("TFLAUNCH_PYTHONPATH")
    if lib and not os.path.exists(lib):
        lib = os.path.join(cwd, ".tflaunch-lib")
    if lib and os.path.exists(lib):
        paths = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        paths.append(lib)
        if env.get(STACKS_VAR):  # the hang watchdog's stack dump (tflaunch.remote.stacks)
            paths.append(os.path.join(lib, STACKS_DIR))
        env["PYTHONPATH"] = os.pathsep.join(paths)


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
