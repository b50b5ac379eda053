"""Python API mirroring Azure ML SDK v1: :class:`Workspace`, :class:`Experiment`, :class:`Run`.

``Experiment.submit`` validates the estimator, snapshots the source directory, records the run and
starts a background supervisor, then returns at once (like the reference); ``Run`` reads the record.
"""
from __future__ import annotations

import os
import sys
import time

from . import store as store_mod
from .errors import RunFailedError, SpecError
from .spec import Estimator
from .store import TERMINAL, RunRecord, Store
from .tail import follow_files, write_text

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterator, TextIO

__all__ = ["Workspace", "Experiment", "Run", "RunStatus"]


class RunStatus:
    """Run status names."""

    PREPARING = store_mod.PREPARING
    QUEUED = store_mod.QUEUED
    RUNNING = store_mod.RUNNING
    FINALIZING = store_mod.FINALIZING
    COMPLETED = store_mod.COMPLETED
    FAILED = store_mod.FAILED
    CANCELED = store_mod.CANCELED


class Workspace:
    """A tflaunch home (``TFLAUNCH_HOME``, default ``~/.tflaunch``): where runs are recorded."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = store_mod.resolve_home(home)

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

    def submit(self, config: Estimator, tags: dict[str, str] | None = None, *, grace: float | None = None,
               scratch: str | None = None) -> "Run":
        """Snapshot and start ``config`` in the background; return its :class:`Run` at once."""
        from .submit import SubmitOptions, prepare, start
        from .supervise import DEFAULT_GRACE

        options = SubmitOptions(experiment=self.name, home=self.workspace.home, tags=dict(tags or {}),
                                grace=DEFAULT_GRACE if grace is None else grace, scratch=scratch)
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

