"""A job's command line: ``script_params`` (and ``arguments``) turned into argv, data references in them
turned into the ``{data:NAME}`` placeholders each host replaces with its path (see :mod:`tflaunch.data`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["script_params_to_argv"]


def _scalar_arg(where: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise SpecError(
        f"{where}: unsupported type {type(value).__name__}; use str, int, float, bool, a path, "
        "a list of those, '' for a bare flag or None to leave the parameter out"
    )


def script_params_to_argv(params: Mapping[str, Any] | None) -> list[str]:
    """Turn ``script_params`` into argv, keeping insertion order.

    ``{'--lr': 0.01}`` gives ``--lr 0.01``; ``''`` gives the bare flag; ``None`` leaves the key out;
    a list or tuple gives the key followed by each item (``--layers 64 32``, for ``nargs='+'``);
    other values are ``str()``-ed (so ``True`` becomes ``True``).
    """
    if params is None:
        return []
    if not isinstance(params, Mapping):
        raise SpecError(
            f"script_params: must be a dict such as {{'--batch-size': 50}}, got {type(params).__name__}"
        )
    argv: list[str] = []
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"script_params: keys must be non-empty strings, got {key!r}")
        where = f"script_params[{key!r}]"
        if value is None:
            continue
        if isinstance(value, str) and value == "":
            argv.append(key)
        elif isinstance(value, (list, tuple)):
            argv.append(key)
            argv.extend(_scalar_arg(where, item) for item in value)
        else:
            argv.extend((key, _scalar_arg(where, value)))
    return argv


def _with_inputs(where: str, value: Any, inputs: list[dict[str, Any]]) -> Any:
    """A data reference becomes the ``{data:NAME}`` placeholder each host replaces with its path."""
    from .. import data

    if data.is_reference(value):
        return data.add_input(value, inputs, where)
    if isinstance(value, (list, tuple)):
        return type(value)(_with_inputs(f"{where}[{i}]", v, inputs) for i, v in enumerate(value))
    return value
