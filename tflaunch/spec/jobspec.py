"""The normalized form of a job, :class:`JobSpec`: a plain, JSON-serializable description that the planner
and the run record use (stored as ``spec`` in ``run.json``), and the process counts derived from it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ..plan.distributions import distribution

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["JobSpec", "procs_per_host", "world_size"]


def procs_per_host(process_count_per_node: int, distributed: Mapping[str, Any] | None) -> int:
    """Processes each host is asked for: a ps job's tasks are spread over the hosts by their slots, so it
    asks for 1 (and takes what the slots hold); any other job, ``process_count_per_node``."""
    return 1 if distribution(distributed).spread else process_count_per_node


def world_size(node_count: int, process_count_per_node: int, distributed: Mapping[str, Any] | None) -> int:
    """Number of processes a job asks for."""
    extra = 1 if distributed and distributed.get("evaluator") else 0
    if distribution(distributed).spread:  # a ps job: its tasks are counted, then dealt over the hosts
        return (int(distributed["worker_count"]) + int(distributed["parameter_server_count"])
                + (1 if distributed.get("chief") else 0) + extra)
    return node_count * process_count_per_node + extra


@dataclass
class JobSpec:
    """Normalized, JSON-serializable description of a job (stored as ``spec`` in ``run.json``)."""

    source_directory: str
    entry_script: str
    arguments: list[str] = field(default_factory=list)
    python: str = ""
    environment_variables: dict[str, str] = field(default_factory=dict)
    node_count: int = 1
    process_count_per_node: int = 1
    distributed: dict[str, Any] | None = None
    use_gpu: bool = False
    max_run_duration_seconds: float | None = None
    framework: dict[str, Any] | None = None
    gpus_per_node: int | None = None  # GPUs each host gives the job (default: found at launch)
    gpus_shared: bool = False  # several processes may share a GPU when there are too few
    compute_target: dict[str, Any] | None = None  # hosts used and how to reach them (tflaunch.spec.target)
    packages: dict[str, Any] | None = None  # what to install: {"pip", "requirements_file", "conda", "index", "inherit"}
    # (index: the options given with the job; the home's and the workspace's config.json fill in the rest)
    environment: dict[str, Any] | None = None  # the environment to build (tflaunch.envs.EnvRequest), from packages
    setup_commands: list[str] = field(default_factory=list)  # shell lines run on every host before the processes
    inputs: list[dict[str, Any]] = field(default_factory=list)  # data references (tflaunch.data)
    preflight: bool = True  # a multi-host run checks that TensorFlow is the same everywhere first
    recovery: dict[str, Any] | None = None  # restarts, hang watchdog, requeues (tflaunch.spec.recovery)

    @property
    def world_size(self) -> int:
        return world_size(self.node_count, self.process_count_per_node, self.distributed)

    @property
    def procs_per_host(self) -> int:
        return procs_per_host(self.process_count_per_node, self.distributed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
