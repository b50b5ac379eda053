"""A new run from a recorded one (``tflaunch runs rerun``, :meth:`tflaunch.api.Run.rerun`).

The new run gets the recorded run's snapshot (its manifest, so the same content-addressed tree under
``trees/``: the source directory is not read again and nothing is copied), its spec (the estimator as
it was resolved: interpreter, hosts, backend, environment request, data inputs), its git information
and its submitted tags, with the overrides given:

* ``script_params`` (``--arg NAME=VALUE`` / ``--arg NAME`` / ``--drop-arg NAME``): the recorded
  arguments with a parameter replaced in place (``--lr 0.1`` or ``--lr=0.1``, in the form it was
  given), added at the end when it was not there, or left out (``None``), as ``script_params`` reads
  them (see :func:`apply_arguments`);
* ``settings`` (``--set KEY=VALUE``): fields of the spec (:data:`SETTABLE`), checked as the estimator
  checks them; ``environment_variables.NAME`` sets one variable;
* the compute target (default: the recorded one, re-checked for the new process counts), the
  experiment (default: the recorded one), tags (added to the recorded ones), the kill grace, scratch.

The two records are linked: the new run's ``run.json`` and run object carry ``rerun_of`` (the old id)
and ``rerun_overrides``; the old run gets a file ``reruns/<new id>.json`` in its directory, created once
and never rewritten, so a finished record (or a running one, whose launcher owns ``status.json``) is
never rewritten and concurrent reruns never race. ``runs show`` lists both directions
(:func:`reruns_of`).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from . import __version__, fsio
from .errors import SnapshotError, SpecError, StoreError
from .history import gitinfo, snapshot
from .history.layout import RERUNS_DIR, now_iso
from .history.runviews import reruns_of
from .history.store import FAILED, RunRecord, Store
from .spec import JobSpec
from .spec.fields import SETTABLE
from .submit import Prepared, SubmitOptions
from .supervise import DEFAULT_GRACE

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable

__all__ = ["SETTABLE", "RERUNS_DIR", "RerunPrepared", "apply_arguments", "apply_settings", "parse_setting",
           "prepare_rerun", "create_rerun", "start_rerun", "rerun_dry_run", "reruns_of"]

log = logging.getLogger(__name__)

_RESERVED_ENV = ("TFLAUNCH_",)  # variables tflaunch added to the recorded spec (a sweep trial's, Slurm's)

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
RECOVERY_FIELDS = ("max_restarts", "restart_on_exit_codes", "restart_delay", "hang_timeout", "hang_grace",
                   "max_requeues")
# definition fields of the old run that are not the new run's
_NOT_INHERITED = ("id", "experiment", "created", "kind", "sweep", "parent", "trial", "hyperparameters",
                  "rerun_of", "rerun_overrides")


# -- arguments ---------------------------------------------------------------------------------------
def _is_option(token: str) -> bool:
    """Whether ``token`` is a parameter name rather than a value (``-5`` and ``-1e-3`` are values)."""
    if not token.startswith("-") or len(token) < 2:
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def _flag(name: str) -> str:
    return name if name.startswith("-") else f"--{name}"


def apply_arguments(arguments: list[str], params: Mapping[str, Any] | None) -> list[str]:
    """The recorded ``arguments`` with ``params`` (``{name: value}`` as ``script_params`` takes them) applied.

    ``name`` is ``--lr``, ``-l``, or ``lr`` (meaning ``--lr``). Its first occurrence in the arguments is
    changed in the form it has there: ``--lr=0.1`` becomes ``--lr=VALUE``, ``--lr 0.1`` gets its value
    token (the token after the name unless that is itself a name) replaced, a bare ``--lr`` gets the
    value inserted after it; a name that is not there is added at the end as ``--lr VALUE``. ``''``
    makes it a bare flag (its value token, if it has one, is dropped), ``None`` leaves it out (with its
    value). Values are ``str()``-ed; a list is refused (say the whole value as one string instead).
    """
    from .spec.script_params import _scalar_arg

    out = list(arguments)
    if params is None:
        return out
    if not isinstance(params, Mapping):
        raise SpecError(f"script_params: must be a dict such as {{'--lr': 0.1}}, got {type(params).__name__}")
    for name, value in params.items():
        if not isinstance(name, str) or not name or name in ("-", "--") or any(c.isspace() for c in name) \
                or "=" in name:
            raise SpecError(f"--arg {name!r}: give a parameter name such as --lr or lr (then =VALUE)")
        flag = _flag(name)
        if isinstance(value, (list, tuple)):
            raise SpecError(f"--arg {flag}: a list cannot replace a recorded argument; give one value")
        text = None if value is None else _scalar_arg(f"--arg {flag}", value)
        index = next((i for i, arg in enumerate(out) if arg == flag or arg.startswith(flag + "=")), None)
        if index is None:
            if text is not None:
                out += [flag] if text == "" else [flag, text]
            continue
        if out[index] != flag:  # --lr=0.1
            if text is None:
                del out[index]
            else:
                out[index] = flag if text == "" else f"{flag}={text}"
            continue
        has_value = index + 1 < len(out) and not _is_option(out[index + 1])
        if text is None:
            del out[index:index + (2 if has_value else 1)]
        elif text == "":
            if has_value:
                del out[index + 1]
        elif has_value:
            out[index + 1] = text
        else:
            out.insert(index + 1, text)
    return out


# -- spec fields ---------------------------------------------------------------------------------------
def _valid_keys() -> str:
    return ", ".join(SETTABLE)


def parse_setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--set`` (the value is converted by :func:`apply_settings`)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE (keys: {_valid_keys()})")
    return key, value


def _bool(label: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SpecError(f"{label}: expected true or false, got {value!r}")


def _none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))


def _int(label: str, value: Any, *, optional: bool = False) -> int | None:
    if optional and _none(value):
        return None
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise SpecError(f"{label}: expected an integer >= 1{', or none' if optional else ''}, got {value!r}")
    return number


def _seconds(label: str, value: Any) -> float | None:
    if _none(value):
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < float("inf"):
        raise SpecError(f"{label}: expected a number of seconds > 0, or none, got {value!r}")
    return float(number)


def apply_settings(spec: JobSpec, settings: Mapping[str, Any] | None, *, listing: dict[str, Any] | None = None,
                   label: Callable[[str, Any], str] | None = None) -> JobSpec:
    """``spec`` with the fields in ``settings`` set (a new spec; ``spec`` is not changed).

    Keys are :data:`SETTABLE`'s; values are typed (the API) or the strings ``--set`` gives (``true``,
    ``none``, numbers). ``environment_variables.NAME`` sets one variable (``None`` from the API removes
    it); ``environment_variables`` from the API is a dict merged over the recorded ones. ``listing``:
    the snapshot's tree listing, to check ``entry_script``. ``label(key, value)`` names the setting in
    errors (default ``--set KEY=VALUE``). SpecError for an unknown key or a bad value.
    """
    from .spec.fields import _env_vars

    spec = JobSpec.from_dict(spec.to_dict())  # a deep copy
    if not settings:
        return spec
    name_of = label or (lambda key, value: f"--set {key}={value}")
    given: set[str] = set()
    recovering: dict[str, Any] = {}
    env = dict(spec.environment_variables)
    for key, value in settings.items():
        where = name_of(key, value)
        if key.startswith("environment_variables.") and len(key) > len("environment_variables."):
            var = key[len("environment_variables."):]
            if value is None:
                env.pop(var, None)
            else:
                env.update(_env_vars({var: value}))
            continue
        if key == "environment_variables" and isinstance(value, Mapping):
            for var, item in value.items():
                if item is None:
                    env.pop(var, None)
                else:
                    env.update(_env_vars({var: item}))
            continue
        if key not in SETTABLE:
            raise SpecError(f"{where}: {key!r} is not a field that can be set (valid: {_valid_keys()})")
        given.add(key)
        if key in ("node_count", "process_count_per_node"):
            setattr(spec, key, _int(where, value))
        elif key == "gpus_per_node":
            spec.gpus_per_node = _int(where, value, optional=True)
        elif key == "max_run_duration_seconds":
            spec.max_run_duration_seconds = _seconds(where, value)
        elif key in ("use_gpu", "gpus_shared", "preflight"):
            setattr(spec, key, _bool(where, value))
        elif key == "python":
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise SpecError(f"{where}: expected the path of a Python interpreter, got {value!r}")
            python = os.fspath(value)
            spec.python = os.path.abspath(python) if os.sep in python else python
        elif key == "entry_script":
            spec.entry_script = _entry_in_snapshot(where, value, listing)
        elif key in RECOVERY_FIELDS:
            recovering[key] = _recovery_value(where, key, value)
    if recovering:
        from .spec.recovery import DEFAULT_DELAY, DEFAULT_HANG_GRACE, recovery

        recorded = dict(spec.recovery or {})
        for name, default in (("restart_delay", DEFAULT_DELAY), ("hang_grace", DEFAULT_HANG_GRACE)):
            if recorded.get(name) in (default, None):  # a default, not a choice: let recovery() decide again
                recorded.pop(name, None)
        merged = {**recorded, **recovering}
        try:
            spec.recovery = recovery(**{k: merged.get(k) for k in RECOVERY_FIELDS})
        except SpecError as exc:
            raise SpecError(f"{', '.join(name_of(k, settings[k]) for k in recovering)}: {exc}") from None
    spec.environment_variables = env
    if not spec.use_gpu:
        for key, empty in (("gpus_per_node", None), ("gpus_shared", False)):
            if key in given and getattr(spec, key) != empty:
                raise SpecError(f"{name_of(key, settings[key])}: only meaningful with use_gpu=true")
            setattr(spec, key, empty)  # the recorded run's GPU options go with its use_gpu
    if (spec.distributed or {}).get("backend") == "ps" and "process_count_per_node" in given \
            and spec.process_count_per_node != 1:
        raise SpecError(f"{name_of('process_count_per_node', settings['process_count_per_node'])}: does not "
                        "apply to a parameter-server job (its tasks are spread over the nodes)")
    return spec


def _recovery_value(where: str, key: str, value: Any) -> Any:
    """A recovery field from ``--set`` (a string) or the API (typed): checked by tflaunch.spec.recovery."""
    if not isinstance(value, str):
        return value
    if _none(value):
        return None
    try:
        if key == "restart_on_exit_codes":
            return [int(c) for c in value.replace(" ", "").split(",") if c]
        return int(value) if key in ("max_restarts", "max_requeues") else float(value)
    except ValueError:
        raise SpecError(f"{where}: expected {SETTABLE[key]}, got {value!r}") from None


def _entry_in_snapshot(where: str, value: Any, listing: dict[str, Any] | None) -> str:
    if not isinstance(value, str) or not value or os.path.isabs(value):
        raise SpecError(f"{where}: expected a path relative to the snapshot, such as train.py")
    parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
    rel = "/".join(parts)
    if ".." in parts or not rel:
        raise SpecError(f"{where}: expected a path inside the snapshot, such as train.py")
    if listing is not None:
        files = {row[0] for row in listing.get("files", ())}
        links = {row[0] for row in listing.get("symlinks", ())}
        if rel not in files and rel not in links:
            shown = ", ".join(sorted(f for f in files if f.endswith(".py"))[:8]) or "none"
            raise SpecError(f"{where}: {rel!r} is not a file of the recorded snapshot (its .py files: {shown})")
    return rel


# -- compute target -------------------------------------------------------------------------------------
def _retarget(spec: JobSpec, run_id: str, target: Any = None) -> dict[str, Any]:
    """The compute target for the rerun: ``target`` (as an estimator takes it) when given, else the
    recorded one with the spec's (possibly new) process counts: this machine stays this machine, a
    Slurm submission is submitted again, the hosts of an ssh target are the recorded ones (a job that
    needs more hosts than the run used must name them), and the hosts of the allocation the run ran in
    are the allocation the rerun runs in."""
    from .spec.hosts import Host, discover, select_hosts
    from .spec.target import SlurmTarget, resolve_target

    nodes, pph, world = spec.node_count, spec.procs_per_host, spec.world_size
    if target is not None:
        return resolve_target(target, nodes, pph, world=world)
    recorded = dict(spec.compute_target or {"kind": "local", "source": "local"})
    kind, source = recorded.get("kind"), recorded.get("source")
    if kind == "slurm":
        return SlurmTarget(**(recorded.get("slurm") or {})).recorded(nodes, pph, world)
    if kind == "local":
        if nodes > 1:
            raise SpecError(f"node_count {nodes}: run {run_id} ran on this machine, which is one node; give the "
                            "hosts with --hosts or --hostfile")
        hosts = select_hosts(None, nodes, pph)
        return {**recorded, "hosts": [[h.name, max(h.slots, world)] for h in hosts]}
    if source in ("SLURM_JOB_NODELIST", "PBS_NODEFILE"):
        if discover()[1] != source:
            where = "a Slurm allocation (sbatch/salloc)" if source == "SLURM_JOB_NODELIST" else "a PBS job"
            raise SpecError(f"run {run_id} ran on the hosts of {where}, which this process is not in: rerun it "
                            "inside one, or give --hosts/--hostfile or --local")
        return resolve_target("local", nodes, pph, world=world)
    hosts = [Host(str(name), int(slots)) for name, slots in recorded.get("hosts") or ()]
    if nodes > len(hosts):
        raise SpecError(f"node_count {nodes}: run {run_id} recorded {len(hosts)} host(s) ("
                        + ", ".join(h.name for h in hosts) + "); give the hosts with --hosts or --hostfile")
    chosen = select_hosts(hosts, nodes, pph, oversubscribe=bool(recorded.get("oversubscribe")),
                          source=str(source or "the recorded hosts"))
    return {**recorded, "hosts": [[h.name, h.slots] for h in chosen]}


# -- prepare / create / start ----------------------------------------------------------------------------
@dataclass
class RerunPrepared(Prepared):
    """A :class:`~tflaunch.submit.Prepared` rerun: ``source`` is the recorded run, ``manifest`` its snapshot's."""

    source: RunRecord | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def _manifest(record: RunRecord) -> dict[str, Any]:
    path = record.path(snapshot.MANIFEST)
    if not os.path.exists(path):
        raise SnapshotError(f"run {record.id} has no snapshot manifest ({snapshot.MANIFEST}): it ended before its "
                            "snapshot was stored, so there is nothing to rerun")
    try:
        manifest = fsio.read_json(path)
        tree = manifest["tree"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"run {record.id}: cannot read its snapshot manifest {snapshot.MANIFEST}: {exc}") from None
    if not isinstance(tree, str) or not os.path.isdir(os.path.join(record.store.home, "trees", tree)) \
            or not os.path.isfile(os.path.join(record.store.home, "trees", f"{tree}.json")):
        raise SnapshotError(f"run {record.id}: its snapshot (trees/{tree}) is gone from {record.store.home}; "
                            "it cannot be rerun")
    return manifest


def prepare_rerun(source: RunRecord, *, script_params: Mapping[str, Any] | None = None,
                  settings: Mapping[str, Any] | None = None, compute_target: Any = None,
                  experiment: str | None = None, tags: Mapping[str, str] | None = None,
                  grace: float | None = None, scratch: str | None = None,
                  label: Callable[[str, Any], str] | None = None) -> RerunPrepared:
    """Check everything about a rerun of ``source`` without writing anything (as :func:`tflaunch.submit.prepare`
    does for a new run, but from the record: the source directory is not read)."""
    from .plan.distributions import distribution
    from .plan.processes import plan
    from .probe import check_framework, resolve_python
    from .schedule import submission
    from .spec.target import target_hosts
    from .submit import check_inputs, environment_request, find_mpi, known_gpus, run_context
    from .history.store import validate_experiment_name

    status = source.read_status(check_lease=False)
    if status is None:
        raise StoreError(f"run {source.id}: status.json is missing or unreadable")
    if status.get("kind") == "sweep":
        raise SpecError(f"run {source.id} is a sweep, not a run: rerun one of its trials (`tflaunch sweep show "
                        f"{source.id}` lists them) or resume it (`tflaunch sweep resume {source.id}`)")
    definition = source.definition()
    if not isinstance(definition.get("spec"), dict):
        raise StoreError(f"run {source.id}: run.json has no spec")
    manifest = _manifest(source)
    listing = snapshot.tree_listing(source.store.home, manifest)
    recorded = JobSpec.from_dict(definition["spec"])
    # what tflaunch itself added to the job's environment (a sweep trial's variables, Slurm's) is not the job's
    recorded.environment_variables = {k: v for k, v in recorded.environment_variables.items()
                                      if not k.startswith(_RESERVED_ENV)}
    spec = apply_settings(recorded, settings, listing=listing, label=label)
    _give_withheld(spec, definition, source.id)
    spec.arguments = apply_arguments(spec.arguments, script_params)
    spec.entry_script = spec.entry_script or manifest.get("entry_script") or ""
    try:
        spec.python = resolve_python(spec.python)
    except SpecError:
        raise SpecError(f"the job's interpreter {spec.python!r} is not an executable file (any more): give "
                        "another with --set python=PATH (Run.rerun(python=...))") from None
    spec.compute_target = _retarget(spec, source.id, compute_target)
    from . import data
    data.check_placeholders(spec.arguments, spec.inputs)

    experiment = experiment if experiment is not None else str(status.get("experiment") or "default")
    validate_experiment_name(experiment)
    all_tags = {**(status.get("tags") or {}), **dict(tags or {})}
    for key, value in all_tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError(f"tags: keys and values must be strings, got {key!r}: {value!r}")
    grace = float(definition.get("grace", DEFAULT_GRACE)) if grace is None else grace
    if not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace < 0:
        raise SpecError(f"grace (--grace): must be a number of seconds >= 0, got {grace!r}")
    scratch = definition.get("scratch") if scratch is None else os.path.abspath(scratch)
    if scratch is not None and not os.path.isdir(scratch):
        raise SpecError(f"scratch (--scratch): {scratch} is not a directory"
                        + (" (recorded with the run; give --scratch DIR)" if scratch == definition.get("scratch")
                           else ""))
    options = SubmitOptions(experiment=experiment, home=source.store.home, tags=all_tags, grace=float(grace),
                            scratch=scratch)
    store = Store(source.store.home)

    submitter = submission(spec.compute_target)
    if submitter is not None:  # what the scheduler gives the processes (a checkpoint signal's name)
        spec = replace(spec, environment_variables={**submitter.check(spec), **spec.environment_variables})
    hosts = target_hosts(spec.compute_target)[:spec.node_count]
    gpus = known_gpus(spec, hosts)
    mpi = distribution(spec.distributed).launcher == "mpirun"
    if mpi:
        spec = replace(spec, distributed={**spec.distributed, **find_mpi(spec)})
    run_id = Store.new_run_id()
    processes = plan(spec, run_context(store, options, run_id), hosts, gpus=gpus)
    if mpi:
        from .launch.mpi import launch_for
        from .spec.hosts import is_local
        launch_for(spec, processes, run_id, remote=not all(is_local(h.name) for h in hosts))
    check_inputs(spec, hosts)
    environment = definition.get("environment")
    if spec.python != recorded.python or spec.use_gpu != recorded.use_gpu:  # what the environment is built from
        spec = replace(spec, environment=None)
        spec = replace(spec, environment=environment_request(spec, store.home))
        from .submit import _env_has_tensorflow
        tree = os.path.join(store.home, "trees", manifest["tree"])  # the probe runs in the snapshot, as in prepare
        environment = None if _env_has_tensorflow(spec.environment) else check_framework(spec, tree)
    overrides = {"arguments": {_flag(k): v for k, v in (script_params or {}).items()},
                 "settings": _masked_settings(settings or {}, source.store.home)}
    if compute_target is not None:
        overrides["compute_target"] = spec.compute_target.get("kind")
    scan = snapshot.Scan(root=str(manifest.get("source_directory") or spec.source_directory),
                         entry_script=spec.entry_script, notes=list(manifest.get("notes") or []))
    extra = {"rerun_of": source.id, "rerun_overrides": _jsonable(overrides)}
    return RerunPrepared(store, spec, scan, environment, options, gpus, definition_extra=extra, run_id=run_id,
                         processes=processes, source=source, manifest=manifest)


def _give_withheld(spec: JobSpec, definition: dict[str, Any], run_id: str) -> None:
    """The values of the secret variables the recorded run withheld from its record (never recorded):
    from the overrides (``--env``), else this process's environment; SpecError naming those in neither."""
    names = [n for n in definition.get("withheld_environment") or () if n not in spec.environment_variables]
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise SpecError(f"run {run_id} withheld the values of {', '.join(missing)} from its record: give them "
                        f"again with --env NAME=VALUE (Run.rerun(environment_variables=...)) or in the environment")
    spec.environment_variables.update({n: os.environ[n] for n in names})


def _masked_settings(settings: Mapping[str, Any], home: str) -> dict[str, Any]:
    """The overrides as ``rerun_overrides`` records them: a secret variable's value replaced by ``<withheld>``."""
    from .history.withheld import PLACEHOLDER, SecretNames

    names = SecretNames.for_home(home)
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key.startswith("environment_variables.") and value is not None \
                and names.is_secret(key[len("environment_variables."):]):
            value = PLACEHOLDER
        elif key == "environment_variables" and isinstance(value, Mapping):
            value = {k: v if v is None else names.mask({k: v})[k] for k, v in value.items()}
        out[key] = value
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def create_rerun(prepared: RerunPrepared) -> RunRecord:
    """Record the rerun (status Preparing, leased by this process) with the recorded run's snapshot and
    git information, and link the recorded run to it (``reruns/<id>.json`` in its directory)."""
    source = prepared.source
    assert source is not None
    old = source.definition()
    definition = {k: v for k, v in old.items() if k not in _NOT_INHERITED}
    definition.update({
        "spec": prepared.spec.to_dict(),
        "grace": float(prepared.options.grace),
        "scratch": prepared.options.scratch,
        "tflaunch_version": __version__,
        "submitted_from": {"python": sys.version.split()[0], "platform": _platform(), "cwd": os.getcwd()},
        "environment": prepared.environment,
        **prepared.definition_extra,
    })
    record = prepared.store.create_run(prepared.options.experiment, definition, run_id=prepared.run_id or None,
                                       tags=prepared.options.tags)
    try:
        snapshot.link(prepared.store.home, source.dir, record.dir)
        if os.path.exists(source.path(gitinfo.PATCH_NAME)):
            with open(source.path(gitinfo.PATCH_NAME), "rb") as fh:
                fsio.atomic_write_bytes(record.path(gitinfo.PATCH_NAME), fh.read())
    except (OSError, ValueError, KeyError) as exc:
        message = f"giving the run the snapshot of run {source.id} failed: {getattr(exc, 'strerror', None) or exc}"
        record.release_reserve()
        record.write_status(FAILED, ended=now_iso(), error={"reason": "snapshot", "message": message})
        raise SnapshotError(f"run {record.id}: {message}") from None
    try:
        os.makedirs(source.path(RERUNS_DIR), exist_ok=True)
        fsio.create_once_json(source.path(RERUNS_DIR, f"{record.id}.json"),
                              {"id": record.id, "experiment": prepared.options.experiment, "created": now_iso()})
    except OSError as exc:  # the new run says what it reruns; only the way back is missing
        log.warning("run %s: cannot record it as a rerun in run %s's directory: %s", record.id, source.id,
                    exc.strerror or exc)
    return record


def _platform() -> str:
    uname = os.uname()
    return f"{uname.sysname}-{uname.release}-{uname.machine}"


def start_rerun(prepared: RerunPrepared) -> RunRecord:
    """Record the rerun and start it in the background (a local supervisor, or a Slurm job)."""
    from .schedule import submission
    from .submit import sbatch_run
    from .supervise import spawn_detached

    record = create_rerun(prepared)
    if submission(prepared.spec.compute_target) is not None:
        return sbatch_run(record, prepared.spec, prepared.options.experiment)
    spawn_detached(record)
    return record


def rerun_dry_run(prepared: RerunPrepared) -> dict[str, Any]:
    """What the rerun would do (as ``run --dry-run``), with the recorded snapshot and ``rerun_of``."""
    from .submit import dry_run

    plan = dry_run(prepared)
    manifest = prepared.manifest
    plan["snapshot"] = {"source_directory": manifest.get("source_directory"),
                        "entry_script": prepared.spec.entry_script, "file_count": manifest.get("file_count", 0),
                        "total_bytes": manifest.get("total_bytes", 0), "notes": list(manifest.get("notes") or []),
                        "tree": manifest.get("tree"), "from_run": prepared.source.id if prepared.source else None}
    plan["rerun_of"] = prepared.source.id if prepared.source else None
    plan["arguments"] = list(prepared.spec.arguments)
    return plan


