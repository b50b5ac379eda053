"""From a :class:`~tflaunch.sweep.HyperDriveConfig` to a sweep going: validate (everything a trial would
check, once), record the parent run with the sweep's spec and snapshot, start its driver; resume and
cancel (shared by the CLI and the Python API)."""
from __future__ import annotations

import random

from ..errors import SpecError, TflaunchError
from ..history.store import TERMINAL, RunRecord
from . import trials as T
from .sampling import BayesianParameterSampling

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..submit import Prepared, SubmitOptions

__all__ = ["prepare_sweep", "submit_sweep", "resume_sweep", "sweep_dry_run", "sweep_record"]


def _hosts(estimator: Any) -> list[list[Any]] | None:
    """Every host the sweep may spread its trials over (the spec records only a trial's first hosts)."""
    from ..spec.hosts import discover
    from ..spec.target import SlurmTarget, SSHTarget

    target = estimator.compute_target
    if isinstance(target, SSHTarget):
        return [[h.name, h.slots] for h in target.hosts]
    if isinstance(target, SlurmTarget):
        return None
    found, _source = discover(None)
    return None if found is None else [[h.name, h.slots] for h in found]


def prepare_sweep(config: Any, options: SubmitOptions) -> Prepared:
    """Check the sweep and its job as a run would be checked; nothing is written."""
    from ..submit import prepare

    if not hasattr(config, "hyperparameter_sampling"):  # a HyperDriveConfig (not imported: it imports this)
        raise SpecError(f"submit(): expected a HyperDriveConfig, got {type(config).__name__}")
    if isinstance(config.hyperparameter_sampling, BayesianParameterSampling):
        config.hyperparameter_sampling.require()
    prepared = prepare(config.estimator, options)
    recorded = config.to_dict()
    sampling = recorded["hyperparameter_sampling"]
    if sampling["kind"] != "grid" and sampling.get("seed") is None:
        sampling["seed"] = random.SystemRandom().randrange(1 << 31)  # recorded: a resumed sweep draws the same
    sweep = {"config": recorded, "hosts": _hosts(config.estimator), "slots": config.slots}
    prepared.definition_extra = {"kind": "sweep", "sweep": sweep}
    from .driver import build_pool
    build_pool(prepared.spec, sweep)  # e.g. --gpu on a machine without GPUs: SpecError now
    return prepared


def submit_sweep(config: Any, options: SubmitOptions) -> RunRecord:
    """Record the sweep (its parent run) and start its driver in the background."""
    from ..submit import create_run
    from .driver import spawn_driver

    record = create_run(prepare_sweep(config, options))
    spawn_driver(record)
    return record


def sweep_dry_run(prepared: Prepared, count: int = 10) -> dict[str, Any]:
    """What the sweep would do: its settings, how many trials fit at once, the first trials' arguments."""
    from ..submit import dry_run
    from .driver import build_pool
    from .sampling import sampling_from_dict

    sweep = prepared.definition_extra["sweep"]
    config = sweep["config"]
    sampling = sampling_from_dict(config["hyperparameter_sampling"])
    pool = build_pool(prepared.spec, sweep)
    first: list[dict[str, Any]] = []
    if sampling.kind != "bayesian":
        for index in range(min(count, config["max_total_runs"])):
            suggestion = sampling.suggest(index, first, config["primary_metric_goal"])
            if suggestion is None:
                break
            first.append({"index": index, "hyperparameters": suggestion[0],
                          "arguments": T.trial_argv(prepared.spec.arguments, suggestion[0])})
    return {"dry_run": True, "sweep": config, "space_size": sampling.total(),
            "trials_at_once": min(x for x in (pool.capacity(), config.get("max_concurrent_runs"),
                                              config["max_total_runs"]) if x is not None),
            "first_trials": first if sampling.kind != "bayesian" else "suggested by Optuna as results come in",
            "run": dry_run(prepared)}


def sweep_record(store: Any, ref: str) -> RunRecord:
    """The sweep (parent run) ``ref``; SpecError when the run is not a sweep."""
    record = store.run(ref)
    status = record.read_status(check_lease=False) or {}
    if status.get("kind") != "sweep":
        hint = f" (it is a trial of sweep {status['parent']})" if status.get("parent") else ""
        raise SpecError(f"run {record.id} is not a sweep{hint}; see `tflaunch runs list`")
    return record


def resume_sweep(record: RunRecord) -> int:
    """Start a new driver for a sweep whose driver died; return its pid."""
    from .driver import spawn_driver

    status = record.read_status() or {}
    error = status.get("error") or {}
    if status.get("status") not in TERMINAL:
        lease = record.lease() or {}
        raise TflaunchError(f"sweep {record.id} is {status.get('status')}: its driver (pid {lease.get('pid')} on "
                            f"{lease.get('host')}) is running it; nothing to resume")
    if error.get("reason") != "launcher_lost":
        raise TflaunchError(f"sweep {record.id} ended {status.get('status')}"
                            + (f" ({error.get('reason')})" if error else "")
                            + "; only a sweep whose driver was lost can be resumed")
    return spawn_driver(record, resume=True)
