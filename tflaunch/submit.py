"""From an estimator to a recorded run: validate, snapshot, record (shared by the CLI and the API).

:func:`prepare` does every check that can fail because of the user's input and writes nothing;
:func:`create_run` records the run and stores its snapshot; the caller then supervises it in this
process (``tflaunch run``) or in the background (:func:`tflaunch.supervise.spawn_detached`).
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field

from . import __version__, snapshot
from .errors import SnapshotError, SpecError
from .gpus import host_gpus
from .hosts import Host, is_local
from .launch.ssh import SshOptions, resolve_addresses
from .plan import RunContext, plan, ports_needed
from .probe import check_framework, resolve_python
from .spec import Estimator, JobSpec
from .store import CANCELED, FAILED, RunRecord, Store, now_iso, validate_experiment_name
from .supervise import DEFAULT_GRACE
from .target import target_hosts
from .tfconfig import TF_BACKENDS

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["SubmitOptions", "Prepared", "prepare", "create_run", "dry_run"]


@dataclass
class SubmitOptions:
    """How to submit: where the store is, which experiment, snapshot limits, kill grace, scratch."""

    experiment: str = "default"
    home: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    limits: snapshot.SnapshotLimits | None = None
    grace: float = DEFAULT_GRACE
    scratch: str | None = None


@dataclass
class Prepared:
    store: Store
    spec: JobSpec
    scan: snapshot.Scan
    environment: dict[str, Any] | None
    options: SubmitOptions
    gpus: dict[str, list[str]] | None = None  # GPUs known before launch (see known_gpus)


def _platform() -> str:
    uname = os.uname()
    return f"{uname.sysname}-{uname.release}-{uname.machine}"


def prepare(estimator: Estimator, options: SubmitOptions) -> Prepared:
    """Validate everything about the job without writing anything."""
    if not isinstance(estimator, Estimator):
        raise SpecError(f"submit() needs an Estimator or TensorFlow object, got {type(estimator).__name__}")
    validate_experiment_name(options.experiment)
    if not isinstance(options.grace, (int, float)) or isinstance(options.grace, bool) or options.grace < 0:
        raise SpecError(f"grace (--grace): must be a number of seconds >= 0, got {options.grace!r}")
    for key, value in options.tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError(f"tags: keys and values must be strings, got {key!r}: {value!r}")
    store = Store(options.home)
    spec = estimator.job_spec()
    spec.python = resolve_python(spec.python)
    scan = snapshot.scan(spec.source_directory, spec.entry_script, home=store.home,
                         limits=options.limits or snapshot.SnapshotLimits.from_env())
    spec.source_directory, spec.entry_script = scan.root, scan.entry_script
    if options.scratch is not None:
        options.scratch = os.path.abspath(options.scratch)
        if not os.path.isdir(options.scratch):
            raise SpecError(f"scratch (--scratch): {options.scratch} is not a directory")
    gpus = known_gpus(spec, target_hosts(spec.compute_target)[:spec.node_count])
    if (spec.distributed or {}).get("backend") == "mpi":
        check_mpi(spec)
    environment = check_framework(spec, scan.root)
    return Prepared(store, spec, scan, environment, options, gpus)


def create_run(prepared: Prepared) -> RunRecord:
    """Record the run (status Preparing) and store its snapshot."""
    options = prepared.options
    definition = {
        "spec": prepared.spec.to_dict(),
        "grace": float(options.grace),
        "scratch": options.scratch,
        "tflaunch_version": __version__,
        "submitted_from": {"python": sys.version.split()[0], "platform": _platform(), "cwd": os.getcwd()},
        "environment": prepared.environment,
    }
    record = prepared.store.create_run(options.experiment, definition, tags=options.tags)
    try:
        snapshot.store(prepared.scan, prepared.store.home, record.dir)
    except KeyboardInterrupt:
        record.write_status(CANCELED, ended=now_iso(), cancel_reason="interrupted while taking the snapshot")
        raise
    except (OSError, SnapshotError) as exc:
        message = f"storing the snapshot failed: {getattr(exc, 'strerror', None) or exc}"
        try:
            record.release_reserve()
            record.write_status(FAILED, ended=now_iso(), error={"reason": "snapshot", "message": message})
        except OSError:
            pass
        raise SnapshotError(f"run {record.id}: {message}") from None
    return record


def known_gpus(spec: JobSpec, hosts: list[Host]) -> dict[str, list[str]] | None:
    """The GPUs of the hosts that can be known before launch (this machine's, or all with
    ``gpus_per_node``); a remote host's are known when its agent reports them. SpecError when there
    are none or too few."""
    if not spec.use_gpu:
        return None
    from .agent import find_gpus

    gpus = {h.name: host_gpus(h.name, find_gpus() if is_local(h.name) else {}, spec.gpus_per_node)
            for h in hosts if is_local(h.name) or spec.gpus_per_node}
    ctx = RunContext(run_id="check", experiment="check", run_dir="/", work_dir="/", home="/")
    plan(spec, ctx, hosts, gpus=gpus)  # too few GPUs for the processes of a host: SpecError
    return gpus


def check_mpi(spec: JobSpec) -> None:
    """Find and identify the job's mpirun (recorded in ``spec.distributed["mpi"]``) and check that its
    flavour can express the job; SpecError otherwise."""
    from .mpijob import launch_for
    from .mpirun import SRUN_MPI, detect, find_mpirun

    dist = spec.distributed
    install = detect(find_mpirun(dist.get("mpirun"), spec.python))
    dist["mpi"] = install.to_dict()
    if dist.get("launcher") == "srun":
        if (spec.compute_target or {}).get("source") != "SLURM_JOB_NODELIST":
            raise SpecError("--mpi-launcher srun: only inside a Slurm allocation (salloc/sbatch: SLURM_JOB_NODELIST "
                            "is not set)")
        dist["srun_mpi"] = dist.get("srun_mpi") or SRUN_MPI[install.flavour]
    ctx = RunContext(run_id="check", experiment="check", run_dir="/", work_dir="/", home="/")
    hosts = target_hosts(spec.compute_target)[:spec.node_count]
    launch_for(spec, plan(spec, ctx, hosts), "check", remote=not all(is_local(h.name) for h in hosts))


def dry_run(prepared: Prepared) -> dict[str, Any]:
    """What ``create_run`` + launch would do, as a JSON-able dict (nothing is written)."""
    store, spec = prepared.store, prepared.spec
    run_id = Store.new_run_id()
    run_dir = os.path.join(store.runs_dir, run_id)
    scratch = prepared.options.scratch
    work_dir = os.path.join(scratch, run_id) if scratch else os.path.join(run_dir, "work")
    ctx = RunContext(run_id=run_id, experiment=prepared.options.experiment, run_dir=run_dir,
                     work_dir=work_dir, home=store.home)
    hosts = target_hosts(spec.compute_target)[:spec.node_count]
    ports = ports_needed(spec, hosts)
    remote = [h.name for h in hosts if not is_local(h.name)]
    addresses = {}
    if remote and (ports or (spec.distributed or {}).get("backend") in TF_BACKENDS):
        addresses = resolve_addresses(remote, SshOptions.from_dict((spec.compute_target or {}).get("ssh")))
        addresses.update({h.name: socket.gethostname() for h in hosts if is_local(h.name)})
    processes = plan(spec, ctx, hosts, addresses=addresses, gpus=prepared.gpus)
    launcher = None
    if (spec.distributed or {}).get("backend") == "mpi":
        from .mpijob import launch_for
        launcher = launch_for(spec, processes, run_id, remote=bool(remote)).to_dict()
        launcher["mpi"] = spec.distributed["mpi"]
    return {
        "dry_run": True,
        "run_id": run_id,
        "experiment": prepared.options.experiment,
        "home": store.home,
        "snapshot": {"source_directory": prepared.scan.root, "entry_script": prepared.scan.entry_script,
                     "file_count": len(prepared.scan.files), "total_bytes": prepared.scan.total_bytes,
                     "notes": prepared.scan.notes},
        "timeout": spec.max_run_duration_seconds,
        "grace": prepared.options.grace,
        "compute_target": spec.compute_target,
        "hosts": [{"name": h.name, "slots": h.slots, "local": is_local(h.name)} for h in hosts],
        "ports": ports,
        "addresses": addresses,
        "processes": [p.to_dict() for p in processes],
        "launcher": launcher,
    }
