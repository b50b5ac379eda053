"""What a sweep is (the reference's ``HyperDriveConfig``), its recorded form, and its JSON config file.

A sweep config file (``tflaunch sweep --config sweep.json``)::

    {"experiment": "tune",
     "estimator": {"source_directory": ".", "entry_script": "train.py", "script_params": {"--epochs": 5},
                   "compute_target": "local"},
     "hyperparameter_sampling": {"kind": "random", "seed": 1,
                                 "parameter_space": {"--learning-rate": "loguniform(-6, -1)",
                                                     "--batch-size": "choice(16, 32, 64)"}},
     "primary_metric_name": "accuracy", "primary_metric_goal": "maximize",
     "policy": {"kind": "bandit", "evaluation_interval": 1, "slack_factor": 0.1, "delay_evaluation": 2},
     "max_total_runs": 20, "max_concurrent_runs": 4, "max_duration_minutes": 60}

``estimator`` takes the keyword arguments of :class:`tflaunch.Estimator` (of :class:`tflaunch.TensorFlow`
with ``framework_version`` or ``distributed_backend``); ``compute_target`` is ``"local"``,
``{"kind": "ssh", "hosts": ["node1:4", ...], ...}`` (:class:`~tflaunch.SSHTarget`'s arguments) or
``{"kind": "slurm", "partition": ..., ...}`` (:class:`~tflaunch.SlurmTarget`'s); ``distributed_training``
is ``{"kind": "mpi"|"ps"|"multiworker", ...}`` with its class's arguments. Relative paths are relative
to the config file.
"""
from __future__ import annotations

import json
import math
import os

from ..errors import SpecError
from .policy import EarlyTerminationPolicy, NoTerminationPolicy, policy_from_dict
from .sampling import BayesianParameterSampling, ParameterSampling, sampling_from_dict

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["HyperDriveConfig", "PrimaryMetricGoal", "load_config", "MAX_TOTAL_RUNS", "MAX_CONCURRENT_RUNS"]

MAX_TOTAL_RUNS = 1000
MAX_CONCURRENT_RUNS = 100
DEFAULT_DURATION_MINUTES = 10080  # the reference's default: 7 days

# The reference's arguments tflaunch cannot honour, with what to use instead
_REFUSED = {
    "run_config": "give the job as estimator=Estimator(...) (or TensorFlow(...))",
    "pipeline": "tflaunch sweeps one estimator: give it as estimator=...",
    "resume_from": "continue an interrupted sweep with `tflaunch sweep resume PARENT`; to warm-start from an "
                   "earlier sweep, narrow the parameter space to its best region",
    "resume_child_runs": "continue an interrupted sweep with `tflaunch sweep resume PARENT` (its running trials "
                         "are adopted)",
    "custom_run_id": "run ids are chosen by tflaunch; tag the sweep instead (Experiment.submit(config, tags=...))",
}


class PrimaryMetricGoal:
    """Whether the primary metric is to be maximized or minimized."""

    MAXIMIZE = "MAXIMIZE"
    MINIMIZE = "MINIMIZE"

    @staticmethod
    def parse(value: Any) -> str:
        """``"maximize"`` or ``"minimize"`` from either constant or its name in any case."""
        text = str(getattr(value, "value", value)).strip().lower()
        if text in ("maximize", "max"):
            return "maximize"
        if text in ("minimize", "min"):
            return "minimize"
        raise SpecError(f"primary_metric_goal: must be PrimaryMetricGoal.MAXIMIZE or MINIMIZE, got {value!r}")


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{name}: must be an integer {low}-{high}, got {value!r}")
    return value


class HyperDriveConfig:
    """A hyperparameter sweep of ``estimator``: trials drawn by ``hyperparameter_sampling``, each an
    ordinary run with the sampled values as script arguments (``--name value``; a name without a leading
    ``-`` becomes ``--name``), judged on ``primary_metric_name`` (what the script logs with ``run.log``),
    stopped early by ``policy``. ``max_total_runs`` (1-1000), ``max_concurrent_runs`` (1-100; default: as
    many as the compute target has room for), ``max_duration_minutes`` (then running trials are canceled).
    tflaunch additions: ``slots``, how many processes this machine takes at once for a local sweep (default:
    its CPU count); ``job_array=False``: a Slurm sweep submits one job per trial even when its trials could
    go as one job array (grid and random sampling); see README "Hyperparameter sweeps"."""

    def __init__(self, hyperparameter_sampling: ParameterSampling | None = None,
                 primary_metric_name: str | None = None, primary_metric_goal: Any = None,
                 max_total_runs: int | None = None, max_concurrent_runs: int | None = None,
                 max_duration_minutes: float = DEFAULT_DURATION_MINUTES,
                 policy: EarlyTerminationPolicy | None = None, estimator: Any = None, *,
                 slots: int | None = None, job_array: bool | None = None, debug_flag: Any = None,
                 **unknown: Any) -> None:
        for name in unknown:
            if name in _REFUSED:
                raise SpecError(f"HyperDriveConfig({name}=...): {_REFUSED[name]}")
            raise SpecError(f"HyperDriveConfig: unknown argument {name!r}; see help(tflaunch.sweep.HyperDriveConfig)")
        from ..spec import Estimator

        if not isinstance(estimator, Estimator):
            raise SpecError("HyperDriveConfig: give the job as estimator=Estimator(...) or TensorFlow(...), got "
                            f"{type(estimator).__name__}")
        if not isinstance(hyperparameter_sampling, ParameterSampling):
            raise SpecError("HyperDriveConfig: hyperparameter_sampling must be RandomParameterSampling(...), "
                            "GridParameterSampling(...) or BayesianParameterSampling(...), got "
                            f"{type(hyperparameter_sampling).__name__}")
        if not isinstance(primary_metric_name, str) or not primary_metric_name:
            raise SpecError("HyperDriveConfig: primary_metric_name must be the name of a metric the script logs "
                            f"(run.log('accuracy', ...)), got {primary_metric_name!r}")
        if primary_metric_goal is None:
            raise SpecError("HyperDriveConfig: give primary_metric_goal=PrimaryMetricGoal.MAXIMIZE or MINIMIZE")
        self.estimator = estimator
        self.hyperparameter_sampling = hyperparameter_sampling
        self.primary_metric_name = primary_metric_name
        self.primary_metric_goal = PrimaryMetricGoal.parse(primary_metric_goal)
        if max_total_runs is None:
            raise SpecError(f"HyperDriveConfig: give max_total_runs (1-{MAX_TOTAL_RUNS})")
        self.max_total_runs = _int_in("max_total_runs", max_total_runs, 1, MAX_TOTAL_RUNS)
        if max_concurrent_runs is not None:
            max_concurrent_runs = _int_in("max_concurrent_runs", max_concurrent_runs, 1, MAX_CONCURRENT_RUNS)
        self.max_concurrent_runs = max_concurrent_runs
        if isinstance(max_duration_minutes, bool) or not isinstance(max_duration_minutes, (int, float)) \
                or not math.isfinite(max_duration_minutes) or max_duration_minutes <= 0:
            raise SpecError(f"max_duration_minutes: must be a number of minutes > 0, got {max_duration_minutes!r}")
        self.max_duration_minutes = max_duration_minutes
        self.policy = policy_from_dict(policy)
        if isinstance(hyperparameter_sampling, BayesianParameterSampling):
            if not isinstance(self.policy, NoTerminationPolicy):
                raise SpecError("BayesianParameterSampling does not support early termination (as in the reference): "
                                "leave out policy, or use RandomParameterSampling with it")
        if slots is not None:
            _int_in("slots", slots, 1, 1 << 20)
        self.slots = slots
        if job_array is not None and not isinstance(job_array, bool):
            raise SpecError(f"job_array: must be True or False, got {job_array!r}")
        self.job_array = job_array

    def submit_to(self, experiment: Any, options: Any) -> Any:
        """Start the sweep in ``experiment`` (what ``Experiment.submit(config)`` does); its HyperDriveRun."""
        from .run import HyperDriveRun
        from .submit import submit_sweep

        return HyperDriveRun(experiment, submit_sweep(self, options).id)

    def to_dict(self) -> dict[str, Any]:
        """The recorded form (without the estimator, recorded as the sweep's spec)."""
        sampling = self.hyperparameter_sampling.to_dict()
        return {"hyperparameter_sampling": sampling, "primary_metric_name": self.primary_metric_name,
                "primary_metric_goal": self.primary_metric_goal, "policy": self.policy.to_dict(),
                "max_total_runs": self.max_total_runs, "max_concurrent_runs": self.max_concurrent_runs,
                "max_duration_minutes": self.max_duration_minutes, "slots": self.slots, "job_array": self.job_array}

    def __repr__(self) -> str:
        return (f"HyperDriveConfig({self.hyperparameter_sampling!r}, primary_metric_name={self.primary_metric_name!r}, "
                f"goal={self.primary_metric_goal!r}, max_total_runs={self.max_total_runs})")


def _target(value: Any, base: str) -> Any:
    from ..spec.target import SlurmTarget, SSHTarget

    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict) or value.get("kind") not in ("ssh", "slurm"):
        raise SpecError(f"estimator.compute_target: expected 'local', {{'kind': 'ssh', 'hosts': [...]}} or "
                        f"{{'kind': 'slurm', ...}}, got {value!r}")
    args = {k: v for k, v in value.items() if k != "kind"}
    try:
        if value["kind"] == "slurm":
            return SlurmTarget(**args)
        if isinstance(args.get("ssh_config"), str):
            args["ssh_config"] = os.path.join(base, args["ssh_config"])
        return SSHTarget(**args)
    except TypeError as exc:
        raise SpecError(f"estimator.compute_target: {exc}") from None


def _distributed(value: Any) -> Any:
    from ..spec import MpiConfiguration, MultiWorkerConfiguration, TensorflowConfiguration

    if value is None:
        return None
    classes = {"mpi": MpiConfiguration, "ps": TensorflowConfiguration, "multiworker": MultiWorkerConfiguration}
    if not isinstance(value, dict) or value.get("kind") not in classes:
        raise SpecError(f"estimator.distributed_training: expected {{'kind': 'mpi'|'ps'|'multiworker', ...}}, "
                        f"got {value!r}")
    try:
        return classes[value["kind"]](**{k: v for k, v in value.items() if k != "kind"})
    except TypeError as exc:
        raise SpecError(f"estimator.distributed_training: {exc}") from None


def estimator_from_dict(data: Any, base: str) -> Any:
    """An Estimator (a TensorFlow estimator with ``framework_version`` / ``distributed_backend``) from the
    ``estimator`` object of a sweep config."""
    from ..spec import Estimator, TensorFlow

    if not isinstance(data, dict):
        raise SpecError(f"estimator: expected an object of Estimator arguments, got {data!r}")
    args = dict(data)
    args["source_directory"] = os.path.join(base, str(args.get("source_directory", ".")))
    if "compute_target" in args:
        args["compute_target"] = _target(args["compute_target"], base)
    if "distributed_training" in args:
        args["distributed_training"] = _distributed(args["distributed_training"])
    for key in ("pip_requirements_file", "python"):
        if isinstance(args.get(key), str) and os.sep in args[key]:
            args[key] = os.path.join(base, args[key])
    cls = TensorFlow if {"framework_version", "distributed_backend", "worker_count",
                         "parameter_server_count"} & set(args) else Estimator
    return cls(**args)


_CONFIG_KEYS = ("experiment", "estimator", "hyperparameter_sampling", "primary_metric_name", "primary_metric_goal",
                "policy", "max_total_runs", "max_concurrent_runs", "max_duration_minutes", "slots", "job_array",
                "tags")


def load_config(path: str) -> tuple[HyperDriveConfig, str | None, dict[str, str]]:
    """(the config, its experiment or None, its tags) from a sweep config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise SpecError(f"--config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SpecError(f"--config {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"--config {path}: expected a JSON object")
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        raise SpecError(f"--config {path}: unknown key {unknown[0]!r} (known: {', '.join(_CONFIG_KEYS)})")
    base = os.path.dirname(os.path.abspath(path))
    tags = data.get("tags") or {}
    if not isinstance(tags, dict):
        raise SpecError(f"--config {path}: tags must be an object of strings")
    config = HyperDriveConfig(
        estimator=estimator_from_dict(data.get("estimator"), base),
        hyperparameter_sampling=sampling_from_dict(data.get("hyperparameter_sampling")),
        primary_metric_name=data.get("primary_metric_name"), primary_metric_goal=data.get("primary_metric_goal"),
        policy=policy_from_dict(data.get("policy")), max_total_runs=data.get("max_total_runs"),
        max_concurrent_runs=data.get("max_concurrent_runs"),
        max_duration_minutes=data.get("max_duration_minutes", DEFAULT_DURATION_MINUTES), slots=data.get("slots"),
        job_array=data.get("job_array"))
    return config, data.get("experiment"), {str(k): str(v) for k, v in tags.items()}

