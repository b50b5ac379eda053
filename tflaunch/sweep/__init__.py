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
that runs the trials), :mod:`.submit` (submit, resume, cancel), :mod:`.run` (:class:`HyperDriveRun`).
"""
from __future__ import annotations

from .config import HyperDriveConfig, PrimaryMetricGoal
from .policy import (BanditPolicy, EarlyTerminationPolicy, MedianStoppingPolicy, NoTerminationPolicy,
                     TruncationSelectionPolicy)
from .sampling import BayesianParameterSampling, GridParameterSampling, ParameterSampling, RandomParameterSampling
from .space import (choice, lognormal, loguniform, normal, qlognormal, qloguniform, qnormal, quniform, randint,
                    uniform)

__all__ = ["HyperDriveConfig", "PrimaryMetricGoal", "RandomParameterSampling", "GridParameterSampling",
           "BayesianParameterSampling", "ParameterSampling", "choice", "randint", "uniform", "quniform",
           "loguniform", "qloguniform", "normal", "qnormal", "lognormal", "qlognormal", "BanditPolicy",
           "MedianStoppingPolicy", "TruncationSelectionPolicy", "NoTerminationPolicy", "EarlyTerminationPolicy",
           "HyperDriveRun"]


def __getattr__(name: str):
    if name == "HyperDriveRun":  # imports tflaunch.api: only when asked for
        from .run import HyperDriveRun
        return HyperDriveRun
    raise AttributeError(f"module 'tflaunch.sweep' has no attribute {name!r}")
