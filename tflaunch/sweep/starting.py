"""Starting a sweep's trials: part of :class:`~tflaunch.sweep.driver.SweepDriver` (a mixin of it).

The next trial to start is one recorded but never created (a resumed sweep), a lost trial's replacement
(same hyperparameters), or a new draw of the sampling. Each is recorded in ``sweep.json`` before its run
exists, then created (a child run of the sweep) and started like ``run --detach``: its own background
supervisor (several start at once; :meth:`TrialStarting._check_starting` follows them until they hold
their leases), its own Slurm job, or, for a Slurm sweep that allows it, every trial at once as one job
array (:mod:`tflaunch.sweep.slurm_array`).
"""
from __future__ import annotations

import os
import time

from .. import fsio
from ..errors import TflaunchError
from ..spec import JobSpec
from ..history.store import FAILED, RunRecord, Store, now_iso
from . import trials as T

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["TrialStarting", "START_TIMEOUT"]

START_TIMEOUT = 60.0  # for a trial's supervisor to take its lease


class TrialStarting:
    """The trial-starting methods of :class:`~tflaunch.sweep.driver.SweepDriver`; they work on the driver's
    state (``state``, ``children``, ``starting``, ``pool``, ``exhausted``: see ``SweepDriver.__init__``)."""

    def _check_starting(self) -> None:
        """Trials whose supervisors were started: ready (they hold their leases), or failed to start."""
        for index, starting in list(self.starting.items()):
            try:
                if starting.poll():
                    del self.starting[index]
                elif time.monotonic() - starting.started > START_TIMEOUT:
                    starting.wait(0)
            except TflaunchError as exc:
                del self.starting[index]
                self._say(f"trial {index} ({starting.record.id}) could not start: {exc}")


    def _next(self, taken: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
        """The next trial to start: one recorded but never created (and not among ``taken``), a lost trial's
        replacement, or a new draw."""
        for trial in self.state["trials"]:
            if trial["status"] == T.STARTING and trial["index"] not in self.children and trial not in taken:
                return trial
        if self._counted() >= self.max_total:
            return None
        for trial in self.state["trials"]:
            if trial["status"] == T.LOST and trial.get("replaced_by") is None and trial.get("replaces") is None:
                return self._record_trial(trial["hyperparameters"], trial.get("sampler_values"), replaces=trial)
        if self.exhausted:
            return None
        history = [t for t in self.state["trials"] if t["status"] != T.LOST]
        suggestion = self.sampling.suggest(self.state["draws"], history, self.config["primary_metric_goal"])
        if suggestion is None:
            self.exhausted = True
            self._say(f"the parameter space is used up after {self.state['draws']} trials")
            return None
        self.state["draws"] += 1
        return self._record_trial(*suggestion)

    def _record_trial(self, hyperparameters: dict[str, Any], sampler_values: dict[str, Any] | None,
                      replaces: dict[str, Any] | None = None) -> dict[str, Any]:
        trial = {"index": len(self.state["trials"]), "run_id": Store.new_run_id(), "status": T.STARTING,
                 "hyperparameters": hyperparameters, "sampler_values": sampler_values, "allocation": None,
                 "intervals": 0, "best": None, "last": None, "stopped": None, "error": None,
                 "replaces": None if replaces is None else replaces["index"], "replaced_by": None,
                 "created": now_iso(), "started": None, "ended": None}
        if replaces is not None:
            replaces["replaced_by"] = trial["index"]
        self.state["trials"].append(trial)
        return trial

    def _fill(self) -> None:
        if self.array and not self.state["trials"]:
            self._start_array()
            return
        while len([t for t in self._active() if t["index"] in self.children]) < self.max_concurrent:
            allocation = self.pool.take()
            if allocation is None:
                return
            trial = self._next()
            if trial is None:
                self.pool.give(allocation)
                return
            trial["allocation"] = allocation
            self._save(sync=True)  # recorded before its run exists: a driver killed now leaves nothing unaccounted
            self._start(trial)

    def _trial_spec(self, trial: dict[str, Any]) -> JobSpec:
        """The sweep's spec with the trial's arguments, environment and hosts."""
        spec = JobSpec.from_dict(self.spec.to_dict())
        spec.arguments = T.trial_argv(spec.arguments, trial["hyperparameters"])
        spec.environment_variables = {**spec.environment_variables, "TFLAUNCH_PARENT_RUN_ID": self.record.id,
                                      "TFLAUNCH_HYPERPARAMETERS": fsio.json_dumps(trial["hyperparameters"])}
        allocation = trial.get("allocation") or {}
        if allocation.get("hosts") is not None and (spec.compute_target or {}).get("kind") != "local":
            spec.compute_target = dict(spec.compute_target, hosts=[list(h) for h in allocation["hosts"]])
        return spec

    def _create(self, trial: dict[str, Any], spec: JobSpec) -> RunRecord:
        from ..submit import create_child_run

        extra = {"parent": self.record.id, "trial": trial["index"], "hyperparameters": trial["hyperparameters"]}
        child = self.children[trial["index"]] = create_child_run(self.record, spec, trial["run_id"], extra)
        return child

    def _started(self, trial: dict[str, Any]) -> None:
        trial["status"] = (self._child(trial).read_status(check_lease=False) or {}).get("status", T.STARTING)
        what = " ".join(f"{k} {T.value_text(v)}" for k, v in trial["hyperparameters"].items())
        self._say(f"trial {trial['index']} ({trial['run_id']}) started: {what}")
        self.record.event("trial_started", index=trial["index"], run_id=trial["run_id"],
                          hyperparameters=trial["hyperparameters"])

    def _start_array(self) -> None:
        """Every trial at once, as one Slurm job array (see :mod:`tflaunch.sweep.slurm_array`)."""
        from .slurm_array import submit_array

        trials = []
        while len(trials) < self.max_total:
            trial = self._next(trials)
            if trial is None:
                break
            trial["allocation"] = self.pool.take()
            trials.append(trial)
        self._save(sync=True)  # recorded before their runs exist
        created = []
        for trial in trials:
            try:
                self._create(trial, self._trial_spec(trial))
                created.append(trial)
            except (TflaunchError, OSError) as exc:
                self._say(f"trial {trial['index']} ({trial['run_id']}) could not be recorded: {exc}")
                self._end(trial, FAILED, {"reason": "launch_failed", "message": str(exc)})
        if not created:
            return
        experiment = (self.record.read_status(check_lease=False) or {}).get("experiment") or "default"
        try:
            for trial in created:  # each task's supervisor reads its trial's secret values from the record
                self._child(trial).hand_over_withheld()
            job = submit_array(self.record, [self._child(t) for t in created], self.spec, experiment,
                               self.config.get("max_concurrent_runs"))
            self._say(f"{len(created)} trials submitted as Slurm job array {job}")
        except TflaunchError as exc:
            self._say(f"the trials' job array was refused: {exc}")
        for trial in created:
            self._started(trial)
        self._save()

    def _start(self, trial: dict[str, Any]) -> None:
        from ..submit import sbatch_run
        from ..supervise import Detached

        spec = self._trial_spec(trial)
        allocation = trial.get("allocation") or {}
        env = {"CUDA_VISIBLE_DEVICES": ",".join(allocation["gpus"])} if allocation.get("gpus") else None
        try:
            child = self._create(trial, spec)
            if (spec.compute_target or {}).get("kind") == "slurm":
                sbatch_run(child, spec, child.read_status(check_lease=False)["experiment"])
            else:  # ready when it holds the trial's lease: several start at once (see _check_starting)
                self.starting[trial["index"]] = Detached(child, env=env)
        except (TflaunchError, OSError) as exc:
            self.children.setdefault(trial["index"], RunRecord(self.store, trial["run_id"]))
            self._say(f"trial {trial['index']} ({trial['run_id']}) could not start: {exc}")
            if not os.path.isdir(os.path.join(self.store.runs_dir, trial["run_id"])):
                self._end(trial, FAILED, {"reason": "launch_failed", "message": str(exc)})
                return
        self._started(trial)
        self._save()
