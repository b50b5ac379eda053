"""Hyperparameter sweeps with early termination (the reference's HyperDrive), file-based and resumable.

    from tflaunch.sweep import (HyperDriveConfig, RandomParameterSampling, choice, loguniform,
                                BanditPolicy, PrimaryMetricGoal)
    cfg = HyperDriveConfig(estimator=est, hyperparameter_sampling=RandomParameterSampling(
                               {'--learning-rate': loguniform(-6, -1), '--batch-size': choice(16, 32, 64)}),
                           primary_metric_name='accuracy', primary_metric_goal=PrimaryMetricGoal.MAXIMIZE,
                           policy=BanditPolicy(evaluation_interval=1, slack_factor=0.1, delay_evaluation=2),
                           max_total_runs=20, max_concurrent_runs=4)
    sweep = Experiment('tune').submit(cfg)
    sweep.wait_for_completion(show_output=True)
    best = sweep.get_best_run_by_primary_metric()

The layers: :mod:`.space` (parameter expressions), :mod:`.sampling` (grid, random, Bayesian), :mod:`.policy`
(early termination, pure), :mod:`.config` (HyperDriveConfig and the JSON config file), :mod:`.slots` (what
the compute target runs at once), :mod:`.trials` (the state file), :mod:`.driver` (the background process
that runs the trials; :mod:`.starting` and :mod:`.following` are its parts that start the trials and follow
them), :mod:`.submit` (submit, resume, cancel), :mod:`.run` (:class:`HyperDriveRun`).
"""
from __future__ import annotations

# The names are imported when first used (PEP 562): `tflaunch.sweep.trials`, which the core reads to
# cancel a sweep's trials, then needs nothing else of the package.
_HOMES = {
    "config": ("HyperDriveConfig", "PrimaryMetricGoal"),
    "policy": ("BanditPolicy", "EarlyTerminationPolicy", "MedianStoppingPolicy", "NoTerminationPolicy",
               "TruncationSelectionPolicy"),
    "sampling": ("BayesianParameterSampling", "GridParameterSampling", "ParameterSampling",
                 "RandomParameterSampling"),
    "space": ("choice", "lognormal", "loguniform", "normal", "qlognormal", "qloguniform", "qnormal", "quniform",
              "randint", "uniform"),
    "run": ("HyperDriveRun",),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tflaunch.sweep' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
