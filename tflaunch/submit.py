"""From an estimator to a recorded run: validate, snapshot, record (shared by the CLI and the API).

:func:`prepare` does every check that can fail because of the user's input and writes nothing;
:func:`create_run` records the run and stores its snapshot; the caller then supervises it in this
process (``tflaunch run``) or in the background (:func:`tflaunch.supervise.spawn_detached`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
from dataclasses import dataclass, field

from . import __version__, fsio, gitinfo, snapshot
from .errors import SnapshotError, SpecError
from .gpus import host_gpus
from .hosts import Host, is_local
from .launch.ssh import SshOptions, resolve_addresses
from .plan import RunContext, plan, ports_needed
from .probe import check_framework, resolve_python
from .spec import Estimator, JobSpec
from .store import CANCELED, FAILED, QUEUED, TERMINAL, RunRecord, Store, now_iso, validate_experiment_name
from .supervise import DEFAULT_GRACE, in_job_command
from .target import target_hosts
from .tfconfig import TF_BACKENDS, backend

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["SubmitOptions", "Prepared", "prepare", "create_run", "dry_run", "submit_slurm", "start", "cancel_run"]

log = logging.getLogger(__name__)


@dataclass
class SubmitOptions:
    """How to submit: where the store is, which experiment, snapshot limits, kill grace, scratch."""

    experiment: str = "default"
    home: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    limits: snapshot.SnapshotLimits | None = None
    grace: float = DEFAULT_GRACE
    scratch: str | None = None
    workspace_config: dict[str, Any] = field(default_factory=dict)  # Workspace.from_config(): index options


@dataclass
class Prepared:
    store: Store
    spec: JobSpec
    scan: snapshot.Scan
    environment: dict[str, Any] | None
    options: SubmitOptions
    gpus: dict[str, list[str]] | None = None  # GPUs known before launch (see known_gpus)
    definition_extra: dict[str, Any] = field(default_factory=dict)  # more fields for run.json (a sweep's)


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
    if (spec.compute_target or {}).get("kind") == "slurm":
        check_slurm(spec)
    hosts = target_hosts(spec.compute_target)[:spec.node_count]
    gpus = known_gpus(spec, hosts)
    if backend(spec) == "mpi":
        check_mpi(spec)
    check_inputs(spec, hosts)
    request_environment(spec, store.home, options.workspace_config)
    environment = None if _env_has_tensorflow(spec.environment) else check_framework(spec, scan.root)
    return Prepared(store, spec, scan, environment, options, gpus)


def request_environment(spec: JobSpec, home: str, workspace_config: dict[str, Any] | None = None) -> None:
    """``spec.environment``: the environment the job needs built (:mod:`tflaunch.envs`), from its packages,
    its framework version and the index options (the job's, over the workspace's and the home's config)."""
    packages = spec.packages or {}
    version = (spec.framework or {}).get("version")
    if version is not None and "." not in version:
        version = None  # '2': any 2.x the interpreter has (check_framework); an environment needs a series
    if not (packages.get("pip") or packages.get("conda") or packages.get("requirements_file") or version):
        return
    from . import config, envs

    index = envs.IndexOptions.layered(config.index_defaults(home, workspace_config), packages.get("index"))
    dist = spec.distributed or {}
    request = envs.request_environment(
        spec.python, pip_packages=packages.get("pip") or (), requirements_file=packages.get("requirements_file"),
        conda_packages=packages.get("conda") or (), framework_version=version, use_gpu=spec.use_gpu, index=index,
        inherit=packages.get("inherit", True), mpi=dist.get("mpi") if backend(spec) == "mpi" else None,
        env=spec.environment_variables, home=home)
    spec.environment = {**request.to_dict(), "key": request.key} if request is not None else None


def _env_has_tensorflow(environment: dict[str, Any] | None) -> bool:
    """Whether the job's environment brings TensorFlow itself (then the interpreter need not have it)."""
    if not environment:
        return False
    if environment.get("framework"):
        return True
    return any(str(r).lower().startswith(("tensorflow", "tf-nightly")) for r in environment.get("requirements") or ())


def check_inputs(spec: JobSpec, hosts: list[Host]) -> None:
    """The job's data inputs exist here when this machine is every host (others are asked at launch);
    downloads need the hosts' agents, which an srun step does not have."""
    target = spec.compute_target or {}
    if any(i["mode"] == "download" for i in spec.inputs) and target.get("launcher") == "srun" \
            and (target.get("kind") == "slurm" or target.get("source") == "SLURM_JOB_NODELIST"):
        raise SpecError("as_download() (--data NAME=PATH:download) with Slurm's srun launcher: use as_mount() (the "
                        "nodes see the path), or --launcher ssh")
    if not spec.inputs or not all(is_local(h.name) for h in hosts):
        return
    for item in spec.inputs:
        for path in item["paths"]:
            if not os.path.exists(path):
                raise SpecError(f"input {item['name']!r}: {path} does not exist")


def create_run(prepared: Prepared) -> RunRecord:
    """Record the run (status Preparing) and store its snapshot."""
    options = prepared.options
    git, patch = gitinfo.collect(prepared.spec.source_directory)
    if patch is not None:
        git["patch_sha256"] = hashlib.sha256(patch).hexdigest()
    definition = {
        "spec": prepared.spec.to_dict(),
        "grace": float(options.grace),
        "scratch": options.scratch,
        "tflaunch_version": __version__,
        "submitted_from": {"python": sys.version.split()[0], "platform": _platform(), "cwd": os.getcwd()},
        "environment": prepared.environment,
        "git": git,
        **prepared.definition_extra,
    }
    record = prepared.store.create_run(options.experiment, definition, tags=options.tags)
    if patch is not None:
        try:
            fsio.atomic_write_bytes(record.path(gitinfo.PATCH_NAME), patch)
        except OSError as exc:
            log.warning("run %s: cannot store the uncommitted changes as %s: %s", record.id, gitinfo.PATCH_NAME, exc)
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


def create_child_run(parent: RunRecord, spec: JobSpec, run_id: str, extra: dict[str, Any]) -> RunRecord:
    """Record a run made from ``parent``'s definition (a sweep's trial): ``spec`` instead of the parent's,
    the parent's snapshot and git information (nothing is read from the source directory again) and
    ``extra`` fields (``parent``, ``hyperparameters``, ...). The run is Preparing, leased by this process."""
    definition = {k: v for k, v in parent.definition().items()
                  if k not in ("id", "experiment", "created", "kind", "sweep")}
    definition.update(extra, spec=spec.to_dict())
    status = parent.read_status(check_lease=False) or {}
    record = parent.store.create_run(status.get("experiment") or "default", definition, run_id=run_id,
                                     tags=dict(status.get("tags") or {}))
    try:
        snapshot.link(parent.store.home, parent.dir, record.dir)
        if os.path.exists(parent.path(gitinfo.PATCH_NAME)):
            with open(parent.path(gitinfo.PATCH_NAME), "rb") as fh:
                fsio.atomic_write_bytes(record.path(gitinfo.PATCH_NAME), fh.read())
    except (OSError, ValueError) as exc:
        message = f"giving the run the sweep's snapshot failed: {getattr(exc, 'strerror', None) or exc}"
        record.release_reserve()
        record.write_status(FAILED, ended=now_iso(), error={"reason": "snapshot", "message": message})
        raise SnapshotError(f"run {record.id}: {message}") from None
    return record


def check_slurm(spec: JobSpec) -> None:
    """A job to submit with sbatch: what Slurm must be asked for is known; sbatch is here."""
    from .slurm import CHECKPOINT_SIGNAL_VAR, SlurmOptions, require, signal_name

    options = SlurmOptions.from_dict(spec.compute_target["slurm"])
    if spec.use_gpu and not spec.gpus_per_node:
        raise SpecError("--gpu with --slurm: give --gpus-per-node N, the GPUs to ask Slurm for on each node")
    require("sbatch")
    if options.signal:
        spec.environment_variables.setdefault(CHECKPOINT_SIGNAL_VAR, signal_name(options.signal) or "")


def batch_script(spec: JobSpec, run_id: str, experiment: str, record_dir: str, home: str, **array: Any) -> str:
    """The batch script of a run submitted with ``--slurm`` (see :func:`tflaunch.slurm.batch_script`;
    ``array``: a sweep's job array, its ``array``, ``prelude`` and ``command_tail``)."""
    from .slurm import SlurmOptions
    from .slurm import batch_script as render

    target = spec.compute_target or {}
    ps = backend(spec) == "ps"
    command = in_job_command(home, run_id)
    return render(run_id=run_id, experiment=experiment, record_dir=record_dir,
                  options=SlurmOptions.from_dict(target.get("slurm")), nodes=spec.node_count,
                  ntasks_per_node=None if ps else spec.process_count_per_node,
                  ntasks=spec.world_size if ps else None,
                  gpus_per_node=spec.gpus_per_node if spec.use_gpu else None,
                  command=command[:-1] if array else command, **array)


def submit_slurm(prepared: Prepared) -> RunRecord:
    """Record the run, write its batch script into the record and ``sbatch`` it: the run is Queued,
    leased by its Slurm job. A refused submission ends the run Failed with sbatch's message (and
    raises SlurmError)."""
    return sbatch_run(create_run(prepared), prepared.spec, prepared.options.experiment)


def sbatch_run(record: RunRecord, spec: JobSpec, experiment: str) -> RunRecord:
    """``sbatch`` a recorded run (see :func:`submit_slurm`)."""
    from . import fsio
    from .slurm import OUTPUT, SCRIPT, SlurmError, submit

    if spec.environment:
        build_environment_here(record, spec)  # the login node may reach an index the nodes cannot
    script = batch_script(spec, record.id, experiment, record.dir, record.store.home)
    path = record.path(SCRIPT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fsio.atomic_write_bytes(path, script.encode("utf-8"))
    os.chmod(path, 0o755)
    try:
        job = submit(path)
    except (SlurmError, KeyboardInterrupt) as exc:
        record.release_reserve()
        if isinstance(exc, KeyboardInterrupt):
            record.write_status(CANCELED, ended=now_iso(), cancel_reason="interrupted while submitting to Slurm")
        else:
            record.write_status(FAILED, ended=now_iso(), error={"reason": "slurm_rejected", "message": str(exc)})
        try:
            os.unlink(record.path("lease.json"))
        except OSError:
            pass
        raise
    record.lease_slurm_job(job)
    record.event("slurm_submitted", job_id=job, script=SCRIPT)
    # tflaunch inside the job waits for Queued before it starts: this never overwrites its Running
    record.write_status(QUEUED, slurm={"job_id": job, "submitted": True, "script": SCRIPT,
                                       "output": OUTPUT.replace("%j", job)})
    return record


def build_environment_here(record: RunRecord, spec: JobSpec) -> None:
    """Build (or reuse) the job's environment under the home from this process, into the record's
    environment log; a failure ends the run Failed (reason ``environment``) and is raised."""
    from . import envs
    from .errors import TflaunchError
    from .hostprep import ENV_LOG

    record.event("environment_building", key=spec.environment.get("key"))
    try:
        with open(record.path(ENV_LOG), "ab") as fh:
            result = envs.ensure_environment(envs.EnvRequest.from_dict(spec.environment),
                                             envs.home_envs_root(record.store.home), log=fh)
    except (TflaunchError, KeyboardInterrupt) as exc:
        record.release_reserve()
        if isinstance(exc, KeyboardInterrupt):
            record.write_status(CANCELED, ended=now_iso(), cancel_reason="interrupted while building the environment")
        else:
            record.write_status(FAILED, ended=now_iso(), error={"reason": "environment", "message": str(exc)})
        try:
            os.unlink(record.path("lease.json"))
        except OSError:
            pass
        raise
    record.event("environment", key=result.key, built=result.built, seconds=round(result.seconds, 3))


def start(prepared: Prepared) -> RunRecord:
    """Record the run and start it in the background (a local supervisor, or a Slurm job)."""
    if (prepared.spec.compute_target or {}).get("kind") == "slurm":
        return submit_slurm(prepared)
    from .supervise import spawn_detached

    record = create_run(prepared)
    spawn_detached(record)
    return record


def cancel_run(record: RunRecord, reason: str) -> dict[str, Any]:
    """Ask for the run to stop (its launcher sees the request); a run submitted to Slurm is also
    ``scancel``-ed (pending: it never starts; running: every task gets SIGTERM, then SIGKILL after
    Slurm's KillWait). Returns the status before."""
    status = record.read_status() or {}
    if status.get("kind") == "sweep":  # its trials too (also when its driver is gone)
        if status.get("status") not in TERMINAL:
            record.request_cancel(reason)
        _cancel_trials(record, reason)
    if status.get("status") in TERMINAL:
        return status
    record.request_cancel(reason)
    info = status.get("slurm") or {}
    job = (record.lease() or {}).get("slurm_job_id") or info.get("job_id")
    if info.get("submitted") and job:
        from .slurm import cancel
        cancel(str(job))
        record.event("slurm_canceled", job_id=str(job))
    return status


def _cancel_trials(record: RunRecord, reason: str) -> list[str]:
    """Cancel every trial of the sweep ``record`` that has not ended; return their run ids."""
    from .sweep import trials

    try:
        state = trials.load(record.dir)
    except (OSError, ValueError):
        return []
    canceled = []
    for trial in state.get("trials", []):
        if trial.get("status") in trials.ENDED or not os.path.isdir(os.path.join(record.store.runs_dir,
                                                                                  trial["run_id"])):
            continue
        child = record.store.run(trial["run_id"])
        if (child.read_status() or {}).get("status") not in TERMINAL:
            cancel_run(child, f"sweep {record.id}: {reason}")
            canceled.append(child.id)
    return canceled


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
    if remote and (ports or backend(spec) in TF_BACKENDS):
        addresses = resolve_addresses(remote, SshOptions.from_dict((spec.compute_target or {}).get("ssh")))
        addresses.update({h.name: socket.gethostname() for h in hosts if is_local(h.name)})
    environment = None
    pythons = None
    if spec.environment:
        from . import envs
        request = envs.EnvRequest.from_dict(spec.environment)
        root = envs.home_envs_root(store.home)
        built = envs.ensure_environment(request, root) if envs.is_built(root, request.key) else None
        environment = {"key": request.key, "root": root, "status": "ready" if built else "to be built",
                       "python": built.python if built else None, "packages": request.packages(),
                       "request": spec.environment}
        if built is not None:
            pythons = {h.name: built.python for h in hosts}
    processes = plan(spec, ctx, hosts, addresses=addresses, gpus=prepared.gpus, pythons=pythons)
    launcher = None
    slurm_plan = None
    if (spec.compute_target or {}).get("kind") == "slurm":
        script = batch_script(spec, run_id, prepared.options.experiment, run_dir, store.home)
        slurm_plan = {"script": script, "sbatch": ["sbatch", "--parsable", os.path.join(run_dir, "slurm", "job.sbatch")],
                      "note": "hosts are placeholders until Slurm allocates the nodes"}
    if backend(spec) == "mpi":
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
        "slurm": slurm_plan,
        "environment": environment,
        "setup_commands": list(spec.setup_commands),
        "inputs": list(spec.inputs),
    }
