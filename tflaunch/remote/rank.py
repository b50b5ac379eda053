"""tflaunch rank wrapper: what mpirun (or srun) starts as each rank, in front of the job's program.

mpirun decides where ranks run and tells each one who it is through its own variables
(:data:`LAUNCHERS`); this wrapper turns them into ``TFLAUNCH_RANK``/``TFLAUNCH_LOCAL_RANK``/
``TFLAUNCH_NODE_RANK``/``TFLAUNCH_WORLD_SIZE``, moves into the job's working directory on this host,
starts the program with its output on pipes and sends every piece of that output on as a *frame*
tagged with the rank, so that the launcher can split mpirun's single output stream back into
per-rank log files and ``[rank N]`` console lines whatever the MPI flavour. It reports the program's
exit status the same way (the root cause of a failed job is the first rank whose program failed),
forwards SIGTERM/SIGINT/SIGHUP to the program, and stops it if the MPI daemon that started the
wrapper dies (``kill -9`` of mpirun must not leave ranks behind).

The file is self-contained and uses the standard library only: tflaunch's agent writes it on every
host (``/tmp/tflaunch-UID/mpi-RUN_ID/rank.py``) next to ``cwd.HOSTNAME``, the job's working directory
on that host; the ranks run ``python -I -S -c BOOT PROGRAM...`` (:func:`bootstrap`).

Frame (one ``write``, at most :data:`FRAME_MAX` bytes, so that it reaches mpirun unsplit):
``\\x1e RANK \\x1f KIND DATA \\n`` where KIND is ``l`` (DATA is a line, its newline removed), ``p`` (DATA
is part of a line), ``s`` (started: ``PID HOSTNAME``) or ``x`` (exited: the return code, negative for
a signal, as in :mod:`subprocess`). In DATA the bytes \\x1d and \\x1e are escaped (\\x1d D, \\x1d E): a
frame start is always a frame start, so a frame that a reader upstream cut in two, followed by
another rank's frame on the same line, costs only the cut frame (kept in mpirun's log). Anything
else in mpirun's output is mpirun's own.
"""
import os
import select
import signal
import sys
import time

# Which variables tell a process its place, per launcher: the first entry whose rank variable is set
# wins, and its own size/local-rank variables are used (never a mix). Under mpirun inside a Slurm
# allocation the ranks inherit the daemon step's SLURM_PROCID=0: MPI's variables come first, Slurm's last.
LAUNCHERS = (
    ("openmpi", {"rank": "OMPI_COMM_WORLD_RANK", "world_size": "OMPI_COMM_WORLD_SIZE",
                 "local_rank": "OMPI_COMM_WORLD_LOCAL_RANK"}),  # (its NODE_RANK is a local rank over all jobs)
    ("pmi", {"rank": "PMI_RANK", "world_size": "PMI_SIZE", "local_rank": "MPI_LOCALRANKID"}),  # MPICH, Intel MPI, srun --mpi=pmi2
    ("pmix", {"rank": "PMIX_RANK", "world_size": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID",
              "node_rank": "SLURM_NODEID"}),  # srun --mpi=pmix
    ("slurm", {"rank": "SLURM_PROCID", "world_size": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID",
               "node_rank": "SLURM_NODEID"}),
)
PPN_VAR = "TFLAUNCH_PROCS_PER_NODE"  # the launcher's plan: fills in what a launcher does not say
FRAME_MAX = 4000  # < PIPE_BUF (4096): a write of this size is never split or interleaved
MARK = b"\x1e"
SEP = b"\x1f"
ESC = b"\x1d"  # in a frame's data: ESC D is ESC, ESC E is MARK
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_IF_HANDLED = (signal.SIGUSR1, signal.SIGUSR2)  # forwarded only to a program that catches them
TABLE = "ranks.json"  # optional, next to this file: what differs between ranks (srun steps)
HOST_INFO = "host.%s.json"  # optional, next to this file (else host.json): this host's share of the job


def identity(env=None):
    """``{"rank", "world_size", "local_rank", "node_rank", "launcher"}`` from the launcher's variables
    (ints, ``None`` where unknown), or None when no launcher's rank variable is set."""
    env = os.environ if env is None else env
    for name, names in LAUNCHERS:
        if env.get(names["rank"], "").strip().isdigit():
            found = {"launcher": name}
            for key in ("rank", "world_size", "local_rank", "node_rank"):
                value = env.get(names.get(key, ""), "").strip()
                found[key] = int(value) if value.isdigit() else None
            break
    else:
        return None
    ppn = env.get(PPN_VAR, "").strip()
    if ppn.isdigit() and int(ppn) > 0:  # tflaunch placed the ranks host-major, ppn per node
        found["node_rank"] = found["rank"] // int(ppn)  # the node's index among the job's hosts
        if found["local_rank"] is None:
            found["local_rank"] = found["rank"] % int(ppn)
    return found


def rank_info(env=None):
    """Who this process is in its job, for scripts: ``{"rank", "local_rank", "node_rank",
    "world_size", "launcher"}``. Under tflaunch from ``TFLAUNCH_*`` (``launcher`` = ``"tflaunch"``);
    otherwise from mpirun's, srun's or Slurm's own variables (:data:`LAUNCHERS`), so the same script
    also runs under a raw ``mpirun``; a single process (rank 0 of 1) when there are none."""
    env = os.environ if env is None else env
    if env.get("TFLAUNCH_RANK", "").isdigit():
        info = {"launcher": "tflaunch"}
        for key, var in (("rank", "TFLAUNCH_RANK"), ("local_rank", "TFLAUNCH_LOCAL_RANK"),
                         ("node_rank", "TFLAUNCH_NODE_RANK"), ("world_size", "TFLAUNCH_WORLD_SIZE")):
            value = env.get(var, "")
            info[key] = int(value) if value.isdigit() else None
        return info
    found = identity(env)
    if found is None:
        return {"launcher": None, "rank": 0, "local_rank": 0, "node_rank": 0, "world_size": 1}
    return found


def _escape(data):
    """Output bytes as a frame carries them: no MARK inside, so a reader can always find frame starts."""
    return data.replace(ESC, ESC + b"D").replace(MARK, ESC + b"E")


def unescape(data):
    """A frame's data as the program wrote it (see :func:`_escape`)."""
    return data.replace(ESC + b"E", MARK).replace(ESC + b"D", ESC) if ESC in data else data


def frames(rank, data, final=False):
    """``data`` (bytes of output) as frames; returns (frames, the unfinished line kept for later).

    A line longer than a frame is sent in parts; with ``final`` the unfinished rest is sent too."""
    head = MARK + str(rank).encode() + SEP
    room = FRAME_MAX - len(head) - 2
    step = room // 2 if (ESC in data or MARK in data) else room  # escaping at most doubles a part
    out = []
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            break
        while end - start > step:
            out.append(head + b"p" + _escape(data[start:start + step]) + b"\n")
            start += step
        out.append(head + b"l" + _escape(data[start:end]) + b"\n")
        start = end + 1
    rest = data[start:]
    while len(rest) > step or (final and rest):
        out.append(head + b"p" + _escape(rest[:step]) + b"\n")
        rest = rest[step:]
    return out, rest


def control(rank, kind, text):
    return MARK + str(rank).encode() + SEP + kind + text.encode() + b"\n"


def _write(fd, data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:  # mpirun is gone: nothing to tell anyone
            return


def bootstrap(run_id, directory=None):
    """The ``-c`` program (one line) that runs this file as the wrapper of run ``run_id`` on any host,
    as any user: from ``/tmp/tflaunch-UID/mpi-RUN_ID`` (written by each host's agent), or from
    ``directory`` (one every node sees: an srun step's, in the run record)."""
    if directory is None:
        return ('import os,sys;d="/tmp/tflaunch-%%d/mpi-%s"%%os.getuid();sys.argv[0]=p=d+"/rank.py";'
                'exec(compile(open(p).read(),p,"exec"))' % run_id)
    return ('import os,sys;sys.argv[0]=p=%r;os.path.exists(p) or sys.exit("tflaunch rank wrapper: "+p+'
            '" is not visible on "+os.uname().nodename+": the run record must be on a filesystem every node '
            'sees (set TFLAUNCH_HOME), or use --launcher ssh");exec(compile(open(p).read(),p,"exec"))'
            % os.path.join(directory, "rank.py"))


def _comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def handles(pid, signum):
    """Whether process ``pid`` catches ``signum`` (``SigCgt`` in /proc; True where unknown)."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def add_pythonpath(env, cwd):
    """Append ``TFLAUNCH_PYTHONPATH`` (tflaunch for the script's imports) to PYTHONPATH; a host without the
    shared filesystem has the copy that came with the job's files (``cwd/.tflaunch-lib``). With
    ``TFLAUNCH_STACKS_SIGNAL`` (a hang timeout), the copy's stack-dump hook too (tflaunch.remote.stacks)."""
    lib = env.get("TFLAUNCH_PYTHONPATH")
    if lib and not os.path.exists(lib):
        lib = os.path.join(cwd, ".tflaunch-lib")
    if lib and os.path.exists(lib):
        paths = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        paths.append(lib)
        if env.get("TFLAUNCH_STACKS_SIGNAL"):
            paths.append(os.path.join(lib, "tflaunch", "remote", "stacks"))
        env["PYTHONPATH"] = os.pathsep.join(paths)


def apply_table(env, rank, path):
    """Add rank ``rank``'s own variables from the launcher's table at ``path`` (if there is one) to
    ``env``: ``{"cluster": JSON or null, "gpu_positions": bool, "ranks": {"R": {"env": {...}, "role",
    "index", "ports": [...]}}}``. TF_CONFIG is built here from the cluster shared by all ranks; with
    ``gpu_positions`` CUDA_VISIBLE_DEVICES holds positions in the GPUs Slurm gave the task. Returns a
    problem to report, or None."""
    import json
    try:
        with open(path) as fh:
            table = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return "cannot read %s: %s" % (path, exc)
    mine = table.get("ranks", {}).get(str(rank))
    if mine is None:
        return "not in the launcher's plan (%d ranks): did srun start more tasks than planned?" % len(
            table.get("ranks", {}))
    env.update(mine.get("env") or {})
    if table.get("cluster") and "TF_CONFIG" not in (mine.get("env") or {}):
        env["TF_CONFIG"] = ('{"cluster":%s,"task":{"type":%s,"index":%d},"environment":"cloud"}'
                            % (table["cluster"], json.dumps(mine["role"]), mine["index"]))
    if table.get("gpu_positions") and "CUDA_VISIBLE_DEVICES" in (mine.get("env") or {}):
        given = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        wanted = [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
        if given and all(g.isdigit() and int(g) < len(given) for g in wanted):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(given[int(g)] for g in wanted)
    import socket
    for port in mine.get("ports") or []:
        probe = socket.socket()
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("", int(port)))
        except OSError as exc:
            return ("port %s is in use on this node (%s): give --port-base to choose other ports"
                    % (port, exc.strerror or exc))
        finally:
            probe.close()
    return None


def apply_host(env, argv, here, host):
    """This host's share of the job, from ``host.HOST.json`` (written by the host's agent) or ``host.json``
    (an srun step's, for every node): ``{"python": the job's environment here, "setup_env": {"set", "unset"}
    (what the host's --setup lines changed), "setup_script": lines to run here first (an srun step has no
    agent to run them), "data": {name: path} (``{data:NAME}`` in the arguments), "check_paths": [...]}``.
    Returns (argv, problem or None)."""
    import json
    for name in (HOST_INFO % host, "host.json"):
        path = os.path.join(here, name)
        if os.path.exists(path):
            break
    else:
        return argv, None
    try:
        with open(path) as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        return argv, "cannot read %s: %s" % (path, exc)
    for needed in info.get("check_paths") or ():
        if not os.path.exists(needed):
            return argv, "input %s does not exist on this host" % needed
    if info.get("setup_script"):
        problem = _run_setup(env, info["setup_script"])
        if problem:
            return argv, problem
    changed = info.get("setup_env") or {}
    env.update(changed.get("set") or {})
    for name in changed.get("unset") or ():
        env.pop(name, None)
    argv = list(argv)
    if info.get("python"):
        argv[0] = info["python"]
    paths = info.get("data") or {}
    if paths:
        import re
        argv = [re.sub(r"\{data:([^{}]*)\}", lambda m: paths.get(m.group(1), m.group(0)), a) for a in argv]
        env["TFLAUNCH_INPUT_DATASETS"] = json.dumps(paths, sort_keys=True)
    return argv, None


def _run_setup(env, script):
    """Run the --setup script (bash, else sh) and take the environment it leaves; a problem or None."""
    import json
    out = "/tmp/tflaunch-%d/setup-env-%d.json" % (os.getuid(), os.getpid())
    shell = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$TFLAUNCH_SETUP"; else exec sh -c "$TFLAUNCH_SETUP"; fi'
    child_env = dict(env, TFLAUNCH_SETUP=script, TFLAUNCH_SETUP_PYTHON=sys.executable, TFLAUNCH_ENV_OUT=out)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        pid = os.fork()
    except OSError as exc:
        return "cannot run the --setup lines: %s" % exc
    if pid == 0:
        try:
            os.dup2(2, 1)  # its output goes with the rank's stderr
            os.execve("/bin/sh", ["/bin/sh", "-c", shell], child_env)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    try:
        if code != 0:
            return "--setup failed on %s (exit status %d; its output is above)" % (os.uname().nodename, code)
        with open(out) as fh:
            after = json.load(fh)
    except (OSError, ValueError) as exc:
        return "cannot read the environment the --setup lines left: %s" % exc
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    for name in ("TFLAUNCH_SETUP", "TFLAUNCH_SETUP_PYTHON", "TFLAUNCH_ENV_OUT", "_", "SHLVL"):
        after.pop(name, None)
    keep = {k: v for k, v in env.items() if k.startswith("TFLAUNCH_")}
    env.clear()
    env.update(after)
    env.update(keep)
    return None


def _fail(message):
    sys.stderr.write("tflaunch rank wrapper: %s\n" % message)
    return 127


def main(argv):
    if not argv:
        return _fail("no program to run")
    me = identity()
    if me is None:
        return _fail("not started by mpirun or srun: none of %s is set"
                     % ", ".join(names["rank"] for _, names in LAUNCHERS))
    rank = me["rank"]
    env = dict(os.environ)
    env["TFLAUNCH_RANK"] = str(rank)
    for key, var in (("local_rank", "TFLAUNCH_LOCAL_RANK"), ("node_rank", "TFLAUNCH_NODE_RANK"),
                     ("world_size", "TFLAUNCH_WORLD_SIZE")):
        if me[key] is not None:
            env[var] = str(me[key])
    host = os.uname().nodename
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    try:
        name = os.path.join(here, "cwd." + host)
        with open(name if os.path.exists(name) else os.path.join(here, "cwd")) as fh:
            cwd = fh.read()
        os.chdir(cwd)
    except OSError as exc:
        return _fail("rank %d on %s: no working directory: %s" % (rank, host, exc))
    env["PWD"] = cwd
    problem = apply_table(env, rank, os.path.join(here, TABLE))
    if problem:
        return _fail("rank %d on %s: %s" % (rank, host, problem))
    argv, problem = apply_host(env, argv, here, host)
    if problem:
        return _fail("rank %d on %s: %s" % (rank, host, problem))
    add_pythonpath(env, cwd)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # a stop signal that comes before forward() is installed waits (blocked) instead of killing this wrapper
    # and orphaning the program; the program unblocks it before exec (its dispositions are still the defaults)
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        return _fail("cannot start %s: %s" % (argv[0], exc))
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (null, out_r, out_w, err_r, err_w):
                os.close(fd)
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            os.write(2, ("tflaunch: cannot start %s: %s\n" % (argv[0], exc)).encode("utf-8", "replace"))
        os._exit(127)
    os.close(out_w)
    os.close(err_w)
    parent = os.getppid()

    by_slurm = _comm(os.getppid()) == "slurmstepd"  # Slurm signals every process of its step itself

    def forward(signum, _frame):
        if by_slurm and signum != signal.SIGHUP:
            return
        if signum in _IF_HANDLED and not handles(pid, signum):
            return  # Slurm's checkpoint signal: fatal to a program that does not expect it
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # one that came meanwhile is forwarded now
    _write(2, control(rank, b"s", "%d %s" % (pid, host)))
    pipes = {out_r: 1, err_r: 2}
    kill_at = None
    while pipes:
        try:
            ready, _, _ = select.select(list(pipes), [], [], 0.5)
        except InterruptedError:
            continue
        for fd in ready:
            try:
                data = os.read(fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            for chunk in frames(rank, data, final=True)[0]:  # a partial line goes now: progress bars
                _write(pipes[fd], chunk)
            if not data:
                os.close(fd)
                del pipes[fd]
        if os.getppid() != parent and kill_at is None:  # the MPI daemon died: do not outlive it
            forward(signal.SIGTERM, None)
            kill_at = time.monotonic() + 5.0
        if kill_at is not None and time.monotonic() >= kill_at:
            forward(signal.SIGKILL, None)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    _write(2, control(rank, b"x", str(code)))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
