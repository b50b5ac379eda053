#!/usr/bin/env python3
"""Start the processes of one of the distributed TensorFlow examples on this machine, by hand.

No tflaunch: this is what one would otherwise type into several terminals, done by a minimal
launcher (standard library only). It picks free ports on ``localhost``, writes each process's
``TF_CONFIG``, starts every process with :mod:`subprocess` in the working directory (stdout and
stderr of each go to ``logs/<role>-<index>.log`` there), waits for the process whose exit ends
the job, stops the servers that never exit on their own, and prints the wall time::

    python run_by_hand.py ps --workers 2 --ps 1 -- --epochs 3      # chief + 2 workers + 1 ps
    python run_by_hand.py mwms --workers 2 -- --epochs 2            # 2 MultiWorkerMirrored workers

- ``ps``: the chief (coordinator) ends the job. The ``ps`` and ``worker`` tasks serve in
  ``server.join()`` forever, so once the chief has exited they get SIGTERM (SIGKILL after
  ``--grace`` seconds). Their exit by that signal is expected and is not a failure.
- ``mwms``: every worker trains and exits by itself; the job ends when all have exited.
- Fail fast: any process that exits non-zero or by a signal before the job ends stops the others.

It is also the by-hand baseline of the ``tflaunch`` benchmark; :func:`run` is the importable form.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import IO, Any, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"ps": "train_ps.py", "mwms": "train_mwms.py"}
POLL_S = 0.01  # seconds between checks of the processes; small next to TF's start-up

__all__ = ["SCRIPTS", "cluster_tasks", "free_ports", "run", "main"]


def free_ports(count: int, host: str = "") -> list[int]:
    """``count`` distinct ports the kernel reports free (bound together, then released).

    ``host`` defaults to every interface because that is where TensorFlow's gRPC server binds
    (``0.0.0.0:PORT``, whatever host name the cluster spec gives). The ports must be released
    before the servers start: TF does not set SO_REUSEPORT, so a port still held fails the server
    with "Could not start gRPC server". Another program could take a port in between; acceptable
    for a local example, and the same race every hand-written launcher has.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_tasks(kind: str, workers: int, ps: int, ports: Sequence[int],
                  host: str = "localhost") -> tuple[dict[str, list[str]], list[tuple[str, int]]]:
    """The cluster spec and the ``(role, index)`` of every process, for ``kind`` ``ps`` or ``mwms``."""
    if kind == "ps":
        roles = [("chief", 1), ("worker", workers), ("ps", ps)]
    elif kind == "mwms":
        roles = [("worker", workers)]
    else:
        raise ValueError(f"kind must be one of {sorted(SCRIPTS)}, got {kind!r}")
    it = iter(ports)
    cluster: dict[str, list[str]] = {}
    tasks: list[tuple[str, int]] = []
    for role, count in roles:
        cluster[role] = [f"{host}:{next(it)}" for _ in range(count)]
        tasks += [(role, i) for i in range(count)]
    return cluster, tasks


def _stop(procs: dict[str, subprocess.Popen], grace: float) -> None:
    """SIGTERM to every process still running, SIGKILL to those still there after ``grace`` s."""
    live = [p for p in procs.values() if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(POLL_S)
        live = [p for p in live if p.poll() is None]
    for p in live:
        p.kill()
        p.wait()


def run(kind: str, workers: int = 2, ps: int = 1, script_args: Sequence[str] = (),
        cwd: str = ".", python: str = sys.executable, *, grace: float = 10.0,
        timeout: float | None = None) -> dict[str, Any]:
    """Run example ``kind`` (``ps`` or ``mwms``) on localhost; return what happened.

    The result: ``wall_s`` (first process started to last process gone, the servers' teardown
    included), ``job_s`` (first process started to the exit that ended the job), ``ok`` (the
    job's own processes exited 0), ``returncodes`` (``{"chief-0": 0, "worker-0": -15, ...}``;
    negative: killed by that signal), ``ended_by`` (the process whose exit ended the job, or
    ``"timeout"``) and ``logs`` (the log directory).
    """
    if kind not in SCRIPTS:
        raise ValueError(f"kind must be one of {sorted(SCRIPTS)}, got {kind!r}")
    if workers < 1 or (kind == "ps" and ps < 1):
        raise ValueError("a job needs at least one worker (and, for ps, one parameter server)")
    cwd = os.path.abspath(cwd)
    log_dir = os.path.join(cwd, "logs")
    os.makedirs(log_dir, exist_ok=True)
    script = os.path.join(HERE, SCRIPTS[kind])
    n_procs = 1 + workers + ps if kind == "ps" else workers
    cluster, tasks = cluster_tasks(kind, workers, ps, free_ports(n_procs))
    # The process whose exit ends the job; the others either exit too (mwms) or serve forever (ps).
    leaders = {"chief-0"} if kind == "ps" else {f"worker-{i}" for i in range(workers)}

    procs: dict[str, subprocess.Popen] = {}
    logs: list[IO[bytes]] = []
    ended_by = None
    start = time.perf_counter()
    try:
        for role, index in tasks:
            tf_config: dict[str, Any] = {"cluster": cluster, "task": {"type": role, "index": index}}
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if kind == "ps":
                tf_config["environment"] = "cloud"
                env["GRPC_FAIL_FAST"] = "use_caller"
            env["TF_CONFIG"] = json.dumps(tf_config)
            name = f"{role}-{index}"
            log = open(os.path.join(log_dir, f"{name}.log"), "wb")
            logs.append(log)
            procs[name] = subprocess.Popen(
                [python, script, *script_args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = set(leaders)
        while pending:
            for name, p in procs.items():
                rc = p.poll()
                if rc is None:
                    continue
                pending.discard(name)
                # Fail fast: a failure anywhere ends the job, and so does a server that stops serving.
                if (rc != 0 or name not in leaders) and ended_by is None:
                    ended_by, pending = name, set()
                    break
                if not pending and ended_by is None:
                    ended_by = name
            if pending and deadline is not None and time.monotonic() > deadline:
                ended_by, pending = "timeout", set()
            if pending:
                time.sleep(POLL_S)
        job = time.perf_counter() - start
    finally:
        _stop(procs, grace)
        for log in logs:
            log.close()
    wall = time.perf_counter() - start
    codes = {name: p.returncode for name, p in procs.items()}
    ok = ended_by != "timeout" and all(codes[name] == 0 for name in leaders)
    return {"kind": kind, "ok": ok, "wall_s": round(wall, 3), "job_s": round(job, 3),
            "ended_by": ended_by, "returncodes": codes, "logs": log_dir}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a distributed TensorFlow example on localhost without tflaunch.",
        usage="%(prog)s {mwms,ps} [options] [-- SCRIPT_ARGS...]",
        epilog="Arguments after -- go to the training script, e.g. -- --epochs 3")
    parser.add_argument("kind", choices=sorted(SCRIPTS), help="ps: train_ps.py, mwms: train_mwms.py")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--ps", type=int, default=1, help="parameter servers, kind ps only (default 1)")
    parser.add_argument("--cwd", default=".", help="working directory of every process (default .)")
    parser.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
    parser.add_argument("--grace", type=float, default=10.0, help="SIGTERM to SIGKILL, seconds")
    parser.add_argument("--timeout", type=float, default=None, help="stop the job after S seconds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    script_args = argv[split + 1:]
    try:
        result = run(args.kind, args.workers, args.ps, script_args, args.cwd, args.python,
                     grace=args.grace, timeout=args.timeout)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run() has stopped every process on the way out
        print("interrupted; every process stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        codes = " ".join(f"{name}={rc}" for name, rc in result["returncodes"].items())
        status = "ok" if result["ok"] else f"FAILED (ended by {result['ended_by']})"
        print(f"{args.kind}: {status} in {result['wall_s']:.2f} s wall; exit codes {codes}; "
              f"logs in {result['logs']}")
    if result["ok"]:
        return 0
    if result["ended_by"] == "timeout":
        return 124
    failed = [rc for rc in result["returncodes"].values() if rc]
    return next((rc if rc > 0 else 128 - rc for rc in failed), 1)


if __name__ == "__main__":
    sys.exit(main())
