"""What to run: the estimator API (mirroring Azure ML SDK v1) and its normalized form, :class:`JobSpec`.

``Estimator``/``TensorFlow`` validate their fields eagerly (types, ranges) and name the field in every
error. Filesystem checks (does the source directory exist, is the entry script inside it) happen at
submit time, in :mod:`tflaunch.history.snapshot`. :meth:`Estimator.job_spec` turns the user's object into a
:class:`JobSpec`, a plain, JSON-serializable description that the planner and the run record use.

This module gathers the names; they live in:

* :mod:`tflaunch.spec.estimator`: ``Estimator``, ``TensorFlow``;
* :mod:`tflaunch.spec.distributed_training`: ``MpiConfiguration``, ``TensorflowConfiguration``,
  ``MultiWorkerConfiguration``;
* :mod:`tflaunch.spec.jobspec`: ``JobSpec`` and the process counts (``world_size``, ``procs_per_host``);
* :mod:`tflaunch.spec.script_params`: ``script_params_to_argv``;
* :mod:`tflaunch.spec.fields`: the field validators and ``RESERVED_ENV_PREFIX``.
"""
from __future__ import annotations

from .distributed_training import MpiConfiguration, MultiWorkerConfiguration, TensorflowConfiguration
from .estimator import Estimator, TensorFlow
from .jobspec import JobSpec
from .script_params import script_params_to_argv
from .fields import RESERVED_ENV_PREFIX

__all__ = [
    "Estimator",
    "TensorFlow",
    "MpiConfiguration",
    "TensorflowConfiguration",
    "MultiWorkerConfiguration",
    "JobSpec",
    "script_params_to_argv",
    "RESERVED_ENV_PREFIX",
]
