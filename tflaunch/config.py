"""Workspace configuration files: ``config.json`` as the reference's ``Workspace.from_config`` reads it,
and the home's own ``<home>/config.json`` (settings made once per home, for air-gapped sites).

A configuration is a JSON object; every key is optional:

``home``               the run store (``~`` and ``$VARS`` expanded; relative to the file's directory)
``default_datastore``  the directory ``Workspace.get_default_datastore()`` returns (default ``<home>/datastore``)
``find_links``         a wheelhouse directory or URL, or a list of them (pip/uv ``--find-links``)
``index_url``          a package index (pip/uv ``--index-url``)
``no_index``           ``true``: never ask a package index, only the wheelhouses
``datastores``         more named datastores, ``{"name": "directory"}``
``shared_group``       (the home's) ``true``: what tflaunch creates in the home is for its group too (0770 / 0660)
``secret_env``         (the home's) names or patterns (``*``) of more variables whose values are never recorded
``public_env``         (the home's) names or patterns of variables that look secret but are not

The reference's own keys (``subscription_id``, ``resource_group``, ``workspace_name``) are accepted and
ignored. ``find_config`` looks in the start directory and then its parents for ``.tflaunch/config.json``,
``config.json`` and ``.azureml/config.json``, and skips a ``config.json`` that is not a workspace
configuration (a JSON object with none of these keys), since tools of every kind name a file so.
Precedence, lowest first: the home's ``config.json``, the workspace ``config.json``, explicit options.
"""
from __future__ import annotations

import json
import os

from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["CONFIG_NAMES", "KEYS", "find_config", "read_config", "home_config", "write_config",
           "index_defaults"]

CONFIG_NAMES = (os.path.join(".tflaunch", "config.json"), "config.json", os.path.join(".azureml", "config.json"))
KEYS = ("home", "default_datastore", "find_links", "index_url", "no_index", "datastores", "shared_group",
        "secret_env", "public_env")
REFERENCE_KEYS = ("subscription_id", "resource_group", "workspace_name")
_PATH_KEYS = ("home", "default_datastore")


def _looks_like_ours(data: Any) -> bool:
    return isinstance(data, dict) and any(k in data for k in KEYS + REFERENCE_KEYS)


def _load(path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise SpecError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"config file {path} is not readable JSON: {getattr(exc, 'strerror', None) or exc}") from None


def find_config(path: str | os.PathLike | None = None) -> str | None:
    """The workspace configuration file for ``path``: the file itself, or the first of
    :data:`CONFIG_NAMES` found in that directory (default: the current one) or a parent."""
    start = os.path.abspath(os.fspath(path) if path is not None else os.getcwd())
    if os.path.isfile(start):
        return start
    if path is not None and not os.path.isdir(start):
        raise SpecError(f"Workspace.from_config: {start} is neither a config file nor a directory")
    directory = start
    while True:
        for name in CONFIG_NAMES:
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                try:
                    data = _load(candidate)
                except SpecError:
                    if name == "config.json":
                        continue  # someone else's file
                    raise
                if _looks_like_ours(data) or name != "config.json":
                    return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _expand(value: str, base: str) -> str:
    value = os.path.expanduser(os.path.expandvars(value))
    return value if os.path.isabs(value) or "://" in value else os.path.normpath(os.path.join(base, value))


def read_config(path: str) -> dict[str, Any]:
    """The configuration in ``path``, checked and normalized (paths absolute, ``find_links`` a list)."""
    data = _load(path)
    if not isinstance(data, dict):
        raise SpecError(f"config file {path}: must hold a JSON object such as {{\"home\": \"~/.tflaunch\"}}")
    base = os.path.dirname(os.path.abspath(path))
    out: dict[str, Any] = {}
    for key in _PATH_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise SpecError(f"config file {path}: {key} must be a directory path, got {value!r}")
        out[key] = _expand(value, base)
    links = data.get("find_links")
    if links is not None:
        items = [links] if isinstance(links, str) else links
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise SpecError(f"config file {path}: find_links must be a directory or URL, or a list of them")
        out["find_links"] = [_expand(x, base) for x in items]
    if data.get("index_url") is not None:
        if not isinstance(data["index_url"], str) or not data["index_url"]:
            raise SpecError(f"config file {path}: index_url must be a URL, got {data['index_url']!r}")
        out["index_url"] = data["index_url"]
    if data.get("no_index") is not None:
        if not isinstance(data["no_index"], bool):
            raise SpecError(f"config file {path}: no_index must be true or false, got {data['no_index']!r}")
        out["no_index"] = data["no_index"]
    stores = data.get("datastores")
    if stores is not None:
        if not isinstance(stores, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in stores.items()):
            raise SpecError(f"config file {path}: datastores must map names to directories")
        out["datastores"] = {k: _expand(v, base) for k, v in stores.items()}
    if data.get("shared_group") is not None:
        if not isinstance(data["shared_group"], bool):
            raise SpecError(f"config file {path}: shared_group must be true or false, got {data['shared_group']!r}")
        out["shared_group"] = data["shared_group"]
    for key in ("secret_env", "public_env"):  # variable names (patterns) for tflaunch.history.withheld
        names = data.get(key)
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
                raise SpecError(f"config file {path}: {key} must be a list of variable names, got {names!r}")
            out[key] = list(names)
    if data.get("workspace_name") is not None:
        out["workspace_name"] = str(data["workspace_name"])
    out["path"] = os.path.abspath(path)
    return out


def home_config(home: str) -> dict[str, Any]:
    """The home's own settings (``<home>/config.json``), or ``{}`` when it has none."""
    path = os.path.join(home, "config.json")
    if not os.path.isfile(path):
        return {}
    config = read_config(path)
    config.pop("home", None)  # a home does not move itself
    return config


def index_defaults(home: str, workspace: dict[str, Any] | None = None) -> dict[str, Any]:
    """``find_links`` / ``index_url`` / ``no_index`` from the home's config, then the workspace's."""
    merged: dict[str, Any] = {}
    for config in (home_config(home), workspace or {}):
        for key in ("find_links", "index_url", "no_index"):
            if key in config:
                merged[key] = config[key]
    return merged


def write_config(config: dict[str, Any], path: str | os.PathLike | None = None,
                 file_name: str | None = None) -> str:
    """Write ``config`` as ``<path>/<file_name>`` (default ``./.tflaunch/config.json``); return the path."""
    directory = os.path.abspath(os.fspath(path) if path is not None else os.path.join(os.getcwd(), ".tflaunch"))
    target = os.path.join(directory, file_name or "config.json")
    from . import fsio

    try:
        os.makedirs(directory, exist_ok=True)
        fsio.atomic_write_json(target, {k: v for k, v in config.items() if v is not None})
    except OSError as exc:
        raise SpecError(f"write_config: cannot write {target}: {exc.strerror or exc}") from None
    return target
