"""What a sweep's compute target can run at once, and which slots each trial holds (pure bookkeeping).

- **this machine**: its CPU count of process slots (``slots`` of the sweep to say otherwise); a trial
  takes one slot per process (a trial larger than the machine runs alone). With ``use_gpu`` the machine's
  GPUs are shared out too: each trial gets its own ``gpus_per_node`` (default: one per process), given
  to it as ``CUDA_VISIBLE_DEVICES``, and waits while none are free.
- **hosts** (ssh, or the nodes of the Slurm allocation the sweep runs in): each trial takes
  ``node_count`` hosts with enough free slots for its processes on each; trials are packed onto the
  hosts in order. With ``use_gpu`` a trial takes its hosts whole (their GPUs are the host's to give).
- **Slurm** (``SlurmTarget``): one job per trial; Slurm decides what runs, ``max_concurrent_runs``
  bounds how many are submitted.

An allocation is ``{"hosts": [[name, slots], ...], "gpus": [...] or None}``, recorded with the trial, so
a resumed driver knows what its adopted trials hold.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["Pool"]


class Pool:
    """Free slots (and GPUs) of the sweep's hosts. ``hosts``: ``[[name, slots], ...]`` (None: Slurm
    decides); ``per_host``: slots a trial needs on each of its ``nodes`` hosts; ``exclusive``: a trial
    takes its hosts whole; ``gpus``/``gpu_need``: this machine's GPUs and how many a trial takes."""

    def __init__(self, hosts: Sequence[Sequence[Any]] | None, *, per_host: int = 1, nodes: int = 1,
                 exclusive: bool = False, gpus: Sequence[str] | None = None, gpu_need: int = 0) -> None:
        self.hosts = None if hosts is None else [(str(n), int(s)) for n, s in hosts]
        self.free = {} if self.hosts is None else {n: s for n, s in self.hosts}
        self.nodes = nodes
        self.per_host = per_host
        if self.hosts is not None:  # a trial bigger than every host runs alone on the biggest
            self.per_host = min(per_host, max(s for _, s in self.hosts))
        self.exclusive = exclusive
        self.gpus = None if gpus is None else list(gpus)
        self.free_gpus = None if gpus is None else list(gpus)
        self.gpu_need = min(gpu_need, len(self.gpus)) if self.gpus is not None else 0

    def capacity(self) -> int | None:
        """How many trials fit at once when nothing runs (None: no limit here)."""
        if self.hosts is None:
            return None
        if self.exclusive:
            fits = len(self.hosts) // self.nodes
        else:
            fits = sum(s // self.per_host for _, s in self.hosts) // self.nodes
        if self.gpus is not None and self.gpu_need:
            fits = min(fits, len(self.gpus) // self.gpu_need)
        return max(1, fits)

    def take(self) -> dict[str, Any] | None:
        """Slots for one more trial, or None while there are none free."""
        if self.hosts is None:
            return {"hosts": None, "gpus": None}
        chosen = []
        for name, slots in self.hosts:
            left = self.free[name]
            if (self.exclusive and left == slots) or (not self.exclusive and left >= self.per_host):
                chosen.append(name)
                if len(chosen) == self.nodes:
                    break
        if len(chosen) < self.nodes:
            return None
        gpus = None
        if self.free_gpus is not None:
            if len(self.free_gpus) < self.gpu_need:
                return None
            gpus = self.free_gpus[:self.gpu_need]
        size = dict(self.hosts)
        allocation = {"hosts": [[n, size[n] if self.exclusive else self.per_host] for n in chosen], "gpus": gpus}
        self.hold(allocation)
        return allocation

    def hold(self, allocation: dict[str, Any] | None) -> None:
        """Mark ``allocation`` as taken (also a trial adopted by a resumed driver)."""
        self._count(allocation, -1)
        if allocation and allocation.get("gpus") and self.free_gpus is not None:
            self.free_gpus = [g for g in self.free_gpus if g not in allocation["gpus"]]

    def give(self, allocation: dict[str, Any] | None) -> None:
        """Free what a finished trial held."""
        self._count(allocation, +1)
        if allocation and allocation.get("gpus") and self.free_gpus is not None:
            order = {g: i for i, g in enumerate(self.gpus or [])}
            self.free_gpus = sorted(set(self.free_gpus) | set(allocation["gpus"]), key=lambda g: order.get(g, 0))

    def _count(self, allocation: dict[str, Any] | None, sign: int) -> None:
        if not allocation or allocation.get("hosts") is None or self.hosts is None:
            return
        for name, slots in allocation["hosts"]:
            if name in self.free:
                self.free[name] += sign * int(slots)
