"""What the agent does for a run (part of the tflaunch agent, :mod:`tflaunch.remote.agent`): relays the
processes' output (:class:`Relay`), starts, stops and reaps the job's processes (:class:`Processes`) and
the helper processes before them (:class:`Helpers`), and holds the job's files on the host (:class:`Files`).

Standard library only, shipped joined with the agent's other parts (see :mod:`tflaunch.remote.bundle`):
its imports of them are marked and dropped from the shipped source.
"""
import json
import os
import select
import signal
import sys
import time

from .agent_host import AGENT_VAR, TOKEN_VAR, add_pythonpath, exit_code, lease_dir, reserve_ports  # joined when shipped
from .agent_host import catches, rank_processes, signal_run, spawn, stop_run, write_rank_files  # joined when shipped


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
            if p["index"] in self.procs:  # started again (a restart): a new process under the same index
                self.returncodes.pop(p["index"], None)
                self.kill_some.pop(p["index"], None)
                self.finished = False
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

    def signal_ranks(self, name, indices=None):
        """Send the signal ``name`` (the hang watchdog's stack request) to each of the job's processes here
        that catches it (``indices``: only these); in sweep mode (MPI: mpirun started them) to the run's
        ranks found on this host. Return ``{index: "sent" | "no handler" | "exited"}``."""
        signum = getattr(signal, name) if isinstance(name, str) else int(name)
        if self.sweep:
            targets = rank_processes(self.token, self.exclude)
        else:
            targets = {i: pid for i, pid in self.procs.items() if i >= 0}
        report = {}
        for index, pid in sorted(targets.items()):
            if indices is not None and index not in indices:
                continue
            if index in self.returncodes:
                report[str(index)] = "exited"
            elif not catches(pid, signum):
                report[str(index)] = "no handler"
            else:
                try:
                    os.kill(pid, signum)
                    report[str(index)] = "sent"
                except OSError:
                    report[str(index)] = "exited"
        return report

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
        self.unpacked = {}  # dest -> {path: size} of the files unpacked there (see discarded)

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
            self.unpacked.setdefault(dest, {}).update((m.name, m.size) for m in tar.getmembers() if m.isfile())
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
        self.send({"event": "collected", "bytes": total, "discarded": self.discarded(directory, names)})

    def discarded(self, directory, names, shown=3):
        """What was written in ``directory`` outside ``names`` (not unpacked there with that size, not in
        ``__pycache__``), which its removal discards: ``{"files", "bytes", "largest": [[path, size]]}``."""
        known = self.unpacked.get(directory, {})
        owned = set(self.owned)  # data inputs copied into it
        count = total = 0
        found = []
        for dirpath, dirnames, filenames in os.walk(directory):
            rel_dir = os.path.relpath(dirpath, directory)
            top = rel_dir == "."
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (top and d in names)
                           and os.path.join(dirpath, d) not in owned and not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                rel = name if top else os.path.join(rel_dir, name)
                if os.path.join(dirpath, name) in owned:
                    continue
                try:
                    size = os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
                if (top and name in names) or known.get(rel) == size:
                    continue
                count += 1
                total += size
                found.append((size, rel))
        found.sort(key=lambda item: (-item[0], item[1]))
        return {"files": count, "bytes": total, "largest": [[rel, size] for size, rel in found[:shown]]}

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
