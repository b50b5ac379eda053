"""Python API mirroring Azure ML SDK v1: :class:`Workspace`, :class:`Experiment`, :class:`Run`.

``Experiment.submit`` validates the estimator, snapshots the source directory, records the run and
starts a background supervisor, then returns at once (like the reference); ``Run`` reads the record.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .history import store as store_mod
from .errors import RunFailedError, SpecError
from .history.store import TERMINAL, RunRecord, Store
from .tail import follow_files, write_text
from .history import metrics as metrics_mod

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterator, TextIO

__all__ = ["Workspace", "Experiment", "Run", "RunStatus"]

_context: Any = None  # this process's Run.get_context()


class RunStatus:
    """Run status names."""

    PREPARING = store_mod.PREPARING
    QUEUED = store_mod.QUEUED
    RUNNING = store_mod.RUNNING
    RECOVERING = store_mod.RECOVERING
    FINALIZING = store_mod.FINALIZING
    COMPLETED = store_mod.COMPLETED
    FAILED = store_mod.FAILED
    CANCELED = store_mod.CANCELED


class Workspace:
    """A tflaunch home (``TFLAUNCH_HOME``, default ``~/.tflaunch``): where runs are recorded, with its
    settings (see :mod:`tflaunch.config`): ``Workspace()``, or ``Workspace.from_config()`` as in the reference."""

    def __init__(self, home: str | os.PathLike | None = None, *, config: dict[str, Any] | None = None) -> None:
        self.config = dict(config or {})
        self.home = store_mod.resolve_home(home if home is not None else self.config.get("home"))

    @classmethod
    def from_config(cls, path: str | os.PathLike | None = None, auth: Any = None, _logger: Any = None,
                    _file_name: str | None = None) -> "Workspace":
        """The workspace a ``config.json`` describes: ``path`` (the file, or a directory to search from;
        default the current directory), then its parents; see :mod:`tflaunch.config`."""
        from . import config as config_mod

        if auth is not None:
            raise SpecError("Workspace.from_config(auth=...): tflaunch has no service to sign in to; leave auth out")
        start = os.path.join(os.fspath(path), _file_name) if path is not None and _file_name else path
        found = config_mod.find_config(start)
        if found is None:
            where = os.path.abspath(os.fspath(path) if path is not None else os.getcwd())
            raise SpecError(f"Workspace.from_config: no config.json in {where} or its parents (looked for "
                            f"{', '.join(config_mod.CONFIG_NAMES)}); write one with Workspace().write_config()")
        return cls(config=config_mod.read_config(found))

    @property
    def name(self) -> str:
        return self.config.get("workspace_name") or os.path.basename(self.home.rstrip(os.sep)) or self.home

    def write_config(self, path: str | os.PathLike | None = None, file_name: str | None = None) -> str:
        """Write this workspace's ``config.json`` (default ``./.tflaunch/config.json``); return its path."""
        from . import config as config_mod

        keep = {k: v for k, v in self.config.items() if k in config_mod.KEYS + ("workspace_name",)}
        return config_mod.write_config({**keep, "home": self.home}, path, file_name)

    @property
    def datastores(self) -> dict[str, Any]:
        """The workspace's datastores by name: the default one and those its config names."""
        from .data import DEFAULT_DATASTORE, Datastore

        default = self.config.get("default_datastore") or os.path.join(self.home, "datastore")
        stores = {DEFAULT_DATASTORE: Datastore(default, DEFAULT_DATASTORE)}
        for name, path in (self.config.get("datastores") or {}).items():
            stores[name] = Datastore(path, name)
        return stores

    def get_default_datastore(self) -> Any:
        """The default datastore: ``default_datastore`` of the config, else ``<home>/datastore`` (created)."""
        from .data import DEFAULT_DATASTORE

        store = self.datastores[DEFAULT_DATASTORE]
        if not self.config.get("default_datastore"):
            os.makedirs(store.root, exist_ok=True)
        return store

    def __repr__(self) -> str:
        return f"Workspace({self.home!r})"


class Experiment:
    """A named group of runs: ``Experiment('tf-mnist')`` or ``Experiment(workspace, 'tf-mnist')``."""

    def __init__(self, *args: Any, name: str | None = None, workspace: Workspace | None = None,
                 home: str | os.PathLike | None = None) -> None:
        positional = list(args)
        if positional and isinstance(positional[0], Workspace):
            workspace = positional.pop(0)
        if positional:
            if name is not None or len(positional) > 1:
                raise TypeError("Experiment takes a name (and optionally a Workspace first)")
            name = positional[0]
        if name is None:
            raise TypeError("Experiment needs a name")
        store_mod.validate_experiment_name(name)
        if workspace is not None and home is not None:
            raise TypeError("give either workspace or home, not both")
        self.name = name
        self.workspace = workspace or Workspace(home)
        self._store = Store(self.workspace.home)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, home={self.workspace.home!r})"

    def submit(self, config: Any, tags: dict[str, str] | None = None, *, grace: float | None = None,
               scratch: str | None = None) -> "Run":
        """Snapshot and start ``config`` (an estimator, or a :class:`tflaunch.sweep.HyperDriveConfig`) in the
        background; return its :class:`Run` (a sweep's :class:`~tflaunch.sweep.HyperDriveRun`) at once."""
        from .submit import SubmitOptions, prepare, start
        from .supervise import DEFAULT_GRACE

        options = SubmitOptions(experiment=self.name, home=self.workspace.home, tags=dict(tags or {}),
                                grace=DEFAULT_GRACE if grace is None else grace, scratch=scratch,
                                workspace_config=self.workspace.config)
        submit_to = getattr(config, "submit_to", None)  # a HyperDriveConfig: its sweep (tflaunch.sweep)
        if callable(submit_to):
            return submit_to(self, options)
        record = start(prepare(config, options))  # a SlurmTarget: sbatch, the run is Queued
        return Run(self, record.id)

    def get_runs(self) -> Iterator["Run"]:
        """This experiment's runs, newest first."""
        for run in self._store.list_runs(experiment=self.name):
            yield Run(self, run["id"])


class Run:
    """A recorded run. ``Run(experiment, run_id)`` attaches to an existing one."""

    def __init__(self, experiment: Experiment, run_id: str) -> None:
        self.experiment = experiment
        self._record: RunRecord = experiment._store.run(run_id)
        self.id = self._record.id
        self._writer: Any = None
        self._in_job = False

    @classmethod
    def get_context(cls, allow_offline: bool = True) -> Any:
        """The run this script runs in (``run.log(...)`` from any rank; one object per process); outside
        tflaunch an :class:`~tflaunch.tracking.OfflineRun` that prints instead (``allow_offline=False``: an
        error)."""
        global _context
        if _context is not None and getattr(_context, "_pid", None) == os.getpid():
            return _context
        run_id = os.environ.get("TFLAUNCH_RUN_ID")
        if run_id:
            from .tracking import script_writer

            experiment = Experiment(os.environ.get("TFLAUNCH_EXPERIMENT") or "default",
                                    home=os.environ.get("TFLAUNCH_HOME") or None)
            _context = Run._in_script(experiment, run_id, script_writer())
        elif allow_offline:
            from .tracking import OfflineRun

            _context = OfflineRun()
        else:
            raise RuntimeError("Run.get_context(allow_offline=False): this process is not part of a tflaunch run "
                               "(TFLAUNCH_RUN_ID is not set)")
        _context._pid = os.getpid()
        return _context

    @classmethod
    def _in_script(cls, experiment: Experiment, run_id: str, writer: Any) -> "Run":
        """The job's own run, inside the job: the record may not be visible from this host."""
        run = cls.__new__(cls)
        run.experiment = experiment
        run._record = RunRecord(experiment._store, run_id, os.environ.get("TFLAUNCH_RUN_DIR") or None)
        run.id = run_id
        run._writer = writer
        run._in_job = True
        return run

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, experiment={self.experiment.name!r}, status={self.get_status()!r})"

    @property
    def run_dir(self) -> str:
        """The run's record directory."""
        return self._record.dir

    def get_status(self) -> str:
        status = self._record.read_status() or {}
        return status.get("status", "Unknown")

    def get_details(self) -> dict[str, Any]:
        """The run object (status, timestamps, exit code, error, arguments, ...)."""
        return store_mod.describe(self._record)

    def wait_for_completion(self, show_output: bool = False, wait_post_processing: bool = False,
                            raise_on_error: bool = True, *, timeout: float | None = None,
                            stdout: TextIO | None = None, stderr: TextIO | None = None) -> dict[str, Any]:
        """Wait until the run ends (streaming its output if ``show_output``); return its details.

        Raises :class:`~tflaunch.RunFailedError` for a Failed run when ``raise_on_error``, and
        :class:`TimeoutError` if ``timeout`` seconds pass first (the run goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        out, err = stdout or sys.stdout, stderr or sys.stderr

        def finished() -> bool:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.id} still {self.get_status()} after {timeout} s")
            return self.get_status() in TERMINAL

        if show_output:
            follow_files(lambda: self._log_files(out, err), finished)
        else:
            while not finished():
                time.sleep(0.2)
        details = self.get_details()
        if show_output:
            write_text(err, f"tflaunch: run {self.id} {details['status']}\n")
        if raise_on_error and details["status"] == store_mod.FAILED:
            error = details.get("error") or {}
            raise RunFailedError(f"run {self.id} failed: {error.get('message', 'unknown error')}", details)
        return details

    def _log_files(self, out: TextIO, err: TextIO) -> list[tuple[str, TextIO, str]]:
        return [(path, out if kind == "stdout" else err, prefix)
                for path, kind, prefix in self._record.process_log_streams()]

    def cancel(self) -> None:
        """Ask the run's launcher to stop it (SIGTERM, then SIGKILL after the grace period); a run
        submitted to Slurm is also ``scancel``-ed."""
        from .submit import cancel_run

        cancel_run(self._record, "canceled from the Python API")

    def delete(self, cancel: bool = False) -> list[str]:
        """Move the run (a sweep: with its trials) to the home's trash; return the ids. RunActiveError if it
        has not ended, unless ``cancel``; SpecError for a sweep's trial alone. :meth:`restore` undoes it."""
        from .history import trash
        from .submit import cancel_run

        return trash.delete_one(self._record.store, self._record.id, reason="deleted from the Python API",
                                cancel=cancel_run if cancel else None)

    def restore(self) -> list[str]:
        """Bring the deleted run (a sweep: with its trials) back from the trash; return the ids."""
        from .history import trash

        return trash.restore(self._record.store, self._record.id)

    def rerun(self, script_params: dict[str, Any] | None = None, *, experiment: Experiment | str | None = None,
              tags: dict[str, str] | None = None, compute_target: Any = None, grace: float | None = None,
              scratch: str | None = None, **settings: Any) -> "Run":
        """A new run from this run's snapshot (the source directory is not read again), spec and arguments,
        started in the background like ``Experiment.submit``; returns it at once (``tflaunch runs rerun``).

        ``script_params``: ``{"--lr": 0.01}`` replaces that parameter's recorded value where it is (or adds
        it), ``""`` makes it a bare flag, ``None`` leaves it out. ``settings``: spec fields
        (``node_count=2``, ``process_count_per_node``, ``max_run_duration_seconds`` (None: no limit),
        ``use_gpu``, ``gpus_per_node``, ``gpus_shared``, ``python``, ``preflight``, ``entry_script``,
        ``environment_variables={"FOO": "bar"}``, merged over the recorded ones, None removing one).
        ``experiment`` (default: this run's), ``tags`` (added to this run's), ``compute_target`` (default:
        the recorded one), ``grace`` and ``scratch`` as for ``submit``. Both records name each other:
        ``get_details()["rerun_of"]`` / ``["reruns"]``.
        """
        from .rerun import prepare_rerun, start_rerun

        name = experiment.name if isinstance(experiment, Experiment) else experiment
        if isinstance(experiment, Experiment) and experiment.workspace.home != self.experiment.workspace.home:
            raise SpecError(f"rerun(experiment=...): a rerun is recorded in this run's workspace "
                            f"({self.experiment.workspace.home}), not {experiment.workspace.home}")
        prepared = prepare_rerun(self._record, script_params=script_params, settings=settings,
                                 compute_target=compute_target, experiment=name, tags=tags, grace=grace,
                                 scratch=scratch, label=lambda key, value: f"rerun({key}={value!r})")
        record = start_rerun(prepared)
        target = experiment if isinstance(experiment, Experiment) else (
            self.experiment if prepared.options.experiment == self.experiment.name
            else Experiment(prepared.options.experiment, workspace=self.experiment.workspace))
        return Run(target, record.id)

    def get_file_names(self) -> list[str]:
        """Files of the run: ``outputs/...``, ``logs/...``, ``tflaunch_logs/...``."""
        return [name for name, _ in self._record.file_names()]

    def download_file(self, name: str, output_file_path: str | os.PathLike | None = None) -> str:
        """Copy run file ``name`` to ``output_file_path`` (a file or directory); return where it went."""
        return store_mod.download(self._record, name, os.fspath(output_file_path) if output_file_path else None)

    def download_files(self, prefix: str = "outputs", output_directory: str | os.PathLike | None = None) -> list[str]:
        """Copy every run file whose name starts with ``prefix`` under ``output_directory``."""
        if not isinstance(prefix, str):
            raise SpecError("prefix: must be a string such as 'outputs'")
        root = os.path.abspath(os.fspath(output_directory) if output_directory else ".")
        written = []
        for name in self.get_file_names():
            if name.startswith(prefix):
                written.append(store_mod.download(self._record, name, os.path.join(root, *name.split("/"))))
        return written


    # -- tracking (mirrors azureml.core.Run) ----------------------------------------------------------
    def _log_writer(self) -> Any:
        if self._writer is None:  # logging to a run from outside its job (a driver, a notebook)
            self._writer = metrics_mod.MetricsWriter(self._record.path(metrics_mod.METRICS_DIR), None)
        return self._writer

    def log(self, name: str, value: Any, description: str = "", step: int | None = None) -> None:
        """Log a number, string, boolean or None as metric ``name`` (``step``: default one more than
        this process's last step of ``name``)."""
        self._log_writer().log(name, value, step)

    def log_list(self, name: str, value: list, description: str = "") -> None:
        """Log a list of values as metric ``name``."""
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"log_list({name!r}): value must be a list, got {type(value).__name__}")
        self._log_writer().log(name, list(value))

    def log_row(self, name: str, description: str | None = None, **kwargs: Any) -> None:
        """Log one row (columns as keyword arguments) of table metric ``name``."""
        self._log_writer().log(name, dict(kwargs))

    def tag(self, key: str, value: Any = None) -> None:
        """Set tag ``key`` (``value`` defaults to ``""``); a later tag of the same key wins."""
        self._log_writer().prop("tag", key, "" if value is None else str(value))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not isinstance(tags, dict):
            raise SpecError(f"set_tags: tags must be a dict, got {type(tags).__name__}")
        for key, value in tags.items():
            self.tag(key, value)

    def add_properties(self, properties: dict[str, Any]) -> None:
        """Add properties: unlike tags, a property keeps its first value."""
        if not isinstance(properties, dict):
            raise SpecError(f"add_properties: properties must be a dict, got {type(properties).__name__}")
        for key, value in properties.items():
            self._log_writer().prop("property", key, metrics_mod._scalar(value, key))

    def get_tags(self) -> dict[str, Any]:
        """Tags given at submission, then those the script set."""
        status = self._record.read_status(check_lease=False) or {}
        script_tags, _ = metrics_mod.properties_and_tags(self._record.dir)
        return {**(status.get("tags") or {}), **script_tags}

    def get_properties(self) -> dict[str, Any]:
        return metrics_mod.properties_and_tags(self._record.dir)[1]

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """``{name: value}`` as the reference SDK returns it: a metric logged once is its value, logged
        several times a list (every rank's points, lowest rank first), ``log_list`` a list and ``log_row``
        a dict of columns."""
        out: dict[str, Any] = {}
        for key, series in metrics_mod.load(self._record.dir).items():
            if name is not None and key != name:
                continue
            kind = metrics_mod.kind_of(series)
            if kind == "row":
                table: dict[str, list] = {}
                for row in series.value:
                    for column, value in (row.items() if isinstance(row, dict) else ()):
                        table.setdefault(column, []).append(value)
                out[key] = table
            elif kind == "list":
                out[key] = [v for chunk in series.value for v in (chunk if isinstance(chunk, list) else [chunk])]
            else:
                out[key] = series.value[0] if len(series.value) == 1 else list(series.value)
        return out

    def get_portal_url(self) -> str:
        """A URL to open the run in: its page in the live portal while ``tflaunch ui`` serves the home, else
        its HTML report (``report.html`` in the record, rendered now) as a ``file://`` URL."""
        from .portal.discover import portal_url

        return portal_url(self._record)

    @property
    def input_datasets(self) -> dict[str, str]:
        """The job's data inputs by name: their path on this host (in the job), or as recorded."""
        from .data import input_datasets

        if self._in_job:
            return input_datasets()
        try:
            recorded = _recorded_inputs(self._record)
        except (OSError, ValueError):
            return {}
        return {row["name"]: row["path"] for row in recorded if isinstance(row.get("path"), str)}

    def register_model(self, model_name: str, model_path: str | None = None, tags: dict[str, str] | None = None,
                       properties: dict[str, Any] | None = None, model_framework: str | None = None,
                       model_framework_version: str | None = None, description: str | None = None,
                       datasets: Any = None, **unknown: Any) -> Any:
        """Register the run's file or directory ``model_path`` (``outputs/model``; default: the run's whole
        ``outputs/``) as a new version of model ``model_name``; returns the :class:`~tflaunch.history.models.Model`.
        Inside the job, before the outputs are collected, the path is taken from the script's working
        directory. ``model_framework``/``model_framework_version``/``datasets`` are kept in its properties."""
        from .history import models

        for name in unknown:
            what = ("tflaunch deploys no models: register it, then download it where it is served"
                    if name == "resource_configuration" else "not supported by tflaunch: leave it out")
            raise SpecError(f"register_model({name}=...): {what}")
        if model_path is None:
            model_path = "outputs"
        extra = {k: v for k, v in (("model_framework", model_framework),
                                   ("model_framework_version", model_framework_version)) if v is not None}
        if datasets is not None:
            extra["datasets"] = json.dumps([[str(n), str(d)] for n, d in datasets])
        if extra:
            properties = {**extra, **(properties or {})}

        if self._in_job:
            local = _job_local_path(model_path)
            if local is not None:
                return models.register(self.experiment.workspace.home, model_name, local, tags=tags,
                                       properties=properties, description=description,
                                       source_run={"id": self.id, "experiment": self.experiment.name,
                                                   "path": model_path})
        return models.register_from_run(self._record, model_name, model_path, tags=tags,
                                        properties=properties, description=description)


def _recorded_inputs(record: RunRecord) -> list[dict[str, Any]]:
    """The record's ``inputs.json`` (what each data input was), ``[]`` when the run had none."""
    from . import fsio

    path = record.path("inputs.json")
    return fsio.read_json(path) if os.path.exists(path) else []


def _job_local_path(model_path: str) -> str | None:
    """``model_path`` under the script's working directory, if it is there and does not lead out of it."""
    from .errors import PathSafetyError

    if not isinstance(model_path, str) or not model_path or os.path.isabs(model_path):
        raise PathSafetyError(f"{model_path!r}: give a path relative to the run, such as outputs/model")
    root = os.path.realpath(os.getcwd())
    target = os.path.realpath(os.path.join(root, model_path))
    if target != root and not target.startswith(root + os.sep):
        raise PathSafetyError(f"{model_path!r} leads outside the run's working directory")
    return target if os.path.exists(target) else None
