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
from dataclasses import dataclass, field, replace

from . import __version__, fsio, progress
from .history import gitinfo, snapshot
from .errors import SnapshotError, SpecError
from .plan.gpus import host_gpus
from .spec.hosts import Host, is_local
from .launch.ssh import SshOptions, resolve_addresses
from .plan.distributions import distribution
from .plan.processes import ProcessPlan, RunContext, plan, ports_needed
from .probe import check_framework, resolve_python
from .spec import Estimator, JobSpec
from .history.store import CANCELED, FAILED, TERMINAL, RunRecord, Store, now_iso, validate_experiment_name
from .schedule import submission
from .supervise import DEFAULT_GRACE
from .spec.target import target_hosts

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
    run_id: str = ""  # the run's id, chosen before it is recorded (the plan and the dry run show it)
    processes: list[ProcessPlan] = field(default_factory=list)  # the plan, with what is known before launch


def run_context(store: Store, options: SubmitOptions, run_id: str) -> RunContext:
    """The run's context as its supervisor will have it: its record's and working directory's paths (not the
    copy of tflaunch for the script's imports, made only when the run starts)."""
    run_dir = os.path.join(store.runs_dir, run_id)
    work_dir = os.path.join(options.scratch, run_id) if options.scratch else os.path.join(run_dir, "work")
    return RunContext(run_id=run_id, experiment=options.experiment, run_dir=run_dir, work_dir=work_dir,
                      home=store.home)


def _platform() -> str:
    uname = os.uname()
    return f"{uname.sysname}-{uname.release}-{uname.machine}"


def prepare(estimator: Estimator, options: SubmitOptions) -> Prepared:
    """Validate everything about the job without writing anything: the spec is resolved (its interpreter,
    snapshot root, MPI, scheduler variables, environment request: a new spec each time, the estimator's is
    not changed) and planned once, with the run's own id and paths."""
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
    spec = replace(spec, python=resolve_python(spec.python))
    progress.report("snapshot", f"snapshot: reading {os.path.abspath(spec.source_directory)}")
    scan = snapshot.scan(spec.source_directory, spec.entry_script, home=store.home,
                         limits=options.limits or snapshot.SnapshotLimits.from_env())
    progress.report("snapshot", f"snapshot: {_files_text(len(scan.files), scan.total_bytes)} to store")
    spec = replace(spec, source_directory=scan.root, entry_script=scan.entry_script)
    if options.scratch is not None:
        options.scratch = os.path.abspath(options.scratch)
        if not os.path.isdir(options.scratch):
            raise SpecError(f"scratch (--scratch): {options.scratch} is not a directory")
    submitter = submission(spec.compute_target)
    if submitter is not None:  # what the scheduler gives the processes (a checkpoint signal's name)
        spec = replace(spec, environment_variables={**submitter.check(spec), **spec.environment_variables})
    elif (spec.recovery or {}).get("max_requeues"):
        raise SpecError("--max-requeues (max_requeues): only a run submitted to Slurm (run --slurm) is requeued "
                        "and goes on in the job's next allocation")
    hosts = target_hosts(spec.compute_target)[:spec.node_count]
    gpus = known_gpus(spec, hosts)
    mpi = distribution(spec.distributed).launcher == "mpirun"
    if mpi:
        spec = replace(spec, distributed={**spec.distributed, **find_mpi(spec)})
    run_id = Store.new_run_id()
    processes = plan(spec, run_context(store, options, run_id), hosts, gpus=gpus)  # too few GPUs: SpecError
    if mpi:
        from .launch.mpi import launch_for  # the flavour can express the job
        launch_for(spec, processes, run_id, remote=not all(is_local(h.name) for h in hosts))
    check_inputs(spec, hosts)
    spec = replace(spec, environment=environment_request(spec, store.home, options.workspace_config))
    environment = None if _env_has_tensorflow(spec.environment) else check_framework(spec, scan.root)
    return Prepared(store, spec, scan, environment, options, gpus, run_id=run_id, processes=processes)


def environment_request(spec: JobSpec, home: str, workspace_config: dict[str, Any] | None = None,
                        ) -> dict[str, Any] | None:
    """What ``spec.environment`` records: the environment the job needs built (:mod:`tflaunch.envs`), from
    its packages, its framework version and the index options (the job's, over the workspace's and the
    home's config); None when it needs none."""
    packages = spec.packages or {}
    version = (spec.framework or {}).get("version")
    if version is not None and "." not in version:
        version = None  # '2': any 2.x the interpreter has (check_framework); an environment needs a series
    if not (packages.get("pip") or packages.get("conda") or packages.get("requirements_file") or version):
        return spec.environment
    from . import config, envs

    index = envs.IndexOptions.layered(config.index_defaults(home, workspace_config), packages.get("index"))
    dist = spec.distributed or {}
    request = envs.request_environment(
        spec.python, pip_packages=packages.get("pip") or (), requirements_file=packages.get("requirements_file"),
        conda_packages=packages.get("conda") or (), framework_version=version, use_gpu=spec.use_gpu, index=index,
        inherit=packages.get("inherit", True), mpi=dist.get("mpi") if distribution(dist).launcher == "mpirun" else None,
        env=spec.environment_variables, home=home)
    return {**request.to_dict(), "key": request.key} if request is not None else None


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


def _files_text(files: int, size: int) -> str:
    """``1,234 files (56.0 MB)``."""
    from .textfmt import size_text

    return f"{files:,} file{'s' if files != 1 else ''} ({size_text(size)})"


def _storing(scan: snapshot.Scan) -> Any:
    """The snapshot stage's progress while files are read and stored (from the store's threads), at most
    every 0.1 s: ``snapshot: storing, 3,400 files (340.0 MB) read of 10,000 (1.0 GB)``."""
    import threading
    import time

    lock, done, shown = threading.Lock(), [0, 0], [time.monotonic()]
    whole = _files_text(len(scan.files), scan.total_bytes).replace(" file ", " ").replace(" files ", " ")

    def stored(f: Any) -> None:
        with lock:
            done[0] += 1
            done[1] += f.size
            if time.monotonic() - shown[0] >= 0.1:
                shown[0] = time.monotonic()
                progress.report("snapshot", f"snapshot: storing, {_files_text(done[0], done[1])} read of {whole}")
    return stored


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
    record = prepared.store.create_run(options.experiment, definition, run_id=prepared.run_id or None,
                                       tags=options.tags)
    if patch is not None:
        try:
            fsio.atomic_write_bytes(record.path(gitinfo.PATCH_NAME), patch)
        except OSError as exc:
            log.warning("run %s: cannot store the uncommitted changes as %s: %s", record.id, gitinfo.PATCH_NAME, exc)
    try:
        snapshot.store(prepared.scan, prepared.store.home, record.dir, progress=_storing(prepared.scan))
        scan = prepared.scan
        progress.report("snapshot", f"snapshot: {_files_text(len(scan.files), scan.total_bytes)} stored", done=True)
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


def submit_slurm(prepared: Prepared) -> RunRecord:
    """Record the run and submit it to its scheduler (:mod:`tflaunch.schedule`: sbatch): the run is Queued,
    leased by its job. A refused submission ends the run Failed with the scheduler's message (and raises)."""
    return sbatch_run(create_run(prepared), prepared.spec, prepared.options.experiment)


def sbatch_run(record: RunRecord, spec: JobSpec, experiment: str) -> RunRecord:
    """Submit a recorded run (see :func:`submit_slurm`): its environment is built here first (the login node
    may reach an index the nodes cannot)."""
    if spec.environment:
        build_environment_here(record, spec)
    record.hand_over_withheld()  # the job's supervisor reads the secret variables' values from the record
    return submission(spec.compute_target).submit(record, spec, experiment)


def build_environment_here(record: RunRecord, spec: JobSpec) -> None:
    """Build (or reuse) the job's environment under the home from this process, into the record's
    environment log; a failure ends the run Failed (reason ``environment``) and is raised."""
    from . import envs
    from .errors import TflaunchError
    from .launch.hostprep import ENV_LOG

    record.event("environment_building", key=spec.environment.get("key"))
    progress.report("environment", f"environment: building or reusing {str(spec.environment.get('key'))[:12]} (log: "
                                   f"{record.path(ENV_LOG)})", slow=True)
    try:
        with open(record.path(ENV_LOG), "ab") as fh:
            result = envs.ensure_environment(envs.EnvRequest.from_dict(spec.environment),
                                             envs.home_envs_root(record.store.home), log=fh)
    except KeyboardInterrupt:
        record.end_unstarted(CANCELED, cancel_reason="interrupted while building the environment")
        raise
    except TflaunchError as exc:
        record.end_unstarted(FAILED, error={"reason": "environment", "message": str(exc)})
        raise
    record.event("environment", key=result.key, built=result.built, seconds=round(result.seconds, 3))
    progress.report("environment", f"environment: {result.key[:12]} {'built' if result.built else 'reused'} "
                                   f"({result.seconds:.1f} s)", done=True)


def start(prepared: Prepared) -> RunRecord:
    """Record the run and start it in the background (a local supervisor, or a Slurm job)."""
    if submission(prepared.spec.compute_target) is not None:
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
    submitter = submission((record.definition().get("spec") or {}).get("compute_target"))
    if submitter is not None:  # submitted to a scheduler: cancel the job there too
        submitter.cancel(record, status)
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
    from .remote.agent import find_gpus

    return {h.name: host_gpus(h.name, find_gpus() if is_local(h.name) else {}, spec.gpus_per_node)
            for h in hosts if is_local(h.name) or spec.gpus_per_node}


def find_mpi(spec: JobSpec) -> dict[str, Any]:
    """The job's mpirun, found and identified: what ``spec.distributed`` records of it (``mpi``, and
    ``srun_mpi`` for ``--mpi-launcher srun``); SpecError when there is none or it cannot be used so."""
    from .plan.mpirun import SRUN_MPI, detect, find_mpirun

    dist = spec.distributed
    install = detect(find_mpirun(dist.get("mpirun"), spec.python))
    found: dict[str, Any] = {"mpi": install.to_dict()}
    if dist.get("launcher") == "srun":
        if (spec.compute_target or {}).get("source") != "SLURM_JOB_NODELIST":
            raise SpecError("--mpi-launcher srun: only inside a Slurm allocation (salloc/sbatch: SLURM_JOB_NODELIST "
                            "is not set)")
        found["srun_mpi"] = dist.get("srun_mpi") or SRUN_MPI[install.flavour]
    return found


def dry_run(prepared: Prepared) -> dict[str, Any]:
    """What ``create_run`` + launch would do, as a JSON-able dict (nothing is written)."""
    store, spec, run_id = prepared.store, prepared.spec, prepared.run_id
    ctx = run_context(store, prepared.options, run_id)
    hosts = target_hosts(spec.compute_target)[:spec.node_count]
    ports = ports_needed(spec, hosts)
    remote = [h.name for h in hosts if not is_local(h.name)]
    addresses = {}
    if remote and (ports or distribution(spec.distributed).tf_config):
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
    processes = prepared.processes
    if addresses or pythons:  # known now, as the hosts will tell: the plan with them
        processes = plan(spec, ctx, hosts, addresses=addresses, gpus=prepared.gpus, pythons=pythons)
    launcher = None
    scheduled: dict[str, Any] = {"slurm": None}
    submitter = submission(spec.compute_target)
    if submitter is not None:
        scheduled[submitter.NAME] = submitter.describe(spec, run_id, prepared.options.experiment, ctx.run_dir,
                                                       store.home)
    if distribution(spec.distributed).launcher == "mpirun":
        from .launch.mpi import launch_for
        launcher = launch_for(spec, processes, run_id, remote=bool(remote)).to_dict()
        launcher["mpi"] = spec.distributed["mpi"]
    from .history.withheld import SecretNames
    secret = SecretNames.for_home(store.home)  # a secret variable's value is never shown: NAME=<withheld>
    shown = [p.to_dict() for p in processes]
    for item in shown + ([launcher] if launcher else []):
        item["env"] = secret.mask(item.get("env") or {})
    return {
        "dry_run": True,
        "run_id": run_id,
        "experiment": prepared.options.experiment,
        "home": store.home,
        "snapshot": {"source_directory": prepared.scan.root, "entry_script": prepared.scan.entry_script,
                     "file_count": len(prepared.scan.files), "total_bytes": prepared.scan.total_bytes,
                     "notes": prepared.scan.notes},
        "timeout": spec.max_run_duration_seconds,
        "recovery": spec.recovery,
        "grace": prepared.options.grace,
        "compute_target": spec.compute_target,
        "hosts": [{"name": h.name, "slots": h.slots, "local": is_local(h.name)} for h in hosts],
        "ports": ports,
        "addresses": addresses,
        "processes": shown,
        "launcher": launcher,
        **scheduled,
        "environment": environment,
        "setup_commands": list(spec.setup_commands),
        "inputs": list(spec.inputs),
    }
