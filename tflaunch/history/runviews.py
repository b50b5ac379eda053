"""What is shown of a run: the run object with its duration and what its script logged, the full
description ``runs show`` prints, and copies of its files (``runs download``)."""
from __future__ import annotations

import logging
import os
import shutil
import time

from .. import fsio
from ..errors import PathSafetyError, StoreError
from .layout import RERUNS_DIR, RUN_ID_RE, TERMINAL, parse_iso

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .record import RunRecord

__all__ = ["with_duration", "with_tracking", "describe", "placement", "download", "reruns_of"]

log = logging.getLogger(__name__)


def with_duration(run: dict[str, Any]) -> dict[str, Any]:
    """The run object plus ``duration_seconds`` (from started, else created, to ended or now)."""
    out = dict(run)
    start = parse_iso(run.get("started")) or parse_iso(run.get("created"))
    end = parse_iso(run.get("ended")) or (None if run.get("status") in TERMINAL else time.time())
    # never negative: a record whose clock went backwards (or written before ended was kept >= started)
    out["duration_seconds"] = max(0.0, round(end - start, 3)) if start and end else None
    return out


def with_tracking(record: RunRecord, run: dict[str, Any]) -> dict[str, Any]:
    """The run object plus what its script logged: ``metrics`` (the latest value of each scalar metric),
    its tags merged over the submitted ones, and ``properties`` when it set any."""
    from . import metrics

    out = dict(run)
    try:
        out["metrics"] = metrics.latest(record.dir)
        tags, properties = metrics.properties_and_tags(record.dir)
    except (OSError, ValueError) as exc:
        log.warning("run %s: cannot read its metrics: %s", record.id, exc)
        return out
    if tags:
        out["tags"] = {**(run.get("tags") or {}), **tags}
    if properties:
        out["properties"] = properties
    return out


def describe(record: RunRecord) -> dict[str, Any]:
    """Everything ``runs show --json`` prints: the run object plus what was run and where."""
    status = record.read_status()
    if status is None:
        problem = record.status_damage() or "status.json is missing or unreadable"
        raise StoreError(f"run {record.id} is damaged: {problem} (changed outside tflaunch; its record: {record.dir})")
    definition = record.definition()
    spec = definition.get("spec", {})
    withheld = list(definition.get("withheld_environment") or ())
    out = with_duration(with_tracking(record, status))
    out.update({
        "arguments": spec.get("arguments", []),
        "source_directory": spec.get("source_directory"),
        "python": spec.get("python"),
        "environment_variables": sorted({*spec.get("environment_variables", {}), *withheld}),
        "withheld_environment": withheld,  # secret variables: names only, their values are never recorded
        "use_gpu": spec.get("use_gpu"),
        "timeout": spec.get("max_run_duration_seconds"),
        "framework": definition.get("environment"),
        "git": definition.get("git"),
        "run_dir": record.dir,
        "rerun_of": definition.get("rerun_of"),
        "reruns": reruns_of(record),
    })
    out.update(placement(record, spec))
    if definition.get("rerun_overrides"):
        out["rerun_overrides"] = definition["rerun_overrides"]
    if os.path.exists(record.path("early_termination.json")):  # a sweep's policy stopped this trial
        try:
            out["early_termination"] = fsio.read_json(record.path("early_termination.json"))
        except (OSError, ValueError):
            pass
    if out.get("environment"):
        try:  # the environment's own packages (pip freeze), as the first host had them
            hosts = fsio.read_json(record.path("environment.json")).get("hosts") or {}
            first = next(iter(hosts.values()), {})
            out["environment"] = {**out["environment"], "path": first.get("path"),
                                  "freeze": list(first.get("freeze") or [])}
        except (OSError, ValueError, AttributeError, StopIteration):
            pass
    return out


_HOST_FIELDS = ("name", "hostname", "address", "local", "shared_filesystem", "ports", "gpus")
_PROCESS_FIELDS = ("rank", "role", "index", "host", "local_rank", "port", "cuda_visible_devices")
_NOT_HOSTS = ("(launcher)", "(this machine)")  # agents on the launcher's machine that only start mpirun, build


def placement(record: RunRecord, spec: dict[str, Any]) -> dict[str, Any]:
    """Where the run ran: ``backend`` (``plain``, ``ps``, ``multiworker``, ``mpi``), ``hosts`` (from
    ``hosts.json``, each with the ``ranks`` it ran; an MPI job's mpirun agent on this machine is not a host)
    and ``processes`` (from ``processes.json``: rank, role, index, host, local rank, port, GPUs). Hosts
    and processes are empty lists before the processes were planned."""
    def rows(name: str) -> list[dict[str, Any]]:
        try:
            found = fsio.read_json(record.path(name))
        except (OSError, ValueError):
            return []
        return [row for row in found if isinstance(row, dict)] if isinstance(found, list) else []

    processes = [{k: row.get(k) for k in _PROCESS_FIELDS} for row in rows("processes.json")]
    hosts = [{k: row.get(k) for k in _HOST_FIELDS} for row in rows("hosts.json")
             if row.get("name") not in _NOT_HOSTS]  # records written before hosts.json left them out
    named = {h["name"] for h in hosts}
    hosts += [{"name": name} for name in dict.fromkeys(p["host"] for p in processes) if name not in named]
    for host in hosts:  # hosts.json may be missing (mpirun on this machine alone, an srun step's own)
        host["ranks"] = [p["rank"] for p in processes if p["host"] == host["name"]]
    return {"backend": (spec.get("distributed") or {}).get("backend") or "plain", "hosts": hosts,
            "processes": processes}


def reruns_of(record: RunRecord) -> list[str]:
    """The ids of the runs made as reruns of ``record`` (its ``reruns/<id>.json``), oldest first."""
    try:
        names = os.listdir(record.path(RERUNS_DIR))
    except OSError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".json") and RUN_ID_RE.match(n[:-5]))


def download(record: RunRecord, name: str, dest: str | None = None) -> str:
    """Copy run file (or directory) ``name`` to ``dest`` (default: its base name here); return the path."""
    source = record.safe_path(name)
    if not os.path.lexists(source):
        raise PathSafetyError(f"run {record.id} has no file {name!r} (see `tflaunch runs files {record.id}`)")
    base = os.path.basename(source.rstrip(os.sep)) or record.id
    target = os.path.abspath(dest) if dest else os.path.abspath(base)
    if os.path.isdir(target) and not os.path.isdir(source):
        target = os.path.join(target, base)
    try:
        if os.path.isdir(source):
            if os.path.exists(target):
                target = os.path.join(target, base)
            shutil.copytree(source, target, symlinks=True)
        else:
            parent = os.path.dirname(target)
            if parent:
                os.makedirs(parent, exist_ok=True)
            shutil.copyfile(source, target)
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
