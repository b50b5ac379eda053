"""How a job's fields are checked, and named in errors: each message names the field as the API spells it
and, where there is one, the command-line flag (``node_count (--nodes): ...``), so one message serves the
API and the CLI. The small validators the estimator and the distributed-training configurations share.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["RESERVED_ENV_PREFIX", "SETTABLE"]

RESERVED_ENV_PREFIX = "TFLAUNCH_"

# How each field is spelled on the command line, so one message serves the API and the CLI.
_CLI_FLAG = {
    "source_directory": "--source-dir",
    "entry_script": "ENTRY",
    "node_count": "--nodes",
    "process_count_per_node": "--procs-per-node",
    "environment_variables": "--env",
    "max_run_duration_seconds": "--timeout",
    "framework_version": "--framework-version",
    "use_gpu": "--gpu",
    "python": "--python",
    "compute_target": "--compute-target",
    "worker_count": "--workers",
    "parameter_server_count": "--ps",
    "port_base": "--port-base",
    "evaluator_grace": "--evaluator-grace",
    "mpirun": "--mpirun",
    "mpi_args": "--mpi-arg",
    "launcher": "--mpi-launcher",
    "srun_mpi": "--srun-mpi",
    "mpi_iface": "--mpi-iface",
    "gpus_per_node": "--gpus-per-node",
    "gpus_shared": "--gpus-shared",
    "environment_builder": "--builder",
    "pip_packages": "--pip",
    "conda_packages": "--conda",
    "pip_requirements_file": "--requirements",
    "find_links": "--find-links",
    "index_url": "--index-url",
    "no_index": "--no-index",
    "inherit_packages": "--no-inherit-packages",
    "setup_commands": "--setup",
    "preflight": "--no-preflight",
    "max_restarts": "--max-restarts",
    "restart_on_exit_codes": "--restart-on-exit-codes",
    "restart_delay": "--restart-delay",
    "hang_timeout": "--hang-timeout",
    "hang_grace": "--hang-grace",
    "max_requeues": "--max-requeues",
}

# What `runs rerun --set KEY=VALUE` (tflaunch.rerun) can change: spec field -> what it takes (shown when a
# key is unknown or a value bad). Here, not in tflaunch.rerun, so that building the CLI imports no more.
SETTABLE: dict[str, str] = {
    "node_count": "an integer >= 1",
    "process_count_per_node": "an integer >= 1",
    "max_run_duration_seconds": "seconds > 0, or none",
    "use_gpu": "true or false",
    "gpus_per_node": "an integer >= 1, or none",
    "gpus_shared": "true or false",
    "python": "the path of a Python interpreter",
    "preflight": "true or false",
    "entry_script": "a file of the recorded snapshot",
    "environment_variables.NAME": "a string",
    "max_restarts": "an integer >= 0",
    "restart_on_exit_codes": "exit codes such as 75,76, or none",
    "restart_delay": "seconds >= 0",
    "hang_timeout": "seconds > 0, or none",
    "hang_grace": "seconds >= 0",
    "max_requeues": "an integer >= 0",
}

_ENV_NAME_BAD = re.compile(r"[=\x00]")


def _field(name: str) -> str:
    flag = _CLI_FLAG.get(name)
    return f"{name} ({flag})" if flag and flag != "ENTRY" else name


def _fail(name: str, message: str) -> SpecError:
    return SpecError(f"{_field(name)}: {message}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"must be an integer >= 1, got {value!r}")
    if value < 1:
        raise _fail(name, f"must be an integer >= 1, got {value}")
    return value


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _strings(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise _fail(name, f"must be a list of strings such as ['keras'], got {value!r}")
    return list(value)


def _env_vars(values: Mapping[str, Any] | None) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise _fail("environment_variables", f"must be a dict of name -> value, got {type(values).__name__}")
    out: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name or _ENV_NAME_BAD.search(name):
            raise _fail("environment_variables", f"invalid variable name {name!r}")
        if name.startswith(RESERVED_ENV_PREFIX):
            raise _fail("environment_variables", f"{name} is set by tflaunch itself and cannot be given")
        if isinstance(value, bool) or isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str):
            raise _fail("environment_variables", f"{name}: value must be a string, got {type(value).__name__}")
        if "\x00" in value:
            raise _fail("environment_variables", f"{name}: value contains a NUL byte")
        out[name] = value
    return out
