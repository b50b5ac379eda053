"""What the hosts' reports say (``tflaunch doctor``): one host's outcome, what differs between hosts, the verdict.

:class:`HostCheck` turns a host's report (:func:`tflaunch.remote.agent.host_report`) into its JSON result (the
raw ``mpirun --version`` text parsed with :func:`tflaunch.plan.mpirun.parse_version`). :func:`differences`
(pure; also the multi-host run's preflight) says which package versions differ between hosts;
:func:`summarize` adds the hosts that failed and the warnings (:data:`SKEW_WARN_SECONDS`,
:data:`DISK_WARN_BYTES`, :data:`DISK_WARN_FRACTION`); :func:`table` is the text the command prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .plan.mpirun import FLAVOURS, parse_version

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["HostCheck", "differences", "summarize", "table", "DEFAULT_PACKAGES", "COMPARED", "SKEW_WARN_SECONDS",
           "DISK_WARN_BYTES", "DISK_WARN_FRACTION"]

DEFAULT_PACKAGES = ("tensorflow", "keras", "horovod", "mpi4py")
COMPARED = ("python",) + DEFAULT_PACKAGES + ("mpi",)  # what doctor requires to be the same on every host
SKEW_WARN_SECONDS = 2.0  # a host's clock further off than this is a warning (log times, TF/Horovod timeouts)
DISK_WARN_BYTES = 1 << 30  # free space below 1 GiB ...
DISK_WARN_FRACTION = 0.05  # ... or below 5 % of the filesystem is "nearly full" (a warning)
_LABELS = {"python": "Python", "mpi": "MPI"}


# -- one host ------------------------------------------------------------------------------------------
@dataclass
class HostCheck:
    """One host's outcome: ``result`` is its JSON object (see README, ``tflaunch doctor``); ``report`` the raw
    report of its agent (None when it gave none)."""

    host: str
    via: str  # "local", "ssh" or "srun"
    result: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.result:
            self.result = {"host": self.host, "via": self.via, "ok": False, "failure": None, "error": None,
                           "differs": [], "hostname": None, "python": None, "packages": None, "mpi": None,
                           "gpus": None, "disk": None, "clock_skew_seconds": None, "round_trip_seconds": None,
                           "seconds": None, "warnings": [], "agent_python": None}

    def fail(self, failure: str, error: str) -> None:
        if self.result["failure"] is None:
            self.result.update(failure=failure, error=error)

    def fill(self, hostname: str | None, report: Mapping[str, Any], host_time_at_arrival: float,
             round_trip: float | None) -> None:
        """Take a host's report; ``host_time_at_arrival``: the launcher's clock when the report left the host."""
        self.report = dict(report)
        r = self.result
        python = report.get("python") or {}
        r["hostname"] = hostname
        r["python"] = {"path": python.get("path"), "version": python.get("version"), "error": python.get("error")}
        r["packages"] = report.get("packages")
        r["mpi"] = _mpi(report.get("mpirun"))
        r["gpus"] = _gpus(report.get("gpus"))
        r["disk"] = report.get("disk") or None
        if isinstance(report.get("time"), (int, float)):
            r["clock_skew_seconds"] = round(report["time"] - host_time_at_arrival, 4)
        r["round_trip_seconds"] = None if round_trip is None else round(round_trip, 5)
        if report.get("error"):
            self.fail("report", f"the tflaunch agent could not report: {report['error']}")
        elif python.get("error"):
            self.fail("interpreter", f"the job's Python: {python['error']}")


def _mpi(mpirun: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if mpirun is None:
        return None
    out = {"path": mpirun.get("path"), "flavour": None, "name": None, "version": None, "error": mpirun.get("error")}
    if out["path"] and not out["error"]:
        found = parse_version(mpirun.get("output") or "")
        if found is None:
            first = (mpirun.get("output") or "").strip().splitlines()[:1] or [f"exit status {mpirun.get('returncode')}"]
            out["error"] = f"{out['path']} is not Open MPI, MPICH or Intel MPI ('--version' said: {first[0][:200]})"
        else:
            out["flavour"], out["version"] = found
            out["name"] = FLAVOURS[found[0]]["name"]
    return out


def _gpus(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    visible = report.get("visible")
    if visible is not None:
        ids = [item.strip() for item in visible.split(",") if item.strip()]
        return {"count": len(ids), "ids": ids, "source": "CUDA_VISIBLE_DEVICES", "error": None}
    found = report.get("found")
    if found:
        return {"count": len(found), "ids": [str(g) for g in found], "source": "nvidia-smi", "error": report.get("error")}
    return {"count": 0, "ids": [], "source": None, "error": report.get("error")}


# -- what differs --------------------------------------------------------------------------------------
def _mpi_label(mpirun: Mapping[str, Any]) -> str:
    if not mpirun.get("path"):
        return "not found"
    found = parse_version(mpirun.get("output") or "")
    if found is None:
        return "unknown"
    flavour, version = found
    return f"{FLAVOURS[flavour]['name']} {version}".strip()


def _value(report: Mapping[str, Any], key: str) -> str | None:
    """``key``'s value on a host, as messages show it; None when the report was not asked for it."""
    if key == "python":
        return (report.get("python") or {}).get("version") or "unknown"
    if key == "mpi":
        mpirun = report.get("mpirun")
        return None if mpirun is None else _mpi_label(mpirun)
    packages = report.get("packages")
    if packages is None:
        return "unknown"  # the interpreter could not be asked
    if key not in packages:
        return None
    item = packages[key]
    return "not installed" if item is None else str(item.get("version") or "unknown")


def _groups(reports: Mapping[str, Mapping[str, Any] | None], key: str) -> list[tuple[str, list[str]]]:
    """(value, hosts) for ``key``, biggest group first (ties: in the order of the hosts)."""
    groups: dict[str, list[str]] = {}
    for host, report in reports.items():
        if report is None:
            continue
        value = _value(report, key)
        if value is not None:
            groups.setdefault(value, []).append(host)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


def _names(hosts: Sequence[str], limit: int = 8) -> str:
    if len(hosts) <= limit:
        return ", ".join(hosts)
    return ", ".join(hosts[:limit - 2]) + f" and {len(hosts) - limit + 2} more"


def _odd(groups: list[tuple[str, list[str]]]) -> list[str]:
    """The hosts that differ from the rest: outside the one biggest group (every host when there is no
    single biggest group)."""
    if len(groups) < 2:
        return []
    if len(groups[0][1]) == len(groups[1][1]):
        return [h for _, hosts in groups for h in hosts]
    return [h for _, hosts in groups[1:] for h in hosts]


def differences(reports: Mapping[str, Mapping[str, Any] | None],
                keys: Sequence[str] = ("tensorflow",)) -> list[str]:
    """One message per key whose value differs between the hosts (empty when all agree). Pure.

    ``reports``: host -> the ``report`` of its hello (None: no report; left out). ``keys``: package names
    asked for in :func:`report_request`, ``"python"`` (the job interpreter's version) or ``"mpi"`` (the
    mpirun found, as ``"Open MPI 4.1.4"``). A host whose interpreter lacks a package has it ``not installed``;
    one whose interpreter could not be asked, ``unknown``. The message names the odd hosts and both values,
    e.g. ``h3: tensorflow 2.99.0, the others (h1, h2) 2.21.0``; without a majority, ``tensorflow differs
    between the hosts: h1 2.21.0; h2 2.99.0``."""
    messages = []
    for key in keys:
        groups = _groups(reports, key)
        if len(groups) < 2:
            continue
        label = _LABELS.get(key, key)
        if len(groups[0][1]) == len(groups[1][1]):
            messages.append(f"{label} differs between the hosts: "
                            + "; ".join(f"{_names(hosts)} {value}" for value, hosts in groups))
            continue
        (common, others), rest = groups[0], groups[1:]
        odd = "; ".join(f"{', '.join(hosts)}: {label} {value}" for value, hosts in rest)
        messages.append(f"{odd}, the others ({_names(others)}) {common}")
    return messages


# -- the verdict ---------------------------------------------------------------------------------------
def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n}B"


def summarize(checks: Sequence[HostCheck], keys: Sequence[str] = COMPARED, *,
              home_needed: bool = False) -> dict[str, Any]:
    """The summary of a doctor run, ``{"ok", "hosts", "failed", "differing", "problems", "warnings"}``; marks
    each host's result (``ok``, ``differs``, ``warnings``). Problems: every host that failed (one message
    each) and every key of ``keys`` that differs between the hosts that answered (:func:`differences`).
    Warnings: a clock off by more than :data:`SKEW_WARN_SECONDS`, a disk with less than
    :data:`DISK_WARN_BYTES` free or :data:`DISK_WARN_FRACTION` of its size, and with ``home_needed`` (a
    Slurm run needs the home on every node) a node where the home is not visible."""
    answered = {c.host: c.report for c in checks if c.result["failure"] is None and c.report is not None}
    problems = [f"{c.host}: {c.result['error']}" for c in checks if c.result["failure"] is not None]
    differing: dict[str, list[str]] = {}
    for key in keys:
        odd = _odd(_groups(answered, key))
        if odd:
            differing[key] = odd
    problems += differences(answered, keys)
    warnings: list[str] = []
    for c in checks:
        r = c.result
        r["differs"] = [key for key, hosts in differing.items() if c.host in hosts]
        r["ok"] = r["failure"] is None and not r["differs"]
        mine: list[str] = []
        skew = r.get("clock_skew_seconds")
        if isinstance(skew, (int, float)) and abs(skew) > SKEW_WARN_SECONDS:
            mine.append(f"{c.host}: its clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} this "
                        f"machine's (more than {SKEW_WARN_SECONDS:g} s: timestamps in logs and metrics disagree; "
                        "run NTP/chrony there)")
        for label, entry in sorted((r.get("disk") or {}).items()):
            if not entry:
                continue
            if not entry.get("visible"):
                if label == "home" and home_needed:
                    mine.append(f"{c.host}: the home {entry.get('path')} is not visible there (a run inside Slurm "
                                "keeps its record there: put the home on a filesystem every node sees)")
                continue
            free, total = entry.get("free_bytes"), entry.get("total_bytes")
            if isinstance(free, int) and isinstance(total, int) and total > 0 and (
                    free < DISK_WARN_BYTES or free < DISK_WARN_FRACTION * total):
                mine.append(f"{c.host}: disk nearly full: {_bytes(free)} free of {_bytes(total)} "
                            f"({100 * free / total:.1f} %) in the {label} {entry.get('path')}")
        r["warnings"] = mine
        warnings += mine
    return {"ok": not problems, "hosts": len(checks),
            "failed": [c.host for c in checks if c.result["failure"] is not None],
            "differing": differing, "problems": problems, "warnings": warnings}


def _package_cell(result: Mapping[str, Any], name: str) -> str:
    packages = result.get("packages")
    if packages is None or name not in packages:
        return "-" if packages is None else "?"
    item = packages[name]
    return "-" if item is None else str(item.get("version") or "?")


def _gpu_cell(gpus: Mapping[str, Any] | None) -> str:
    if gpus is None:
        return "-"
    if gpus.get("source") == "CUDA_VISIBLE_DEVICES":
        return f"{gpus['count']} (CUDA_VISIBLE_DEVICES)" if gpus["count"] else "hidden (CUDA_VISIBLE_DEVICES='')"
    return str(gpus["count"]) if gpus.get("count") else "none"


def _disk_cell(disk: Mapping[str, Any] | None) -> str:
    if not disk:
        return "-"
    cells = []
    for key in ("home", "scratch"):
        entry = disk.get(key)
        if entry is None:
            cells.append("-")
        elif not entry.get("visible"):
            cells.append("not visible")
        else:
            cells.append(_bytes(entry.get("free_bytes")))
    return "/".join(cells)


def table(checks: Sequence[HostCheck], packages: Sequence[str] = DEFAULT_PACKAGES) -> str:
    """One row per host (call :func:`summarize` first: it sets ok / FAIL)."""
    rows = [["HOST", "STATUS", "PYTHON"] + [p.upper() for p in packages] + ["MPI", "GPUS", "FREE HOME/SCRATCH",
                                                                           "SKEW"]]
    for c in checks:
        r = c.result
        python = r.get("python") or {}
        mpi = r.get("mpi")
        if mpi is None:
            mpi_cell = "-"
        elif mpi.get("name"):
            mpi_cell = f"{mpi['name']} {mpi['version']}".strip()
        else:
            mpi_cell = "not found" if not mpi.get("path") else "unknown"
        skew = r.get("clock_skew_seconds")
        rows.append([c.host, "ok" if r.get("ok") else "FAIL", python.get("version") or "-"]
                    + [_package_cell(r, p) for p in packages]
                    + [mpi_cell, _gpu_cell(r.get("gpus")), _disk_cell(r.get("disk")),
                       "-" if skew is None else f"{skew:+.2f}s"])
    from .textfmt import table as text_table

    return text_table(rows)
