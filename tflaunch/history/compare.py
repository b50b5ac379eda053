"""Runs side by side: a run as flat sections of comparable values (``runs diff``, the report's params
table) and the HTML report of several runs (``runs report``, ``Run.get_portal_url``)."""
from __future__ import annotations

import json
import os

from .. import textfmt
from ..errors import TflaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["comparable", "diff", "report_run", "write_report"]


def _params(arguments: list[str]) -> dict[str, str]:
    """``--lr 0.01 --verbose x`` -> {"--lr": "0.01", "--verbose": "", "arg 0": "x"}: script_params back."""
    out: dict[str, str] = {}
    i, positional = 0, 0
    while i < len(arguments):
        item = arguments[i]
        if item.startswith("-") and len(item) > 1 and not _is_number(item):
            key, sep, value = item.partition("=")
            if sep:
                out[key] = value
            elif i + 1 < len(arguments) and not (arguments[i + 1].startswith("-") and not _is_number(arguments[i + 1])):
                out[key] = arguments[i + 1]
                i += 1
            else:
                out[key] = ""
        else:
            out[f"arg {positional}"] = item
            positional += 1
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def comparable(record: Any, run: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """A run as sections of flat key -> value, for ``runs diff`` and the report's params table (``run``:
    its :func:`~tflaunch.history.store.describe`, when the caller has it already)."""
    from .store import describe

    run = run if run is not None else describe(record)
    definition = record.definition()
    spec = definition.get("spec", {})
    git = run.get("git") or {}
    environment = definition.get("environment") or {}
    sections: dict[str, dict[str, Any]] = {
        "run": {"experiment": run.get("experiment"), "status": run.get("status"),
                "entry_script": run.get("entry_script"), "duration_seconds": run.get("duration_seconds")},
        "params": {**_params(list(spec.get("arguments") or [])),
                   **{f"tag:{k}": v for k, v in (run.get("tags") or {}).items()},
                   **{f"property:{k}": v for k, v in (run.get("properties") or {}).items()}},
        "git": {k: git.get(k) for k in ("status", "commit", "branch", "remote", "dirty", "patch_sha256") if k in git},
        "environment": {
            "python": spec.get("python"), "tflaunch_version": definition.get("tflaunch_version"),
            "python_version": (definition.get("submitted_from") or {}).get("python"),
            "platform": (definition.get("submitted_from") or {}).get("platform"),
            "node_count": spec.get("node_count"), "process_count_per_node": spec.get("process_count_per_node"),
            "backend": (spec.get("distributed") or {}).get("backend", "plain"), "use_gpu": spec.get("use_gpu"),
            "snapshot": _snapshot_id(record),
            **{f"framework.{k}": v for k, v in environment.items() if isinstance(v, (str, int, float, bool))},
            **{f"env:{k}": v for k, v in sorted({**(spec.get("environment_variables") or {}),
                                                 **dict.fromkeys(definition.get("withheld_environment") or (),
                                                                 "<withheld>")}.items())},
        },
        "packages": _frozen(record),
        "metrics": dict(run.get("metrics") or {}),
    }
    if run.get("environment"):
        sections["environment"]["environment.key"] = run["environment"].get("key")
    for item in run.get("inputs") or ():
        sections["params"][f"input:{item.get('name')}"] = item.get("sha256") or item.get("path")
    return sections


def diff(left: dict[str, dict[str, Any]], right: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                                  list[dict[str, Any]]]:
    """``(differences, same)`` between two runs' :func:`comparable` sections: rows ``{section, key, a, b}``
    in section order (params and metrics keys sorted); durations always count as the same."""
    differences, same = [], []
    for section in left:
        keys = list(dict.fromkeys([*left[section], *right.get(section, {})]))
        if section in ("params", "metrics"):
            keys.sort()
        for key in keys:
            va, vb = left[section].get(key), right.get(section, {}).get(key)
            row = {"section": section, "key": key, "a": va, "b": vb}
            (same if va == vb or (section == "run" and key == "duration_seconds") else differences).append(row)
    return differences, same


def _frozen(record: Any) -> dict[str, Any]:
    """``name: version`` of the packages the run's environment had (its ``pip freeze``; first host)."""
    try:
        with open(record.path("environment.json")) as fh:
            hosts = json.load(fh).get("hosts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    first = next(iter(hosts.values()), {}) if isinstance(hosts, dict) else {}
    out = {}
    for line in first.get("freeze") or ():
        name, sep, version = str(line).partition("==")
        out[name] = version if sep else ""
    return out


def _snapshot_id(record: Any) -> Any:
    try:
        with open(record.path("snapshot.json")) as fh:
            return json.load(fh).get("tree")
    except (OSError, ValueError, AttributeError):
        return None


def write_report(records: list[Any], output: str, *, title: str | None = None) -> str:
    """Render the HTML report of ``records`` (RunRecords) into ``output``; return its absolute path."""
    from .. import fsio
    from .report import render

    html = render([report_run(record) for record in records], title=title)
    output = os.path.abspath(output)
    try:
        fsio.atomic_write_bytes(output, html.encode("utf-8"), fsync=False)
    except OSError as exc:
        raise TflaunchError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


def report_run(record: Any) -> dict[str, Any]:
    """What the report draws of a run (a RunRecord): id, experiment, status, created, duration, params
    and its scalar metrics as ``{name: {"steps", "values"}}`` (the report's and the portal's charts)."""
    from . import metrics
    from .store import describe

    run = describe(record)
    params = {f"{s}.{k}" if s != "params" else k: "" if v is None else str(v)
              for s, values in comparable(record, run).items() if s in ("params", "git")
              for k, v in values.items()}
    params["command"] = " ".join([run.get("entry_script") or "?", *run.get("arguments", [])])
    if run.get("parent"):  # a sweep's trial: its hyperparameters and the sweep's primary metric
        params["sweep"] = f"{run['parent']} trial {run.get('trial')}"
        for name, value in (run.get("hyperparameters") or {}).items():
            params[f"hyperparameter {name}"] = str(value)
        params.update(_primary(record, run["parent"]))
    charts = {}
    for name, series in metrics.load(record.dir).items():
        if metrics.kind_of(series) != "scalar":
            continue
        ranks = [r for r in series.rank if r is not None]
        first = min(ranks) if ranks else None
        if len(set(ranks)) > 1:  # several ranks logged it: draw the lowest rank's curve
            keep = [i for i, r in enumerate(series.rank) if r == first]
            steps, values = [series.step[i] for i in keep], [series.value[i] for i in keep]
        else:
            steps, values = series.step, series.value
        charts[name] = {"steps": steps, "values": values}
    return {"id": run["id"], "experiment": run.get("experiment"), "status": run.get("status"),
            "created": run.get("created"), "duration_seconds": run.get("duration_seconds"),
            "params": params, "metrics": charts}


def _primary(record: Any, parent: str) -> dict[str, str]:
    """``{"best <primary metric>": value}`` of a sweep's trial, as its sweep recorded it."""
    from ..sweep.trials import load

    try:
        state = load(record.store.run(parent).dir)
    except (OSError, ValueError, TflaunchError):
        return {}
    for trial in state["trials"]:
        if trial["run_id"] == record.id:
            return {f"best {state['config']['primary_metric_name']}": textfmt.value(trial.get("best"))}
    return {}
