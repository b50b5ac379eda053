"""Supervision: the launcher's side of a run, from Preparing to its final status.

:class:`Supervisor` (:mod:`.supervisor`) holds the run's lease, has the run's launcher start the
processes on every host, streams their output when attached (prefixed ``[rank N]`` when there are
several), and stops everything, on every host, as soon as the outcome policy (:mod:`.policy`: fail
fast, the chief's wind-down, the timeout, cancel) says so (SIGTERM, SIGKILL after the grace period;
a second Ctrl-C kills at once). At the end it brings each host's ``./outputs`` and ``./logs`` into the
record and writes the final status (:mod:`.finalize`), whose error names the host, rank and exit code
or signal of the first process that failed. :func:`spawn_detached` (:mod:`.detached`) runs the same
supervisor in a background process (``run --detach``, :meth:`tflaunch.Experiment.submit`).
"""
from __future__ import annotations

from ..launch.agents import prestart_agents
from ..launch.hostrun import ORPHAN_GRACE, HostRun, LaunchFailure
from .detached import Detached, detached_main, in_job_command, spawn_detached
from .supervisor import DEFAULT_GRACE, Supervisor

__all__ = ["Supervisor", "spawn_detached", "Detached", "detached_main", "in_job_command", "DEFAULT_GRACE",
           "prestart_agents", "HostRun", "LaunchFailure", "ORPHAN_GRACE"]
