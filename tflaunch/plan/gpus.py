"""GPUs per process: which GPUs a host offers the job and how they are split (pure functions).

A host's GPUs are, in order of preference:

1. ``--gpus-per-node N`` (``gpus_per_node``): the first N of the host's ``CUDA_VISIBLE_DEVICES`` when
   that is set (by Slurm, say), else ``0..N-1``; asking for more than ``CUDA_VISIBLE_DEVICES`` holds is
   an error: tflaunch subdivides what it was given and never widens it;
2. the host's ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs, as given);
3. what ``nvidia-smi -L`` lists (indices); the host's agent reports 2 and 3 (:func:`tflaunch.remote.agent.find_gpus`).

The processes that use GPUs on a host (every role but ``ps``) get an equal, contiguous share:
``G // k`` each of the ``G`` GPUs for ``k`` processes; what is left over stays unused. With fewer GPUs
than processes that is an error, unless ``gpus_shared`` (``--gpus-shared``), which gives process *i* GPU
``i mod G``. ``ps`` tasks get ``CUDA_VISIBLE_DEVICES=""``, as does every process of a job without
``use_gpu``.
"""
from __future__ import annotations

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["host_gpus", "split", "NO_GPU_ROLES"]

NO_GPU_ROLES = ("ps",)


def _visible(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def host_gpus(host: str, report: Mapping[str, Any] | None, gpus_per_node: int | None) -> list[str]:
    """The GPUs ``host`` offers the job, from its agent's report (``visible``: its CUDA_VISIBLE_DEVICES
    or None, ``found``: nvidia-smi's indices or None, ``error``: why nvidia-smi gave nothing)."""
    report = report or {}
    visible = _visible(report.get("visible"))
    if gpus_per_node is not None:
        if visible is None:
            return [str(i) for i in range(gpus_per_node)]
        if gpus_per_node > len(visible):
            raise SpecError(f"--gpus-per-node {gpus_per_node} but host {host} was given only "
                            f"CUDA_VISIBLE_DEVICES={report.get('visible')!r}; tflaunch never widens it")
        return visible[:gpus_per_node]
    if visible is not None:
        if not visible:
            raise SpecError(f"--gpu: host {host} hides every GPU (CUDA_VISIBLE_DEVICES is empty there); "
                            "leave out --gpu or unset it")
        return visible
    found = report.get("found")
    if found:
        return [str(g) for g in found]
    why = report.get("error") or "nvidia-smi -L lists no GPU"
    raise SpecError(f"--gpu: no GPU found on host {host} ({why}); give --gpus-per-node N if the host has "
                    "GPUs nvidia-smi cannot see, or leave out --gpu")


def split(host: str, gpus: Sequence[str], roles: Sequence[str], shared: bool = False) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` for each of a host's processes (given by role, in local-rank order)."""
    users = [i for i, role in enumerate(roles) if role not in NO_GPU_ROLES]
    out = [""] * len(roles)
    if not users:
        return out
    count = len(gpus)
    if count < len(users):
        if not shared or count == 0:
            raise SpecError(f"host {host} has {count} GPU{'s' if count != 1 else ''} ({','.join(gpus) or 'none'}) "
                            f"for {len(users)} processes that use GPUs: run fewer processes per node, "
                            "or let them share GPUs with --gpus-shared")
        for k, i in enumerate(users):
            out[i] = gpus[k % count]
        return out
    each = count // len(users)
    for k, i in enumerate(users):
        out[i] = ",".join(gpus[k * each:(k + 1) * each])
    return out
