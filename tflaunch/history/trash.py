"""Deleting runs into the home's trash, restoring them, and emptying the trash (``runs delete|restore|purge``,
``Run.delete()``).

Layout, under the home (the same filesystem as ``runs/``, so a move is one atomic rename)::

    trash/<run-id>/                 the run's directory, exactly as it was (moved by one rename)
    trash/<run-id>.json             when and why: deleted, by, reason, experiment, status, created,
                                    sweep (the sweep it was deleted with), trials (a sweep's deleted trials)
    trash/.purge-<run-id>-<hex>/    an entry being purged (renamed away first, then removed)

Deleting is one ``rename(runs/<id>, trash/<id>)``: of two deletes of the same run (two machines) one
wins, the other finds the source gone; a run being created (``runs/.new-<id>``) is never seen. The
listing's index of finished runs (``cache/runs-index.txt``) drops a run that is gone and takes one
back that reappears, so it needs no update here. Restoring is the rename back; purging removes entries
but never the snapshot objects and trees the runs used (they are shared; a garbage collector removes
what nothing uses). Registered models are copies of their own under ``models/`` and stay.

A sweep is deleted with its trials (restored with them too); a trial alone cannot be deleted while its
sweep is kept (the sweep's record and report name it).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import sys
import time

from .. import fsio
from ..errors import RunActiveError, RunDeletedError, RunNotFoundError, SpecError, StoreError
from .layout import (CANCELED, COMPLETED, DAMAGED, FAILED, FINALIZING, PREPARING, QUEUED, RECOVERING, RUN_ID_RE,
                     RUNNING, TERMINAL, now_iso, parse_iso)
from .lease import hostname, user_name
from .record import RunRecord

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable, Iterable

    from .store import Store

__all__ = ["parse_duration", "select", "delete_runs", "delete_one", "restore", "purge", "entries", "STATUSES"]

log = logging.getLogger(__name__)

STATUSES = (PREPARING, QUEUED, RUNNING, RECOVERING, FINALIZING, COMPLETED, FAILED, CANCELED, DAMAGED)
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``; SpecError otherwise."""
    match = _DURATION_RE.match(str(text).strip().lower())
    if not match:
        raise SpecError(f"duration {text!r} is invalid: give a number and a unit, such as 30d, 12h, 90m, 45s or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _statuses(values: Iterable[str] | None) -> set[str] | None:
    if not values:
        return None
    known = {s.lower(): s for s in STATUSES}
    wanted = set()
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name.lower() not in known:
                raise SpecError(f"unknown status {name!r} (one of: {', '.join(STATUSES)})")
            wanted.add(known[name.lower()])
    return wanted


# -- which runs ---------------------------------------------------------------------------------------
def select(store: Store, refs: Iterable[str] = (), *, experiment: str | None = None,
           statuses: Iterable[str] | None = None, older_than: float | None = None,
           now: float | None = None) -> list[tuple[RunRecord, dict[str, Any]]]:
    """The runs to delete, as (record, run object) pairs: the named runs, or those matching every filter
    (``older_than``: seconds since creation), each sweep followed by its trials."""
    refs = list(refs)
    filtered = experiment is not None or statuses or older_than is not None
    if refs and filtered:
        raise SpecError("give run ids or filters (--experiment, --status, --older-than), not both")
    if not refs and not filtered:
        raise SpecError("say which runs to delete: RUN..., or --experiment, --status, --older-than")
    wanted = _statuses(statuses)
    listed = {r["id"]: r for r in store.list_runs()}
    chosen: dict[str, dict[str, Any]] = {}
    if refs:
        for ref in refs:
            record = store.run(ref)
            chosen[record.id] = listed.get(record.id) or {"id": record.id, "status": DAMAGED}
    else:
        cutoff = (time.time() if now is None else now) - older_than if older_than is not None else None
        for run in listed.values():
            if experiment is not None and run.get("experiment") != experiment:
                continue
            if wanted and run.get("status") not in wanted:
                continue
            created = parse_iso(run.get("created"))
            if cutoff is not None and (created is None or created >= cutoff):
                continue
            chosen[run["id"]] = run
    trials: dict[str, list[str]] = {}
    for run in listed.values():
        if run.get("parent"):
            trials.setdefault(run["parent"], []).append(run["id"])
    kept_sweeps = {}
    for run_id, run in list(chosen.items()):
        parent = run.get("parent")
        if parent and parent in listed and parent not in chosen:
            if refs:
                raise SpecError(f"run {run_id} is trial {run.get('trial')} of sweep {parent}: delete the sweep "
                                "(its trials are deleted with it)")
            kept_sweeps[run_id] = parent
            del chosen[run_id]
    if kept_sweeps:
        log.info("left out %d trial(s) of sweeps that are kept (delete the sweep to delete its trials)",
                 len(kept_sweeps))
    out: list[tuple[RunRecord, dict[str, Any]]] = []
    seen: set[str] = set()
    for run_id in sorted(chosen, reverse=True):  # newest first, as `runs list`
        if run_id in seen or chosen[run_id].get("parent") in chosen:
            continue
        for one in [run_id, *sorted(trials.get(run_id, []))]:
            if one not in seen:
                seen.add(one)
                out.append((RunRecord(store, one), listed.get(one) or chosen.get(one) or {"id": one}))
    return out


def _active(record: RunRecord, run: dict[str, Any]) -> bool:
    """Whether the run may still be running (a damaged record: its launcher still holds the lease)."""
    if run.get("status") == DAMAGED:
        return record.lease() is not None and record.launcher_state() == "alive"
    return run.get("status") not in TERMINAL


# -- delete -------------------------------------------------------------------------------------------
def delete_runs(store: Store, selection: list[tuple[RunRecord, dict[str, Any]]], *, reason: str = "",
                cancel: Callable[[RunRecord, str], Any] | None = None, dry_run: bool = False,
                wait: float = 120.0) -> tuple[list[dict[str, Any]], list[str]]:
    """Move the selected runs to the trash: (what was deleted, ids found gone meanwhile). A run that has
    not ended is refused (RunActiveError, nothing deleted) unless ``cancel`` is given: then it is
    canceled with it and deleted once it has ended (StoreError after ``wait`` seconds)."""
    active = [(record, run) for record, run in selection if _active(record, run)]
    if active and cancel is None:
        shown = ", ".join(f"{record.id} ({run.get('status')})" for record, run in active[:5])
        raise RunActiveError(f"{len(active)} run(s) have not ended: {shown}{'...' if len(active) > 5 else ''}; "
                             "cancel first (`tflaunch runs cancel RUN`) or delete with --cancel; nothing deleted")
    sweep_of = {record.id: run.get("parent") for record, run in selection
                if run.get("parent") in {r.id for r, _ in selection}}
    rows = [_row(run, record.id, sweep_of.get(record.id)) for record, run in selection]
    if dry_run:
        return rows, []
    if active:
        for record, _ in active:  # a sweep's cancel cancels its trials too; twice is harmless
            cancel(record, reason or "canceled to be deleted")
        deadline = time.monotonic() + wait
        ended = {record.id: _wait_ended(record, deadline, wait) for record, _ in active}
        rows = [dict(row, status=ended.get(row["id"]) or row["status"]) for row in rows]
    store.ensure()
    os.makedirs(store.trash_dir, exist_ok=True)
    deleted, gone = [], []
    who = f"{user_name()}@{hostname()}"
    for (record, run), row in zip(selection, rows):
        trials = [r.id for r, _ in selection if sweep_of.get(r.id) == record.id]
        try:
            _move_to_trash(store, record, {**row, "deleted": now_iso(), "by": who, "reason": reason,
                                           **({"trials": trials} if trials else {})})
        except RunDeletedError:  # another delete won: the caller says so
            gone.append(record.id)
            continue
        deleted.append(row)
    return deleted, gone


def delete_one(store: Store, ref: str, *, reason: str = "",
               cancel: Callable[[RunRecord, str], Any] | None = None) -> list[str]:
    """Delete one run (a sweep: with its trials) as :func:`delete_runs` does; return the deleted ids
    (RunDeletedError when another delete took it first)."""
    deleted, gone = delete_runs(store, select(store, [ref]), reason=reason, cancel=cancel)
    if gone and not deleted:
        raise RunDeletedError(f"run {gone[0]} is gone: it was deleted meanwhile")
    return [row["id"] for row in deleted]


def _row(run: dict[str, Any], run_id: str, sweep: str | None) -> dict[str, Any]:
    return {"id": run_id, "experiment": run.get("experiment"), "status": run.get("status"),
            "created": run.get("created"), "sweep": sweep}


def _wait_ended(record: RunRecord, deadline: float, wait: float) -> str | None:
    """Until the run has ended and its launcher let go of it (the lease gone, or its holder dead);
    returns its final status."""
    while True:
        status = record.read_status()
        if status is None and not os.path.isdir(record.dir):
            return None  # deleted meanwhile: the move says so
        ended = status is not None and status.get("status") in TERMINAL
        if ended and (record.lease() is None or record.launcher_state() != "alive"):
            return status["status"]
        if time.monotonic() > deadline:
            state = (status or {}).get("status", "running") if not ended else "ended, its launcher finishing"
            raise StoreError(f"run {record.id} is still {state} {wait:.0f} s after the cancel; nothing more "
                             "deleted (try again once it has ended)")
        time.sleep(0.1)


def _move_to_trash(store: Store, record: RunRecord, info: dict[str, Any]) -> None:
    target = os.path.join(store.trash_dir, record.id)
    gone = RunDeletedError(f"run {record.id} is gone: it was deleted meanwhile (`tflaunch runs restore "
                           f"{record.id}` brings it back)")
    if os.path.lexists(target):
        if not os.path.isdir(record.dir):
            raise gone
        raise StoreError(f"run {record.id}: {target} is in the way (restore or purge it first)")
    try:
        os.rename(record.dir, target)
    except FileNotFoundError:
        raise gone from None
    except OSError as exc:
        how = " (the trash must be on the same filesystem as runs/)" if exc.errno == errno.EXDEV else ""
        raise StoreError(f"cannot move run {record.id} to {target}: {exc.strerror or exc}{how}") from None
    try:
        fsio.atomic_write_json(target + ".json", info)
    except OSError as exc:  # the run is deleted; only the note of when is missing
        log.warning("run %s: deleted, but cannot write %s.json: %s", record.id, target, exc.strerror or exc)
    log.debug("run %s moved to %s", record.id, target)


# -- the trash ----------------------------------------------------------------------------------------
def entries(store: Store) -> list[dict[str, Any]]:
    """The runs in the trash, newest deletion first: their ``<id>.json`` (``deleted``: the entry's
    change time when that note is missing) plus ``path``."""
    try:
        with os.scandir(store.trash_dir) as it:
            ids = [e.name for e in it if RUN_ID_RE.match(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    out = []
    for run_id in ids:
        path = os.path.join(store.trash_dir, run_id)
        try:
            info = fsio.read_json(path + ".json")
            info = info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            info = {}
        if parse_iso(info.get("deleted")) is None:
            try:
                st = os.stat(path)
                info["deleted"] = now_iso(max(st.st_ctime, st.st_mtime))
            except OSError:
                continue
        out.append({**info, "id": run_id, "path": path})
    out.sort(key=lambda e: (e["deleted"], e["id"]), reverse=True)
    return out


def restore(store: Store, ref: str) -> list[str]:
    """Move a deleted run (a sweep: with its trials) back into ``runs/``, as it was; return the ids."""
    if not isinstance(ref, str) or not ref or "/" in ref or ref in (".", ".."):
        raise RunNotFoundError(f"invalid run id {ref!r}")
    found = {e["id"]: e for e in entries(store)}
    matches = [ref] if ref in found else [i for i in found if i.startswith(ref)] or [i for i in found if i.endswith(ref)]
    if len(matches) > 1:
        raise RunNotFoundError(f"run id {ref!r} is ambiguous: {len(matches)} deleted runs match "
                               f"({', '.join(sorted(matches)[:5])}...)")
    if not matches:
        try:
            live = store.run(ref).id
        except RunNotFoundError:
            raise RunNotFoundError(f"no deleted run {ref!r} in {store.home} (see `tflaunch runs purge --dry-run`)") \
                from None
        raise RunNotFoundError(f"run {live} is not deleted: nothing to restore")
    entry = found[matches[0]]
    if entry.get("sweep") in found:
        raise SpecError(f"run {entry['id']} was deleted with its sweep {entry['sweep']}: restore the sweep "
                        "(its trials come back with it)")
    ids = [entry["id"]] + sorted(i for i, e in found.items() if e.get("sweep") == entry["id"])
    for run_id in ids:
        _restore_one(store, run_id)
    return ids


def _restore_one(store: Store, run_id: str) -> None:
    source, target = os.path.join(store.trash_dir, run_id), os.path.join(store.runs_dir, run_id)
    if os.path.lexists(target):
        raise StoreError(f"run {run_id} exists in {store.runs_dir} already; the deleted copy stays in {source}")
    try:
        os.rename(source, target)
    except FileNotFoundError:
        raise RunNotFoundError(f"run {run_id} is no longer in the trash (restored or purged meanwhile)") from None
    except OSError as exc:
        raise StoreError(f"cannot move {source} back to {target}: {exc.strerror or exc}") from None
    try:
        os.unlink(source + ".json")
    except OSError:
        pass


def purge(store: Store, older_than: float | None = None, *, dry_run: bool = False,
          now: float | None = None) -> list[dict[str, Any]]:
    """Remove the trash's entries (deleted more than ``older_than`` seconds ago, or all); return them.
    Each is renamed away first, so a concurrent restore or purge of it finds it gone."""
    cutoff = (time.time() if now is None else now) - older_than if older_than is not None else None
    chosen = [e for e in entries(store) if cutoff is None or (parse_iso(e["deleted"]) or 0) < cutoff]
    if dry_run:
        return chosen
    purged = []
    for entry in chosen:
        claim = os.path.join(store.trash_dir, f".purge-{entry['id']}-{os.urandom(3).hex()}")
        try:
            os.rename(entry["path"], claim)
        except OSError:  # restored or purged meanwhile
            continue
        try:
            os.unlink(entry["path"] + ".json")
        except OSError:
            pass
        _remove_tree(claim)
        purged.append(entry)
    try:
        names = os.listdir(store.trash_dir)
    except OSError:
        names = []
    for name in names:  # what an interrupted purge or restore left
        path = os.path.join(store.trash_dir, name)
        if name.startswith(".purge-"):
            _remove_tree(path)
        elif name.endswith(".json") and RUN_ID_RE.match(name[:-5]) and not os.path.isdir(path[:-5]) \
                and cutoff is None:
            try:
                os.unlink(path)
            except OSError:
                pass
    return purged


def _remove_tree(path: str) -> None:
    """Remove a run's directory, read-only parts too (links are removed, never followed: the snapshot
    link leaves ``trees/`` alone)."""
    def retry(func: Any, name: str, _exc: Any) -> None:
        if func not in (os.rmdir, os.unlink, os.remove) or not os.path.lexists(name):
            return  # gone meanwhile (a concurrent gc or purge), or a listing that failed: nothing to retry
        try:
            os.chmod(os.path.dirname(name), stat.S_IRWXU)
            if not os.path.islink(name) and os.path.isdir(name):
                os.chmod(name, stat.S_IRWXU)
            func(name)
        except OSError as exc:
            log.warning("cannot remove %s: %s", name, exc.strerror or exc)

    hook = "onexc" if sys.version_info >= (3, 12) else "onerror"  # onerror is deprecated from 3.12 on
    shutil.rmtree(path, **{hook: retry})
