"""No scheduler: the hosts are given (this machine, ``--hosts``, a hostfile); nothing allocates them."""
from __future__ import annotations

from . import Scheduler

__all__ = ["NoScheduler"]


class NoScheduler(Scheduler):
    name = "none"
