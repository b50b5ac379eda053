"""tflaunch agent: the one process tflaunch runs on a host next to the job's processes.

It reads a JSON spec from its stdin, starts each process in a session of its own with stdout and
stderr going to files, reports ``started``/``exited``/``done`` events as JSON lines on its stdout,
obeys ``terminate``/``kill`` commands, and, when its stdin reaches end-of-file because the launcher
went away for any reason (even ``kill -9``), stops everything the run started: SIGTERM, a short grace,
then SIGKILL. "Everything" is every member of the processes' process groups plus every process whose
environment carries the run's token (``TFLAUNCH_RUN_ID=<id>``), which catches descendants that
started sessions of their own, and never touches another run's processes.

The file is self-contained and uses the standard library only, because it is shipped to the host as
source text over the launcher's connection (nothing is installed on the host beforehand).

Protocol: stdin carries a spec (10 ASCII digits giving its length, then JSON), then command lines;
stdout carries event lines. Spec: ``{"token": str, "grace": s, "orphan_grace": s, "processes": [{"index", "argv", "cwd",
"env" (added to the agent's own environment), "stdout", "stderr" (file paths, appended to)}]}``.
"""
import json
import os
import select
import signal
import sys
import time

TOKEN_VAR = "TFLAUNCH_RUN_ID"


def _proc_pids():
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid, "rb") as fh:
        data = fh.read()
    return data[data.rindex(b")") + 2:].split()


def run_pids(token, pgids=(), exclude=()):
    """Live pids that belong to the run: in one of ``pgids`` or carrying ``token`` in their environment."""
    needle = ("%s=%s" % (TOKEN_VAR, token)).encode() if token else None
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


def signal_run(sig, token, pgids, exclude=()):
    """Send ``sig`` to every process of the run; return how many were signalled."""
    count = 0
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in run_pids(token, pgids, exclude):
        try:
            os.kill(pid, sig)
            count += 1
        except OSError:
            pass
    return count


def stop_run(token, pgids, grace, exclude=()):
    """SIGTERM every process of the run, wait up to ``grace`` seconds, SIGKILL what is left."""
    if not signal_run(signal.SIGTERM, token, pgids, exclude):
        return 0
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not run_pids(token, pgids, exclude):
            return 0
        time.sleep(0.05)
    return signal_run(signal.SIGKILL, token, pgids, exclude)


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


def spawn(argv, cwd, env, stdout_path, stderr_path):
    """fork + exec ``argv`` in a session of its own, stdin from /dev/null, output appended to files.

    Hand-written instead of ``subprocess`` (which costs the agent ~10 ms of imports at every launch);
    an exec failure comes back through a close-on-exec pipe as an OSError, as with ``subprocess``.
    """
    executable = _find_executable(argv[0], env)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    out = os.open(stdout_path, flags, 0o644)
    err = os.open(stderr_path, flags, 0o644)
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
    if report:
        os.waitpid(pid, 0)
        code, _, message = report.decode("utf-8", "replace").partition(":")
        raise OSError(int(code or 0), "cannot start %s: %s" % (argv[0], message))
    return pid


class Agent:
    def __init__(self, spec):
        self.token = spec["token"]
        self.grace = float(spec.get("grace", 10))
        self.orphan_grace = float(spec.get("orphan_grace", 2))
        self.specs = spec["processes"]
        self.procs = {}
        self.returncodes = {}
        self.pgids = set()
        self.kill_at = None
        self.orphaned = False
        self.exclude = {os.getpid(), os.getppid()}

    def send(self, obj):
        if self.orphaned:
            return
        try:
            os.write(1, (json.dumps(obj) + "\n").encode())
        except OSError:
            self.orphan()

    def start(self):
        for p in self.specs:
            env = dict(os.environ)
            env.update(p.get("env", {}))
            env[TOKEN_VAR] = self.token
            try:
                pid = spawn(p["argv"], p["cwd"], env, p["stdout"], p["stderr"])
            except (OSError, ValueError, TypeError) as exc:
                self.send({"event": "spawn_failed", "index": p["index"], "error": str(exc)})
                self.terminate(0)
                return
            self.procs[p["index"]] = pid
            self.pgids.add(pid)
            self.send({"event": "started", "index": p["index"], "pid": pid})

    def terminate(self, grace):
        signal_run(signal.SIGTERM, self.token, self.pgids, self.exclude)
        at = time.monotonic() + grace
        self.kill_at = at if self.kill_at is None else min(self.kill_at, at)

    def orphan(self):
        if not self.orphaned:
            self.orphaned = True
            self.terminate(self.orphan_grace)

    def command(self, line):
        try:
            cmd = json.loads(line)
        except ValueError:
            return
        if cmd.get("cmd") == "terminate":
            self.terminate(float(cmd.get("grace", self.grace)))
        elif cmd.get("cmd") == "kill":
            self.kill_at = time.monotonic()

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

    def loop(self):
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.terminate(self.grace))
        for sig in (signal.SIGINT, signal.SIGHUP):  # a handler, not SIG_IGN: exec resets handlers only
            signal.signal(sig, lambda *_: None)
        self.start()
        buf = b""
        while self.reap():
            timeout = 0.5
            if self.kill_at is not None:
                timeout = max(0.0, min(timeout, self.kill_at - time.monotonic()))
            fds = [wake_r] if self.orphaned else [0, wake_r]
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                ready = []
            if wake_r in ready:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    self.orphan()
                else:
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        self.command(line)
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                signal_run(signal.SIGKILL, self.token, self.pgids, self.exclude)
                self.kill_at = None
        leftovers = stop_run(self.token, self.pgids, min(self.grace, 1.0), self.exclude)
        self.send({"event": "done", "killed_leftovers": leftovers})


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
