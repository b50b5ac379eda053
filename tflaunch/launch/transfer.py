"""Moving a run's files over its agents' connections, for hosts that do not share this machine's
filesystem: the job's working directory out (:func:`upload`, a tar stream per host), its ``./outputs``
and ``./logs`` back when the processes have ended (:func:`collect_remote`, then the remote copy is removed
unless ``keep_remote``)."""
from __future__ import annotations

import logging
import os
import time

from .. import progress
from ..history.collect import COLLECTED
from ..textfmt import size_text
from .hostrun import LaunchFailure

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .hostrun import HostRun
    from .session import Session

__all__ = ["upload", "collect_remote", "send_file", "send_tar"]

log = logging.getLogger(__name__)


def send_file(run: HostRun, path: str) -> None:
    """Stream a file to a host's agent as ``data`` chunks (stops early if the connection is gone)."""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            if not chunk or not run.conn.send({"cmd": "data"}, chunk):
                break


def send_tar(targets: list[tuple[HostRun, str]], path: str, owned: bool = False) -> None:
    """Stream the tar file ``path`` to every (host, destination) at once, each unpacked there into its
    destination (``owned``: the agent removes it when it ends); wait for ``unpacked`` afterwards."""
    import threading

    def send(run: HostRun, dest: str) -> None:
        run.unpacked = False
        send_file(run, path)
        run.conn.send({"cmd": "unpack", "dest": dest, **({"owned": True} if owned else {})})

    threads = [threading.Thread(target=send, args=target, daemon=True) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def upload(session: Session, runs: list[HostRun]) -> None:
    """Copy the working directory to hosts that cannot see it (a tar stream over each connection)."""
    if not runs:
        return
    import tarfile

    from ..pythonpath import library_path

    record = session.record
    path = record.path(".upload.tar")
    lib = library_path(record.store.home)
    with session.keeping_alive():  # no events served meanwhile: the agents' leases still are
        with tarfile.open(path, "w") as tar:
            for entry in sorted(os.listdir(session.work_dir)):
                tar.add(os.path.join(session.work_dir, entry), arcname=entry)
            if lib and os.path.isdir(lib):  # tflaunch for the script's imports (see tflaunch.pythonpath)
                tar.add(lib, arcname=".tflaunch-lib")
            for name, directory in session.prep.wheelhouses(runs):  # for an environment built there
                tar.add(directory, arcname=name)

        for run in runs:
            run.work_dir = os.path.join(run.hello["scratch"], "work")
        send_tar([(run, run.work_dir) for run in runs], path)
    os.unlink(path)
    log.info("copied the job's files to %s (no shared filesystem)", ", ".join(run.name for run in runs))
    session.wait(lambda: all(run.unpacked for run in runs), None, "to unpack the job's files")


def collect_remote(session: Session) -> None:
    """Fetch ./outputs and ./logs from hosts without a shared filesystem, then clean up there."""
    runs = [run for run in session.runs if not run.shared and run.work_dir and (run.conn.done or run.swept)
            and not run.conn.eof]
    if not runs:
        return
    base = session.record.path(".collect")
    os.makedirs(base, exist_ok=True)
    for run in runs:
        run.collect_file = open(os.path.join(base, f"{run.node}.tar"), "wb")
        run.conn.send({"cmd": "collect", "dir": run.work_dir, "names": list(COLLECTED)})
    shown: list[Any] = [None]

    def collected() -> bool:
        ended = sum(1 for run in runs if run.collected or run.conn.eof)
        received = sum(run.collect_file.tell() for run in runs)
        if (received, ended) != shown[0]:
            shown[0] = (received, ended)
            progress.report("outputs", f"outputs: {size_text(received)} from {ended}/{len(runs)} host"
                                       f"{'s' if len(runs) != 1 else ''} without the shared filesystem",
                            done=ended == len(runs))
        return ended == len(runs)

    try:
        session.wait(collected, None, "to send outputs")
    except LaunchFailure as exc:
        session.warnings.append(f"collecting outputs: {exc}")
    for run in runs:
        run.collect_file.close()
    if not session.target.get("keep_remote"):
        for run in runs:
            run.conn.send({"cmd": "cleanup"})
        try:
            session.wait(lambda: all(run.cleaned or run.conn.eof for run in runs), time.monotonic() + 30, "")
        except LaunchFailure as exc:
            session.warnings.append(f"removing the remote copies: {exc}")
    else:
        for run in runs:
            log.info("kept the job's directory on host %s: %s", run.name, os.path.dirname(run.work_dir))
