"""The end of a run: the hosts' ``./outputs`` and ``./logs`` merged into the record, the run object's
final status written (Finalizing, then Completed / Failed / Canceled), its metrics parsed once."""
from __future__ import annotations

import logging
import os
import re
import shutil

from .. import fsio, tail
from ..history.collect import merge_outputs
from ..history.store import CANCELED, FAILED, FINALIZING, TERMINAL, now_iso, rank_log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..launch.hostrun import HostRun
    from ..launch.launcher import Launcher
    from ..launch.session import Session

__all__ = ["finalize", "stderr_tail", "stderr_exception", "exception_line", "merge_remote_outputs",
           "discarded_warnings"]

log = logging.getLogger(__name__)


EXCEPTION_WINDOW = 64 * 1024  # of a failed process's stderr, searched for its traceback's last line
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure|Fault)|"
                        r"[A-Za-z_][\w.]*\.[A-Z]\w*)(?::\s.*)?$")


def _stderr_path(session: Session, launcher: Launcher, index: int) -> str:
    p = session.processes.get(index)
    return session.record.path(p.stderr if p is not None else launcher.log_for(index) or rank_log(index, "stderr"))


def exception_line(text: str) -> str | None:
    """The last line of the last Python traceback in ``text`` (``ValueError: bad shape``), or None: the
    first unindented line after ``Traceback (most recent call last):`` that names an exception."""
    lines = text.replace("\r", "\n").splitlines()
    found = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            for later in lines[i + 1:]:
                if later and not later[0].isspace() and _EXCEPTION.match(later.strip()):
                    found = later.strip()
                    break
    return found[:2000] if found else None


def stderr_exception(session: Session, launcher: Launcher, index: int) -> str | None:
    """The exception that ended a process, from the end of its stderr (see :func:`exception_line`)."""
    data = tail.tail_bytes(_stderr_path(session, launcher, index), EXCEPTION_WINDOW)
    return exception_line(data.decode("utf-8", "replace"))


def stderr_tail(session: Session, launcher: Launcher, index: int) -> str:
    """The last 10 lines of a process's stderr (``index``: a rank, or the launcher's own process)."""
    data = tail.tail_bytes(_stderr_path(session, launcher, index))
    lines = data.decode("utf-8", "replace").replace("\r", "\n").splitlines()
    return "\n".join(lines[-10:])


def merge_remote_outputs(session: Session) -> None:
    """Unpack what the hosts without a shared filesystem sent back and merge it into the working copy."""
    base = session.record.path(".collect")
    if not os.path.isdir(base):
        return
    import tarfile

    incoming = []

    def first_rank(run: HostRun) -> int:  # ps jobs spread ranks: not node x processes per node
        return min((p.rank for p in run.processes), default=1 << 30)

    for run in session.runs:
        tar_path = os.path.join(base, f"{run.node}.tar")
        if not os.path.exists(tar_path):
            continue
        dest = os.path.join(base, str(run.node))
        try:
            with tarfile.open(tar_path) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:
                    tar.extractall(dest)
        except (OSError, tarfile.TarError) as exc:
            session.warnings.append(f"the outputs from host {run.name} could not be unpacked: {exc} "
                                    f"(kept in {tar_path})")
            continue
        os.unlink(tar_path)
        incoming.append((run.name, first_rank(run), dest))
    shared = [run for run in session.runs if run.shared]
    work_rank = min(first_rank(run) for run in shared) if shared else 1 << 30
    work_host = min(shared, key=first_rank).name if shared else "launcher"
    session.warnings += merge_outputs(session.work_dir, work_rank, work_host, incoming, session.record.dir)
    shutil.rmtree(base, ignore_errors=True)


def discarded_warnings(session: Session) -> None:
    """Warn about what the script wrote outside ./outputs and ./logs before it is deleted: in the working
    copy the launcher sees (this machine's, hosts sharing its filesystem) and, as the agents reported it
    when sending their outputs, on hosts without the shared filesystem."""
    from ..history.collect import discarded_files, discarded_warning
    from ..history.snapshot import MANIFEST, tree_listing

    found = []
    if os.path.isdir(session.work_dir):
        try:
            listing = tree_listing(session.record.store.home, fsio.read_json(session.record.path(MANIFEST)))
            snapshot = {rel: size for rel, _digest, size, _executable in listing["files"]}
            inputs = {os.path.relpath(dest, session.work_dir) for paths in session.prep.data_paths.values()
                      for dest in paths.values()}  # data inputs copied into the working directory
            found.append((discarded_files(session.work_dir, snapshot, inputs), ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("run %s: cannot list what its working directory holds: %s", session.record.id, exc)
    if not session.target.get("keep_remote"):  # --keep-remote: their copies stay
        found += [(run.discarded, f" on host {run.name}") for run in session.runs if run.discarded]
    for summary, where in found:
        warning = discarded_warning(summary, where)
        if warning:
            session.warnings.append(warning)


def finalize(session: Session, outcome: dict[str, Any]) -> dict[str, Any]:
    """Record Finalizing, bring the outputs in, then the final status with ``outcome`` (the policy's);
    return the final run object (another process's when it finalized the run first)."""
    record = session.record
    work_dir = session.work_dir
    try:
        record.write_status(FINALIZING)
    except OSError as exc:
        log.warning("run %s: cannot record Finalizing: %s", record.id, exc)
    try:
        merge_remote_outputs(session)
        record.collect_outputs(work_dir)
    except OSError as exc:
        reason = "disk_full" if fsio.is_disk_full(exc) else "collect_failed"
        message = (f"collecting ./outputs and ./logs into the record failed: {exc.strerror or exc}; "
                   f"the files were left in {work_dir}")
        previous = outcome.get("error")
        if previous:
            previous["message"] += f"; then {message}"
        else:
            note = f"{outcome.get('cancel_reason')}; then " if outcome["status"] == CANCELED else ""
            outcome.update(status=FAILED, error={"reason": reason, "message": note + message})
            outcome.pop("cancel_reason", None)
    else:
        discarded_warnings(session)
        shutil.rmtree(work_dir, ignore_errors=True)
    for warning in session.warnings:
        log.warning("run %s: %s", record.id, warning)
        record.event("warning", message=warning)
    if session.warnings:
        outcome["warnings"] = session.warnings
    try:  # parse the script's metrics once now, so the first `runs metrics` reads only the cache
        from ..history.metrics import load
        load(record.dir)
    except (OSError, ValueError) as exc:
        log.warning("run %s: cannot read its metrics: %s", record.id, exc)
    outcome["ended"] = now_iso()
    record.release_reserve()
    current = record.read_status(check_lease=False) or {}
    if current.get("status") in TERMINAL:
        return current
    status = outcome.pop("status")
    final = record.write_status(status, **session.prep.status_fields, **outcome)
    record.drop_lease()
    return final
