"""Where a running portal is: ``<home>/ui.json``, written by ``tflaunch ui`` and removed when it stops.

``ui.json`` (always owner-only, mode 0600, since it may hold the token)::

    {"format": 1, "url": "http://127.0.0.1:40123/", "host": "127.0.0.1", "port": 40123,
     "loopback": true, "token": null, "pid": 1234, "pid_start": "5678", "hostname": "node1",
     "boot_id": "...", "instance": "<random>", "home": "/abs/home", "started": "2026-..."}

``url`` is the portal's root as printed (with ``?token=...`` when the server binds a non-loopback address
and so requires a token). A reader trusts the file only when the portal answers: on the same machine its pid
must be alive (same start time), then ``GET /health`` must answer within :data:`PROBE_TIMEOUT` seconds with
the same ``instance``; on another machine (a home shared over NFS) only a non-loopback portal can be reached,
and only the probe decides. Anything else (no file, a stale one, a portal that does not answer) means no
portal: the callers fall back to the ``file://`` report.
"""
from __future__ import annotations

import json
import logging
import os

from .. import fsio
from ..history.lease import local_identity, process_start_time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["UI_FILE", "PROBE_TIMEOUT", "ui_file", "write_ui_file", "remove_ui_file", "read_ui_file",
           "live_portal", "run_page_url", "portal_url"]

log = logging.getLogger(__name__)

UI_FILE = "ui.json"
UI_FORMAT = 1
PROBE_TIMEOUT = 0.5  # seconds: a live portal answers /health at once


def ui_file(home: str) -> str:
    return os.path.join(home, UI_FILE)


def write_ui_file(home: str, info: dict[str, Any]) -> None:
    """Replace ``<home>/ui.json`` with ``info`` (atomically, mode 0600)."""
    data = (json.dumps({"format": UI_FORMAT, **info}, indent=1) + "\n").encode("utf-8")
    fsio.atomic_write_bytes(ui_file(home), data, fsync=False, mode=0o600)


def remove_ui_file(home: str, instance: str) -> None:
    """Remove ``<home>/ui.json`` if it still describes portal ``instance`` (not one started since)."""
    current = read_ui_file(home)
    if current is not None and current.get("instance") != instance:
        return
    try:
        os.unlink(ui_file(home))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", ui_file(home), exc.strerror or exc)


def read_ui_file(home: str) -> dict[str, Any] | None:
    try:
        data = fsio.read_json(ui_file(home))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == UI_FORMAT else None


def _probe_address(info: dict[str, Any], same_machine: bool) -> tuple[str, int] | None:
    """Where to send the health probe: the bound address (a wildcard one: loopback on this machine, the
    host name from elsewhere); None when the portal cannot be reached from here."""
    host, port = info.get("host"), info.get("port")
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    if host in ("0.0.0.0", "::"):
        if not same_machine:
            return str(info.get("hostname")), port
        return ("127.0.0.1" if host == "0.0.0.0" else "::1"), port
    if info.get("loopback") and not same_machine:
        return None
    return host, port


def _probe(address: tuple[str, int], info: dict[str, Any], timeout: float) -> bool:
    import http.client
    from urllib.parse import quote

    path = "/health" + (f"?token={quote(str(info['token']))}" if info.get("token") else "")
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": _host_header(address)})
        response = conn.getresponse()
        if response.status != 200:
            return False
        answer = json.loads(response.read(4096))
        return isinstance(answer, dict) and answer.get("instance") == info.get("instance")
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _host_header(address: tuple[str, int]) -> str:
    host = address[0]
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def live_portal(home: str, *, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
    """The ``ui.json`` of the portal serving ``home`` when it is alive and answers, else None."""
    info = read_ui_file(home)
    if info is None or not isinstance(info.get("url"), str):
        return None
    identity = local_identity()
    same_machine = info.get("hostname") == identity["host"] and info.get("boot_id") == identity["boot_id"]
    if same_machine:
        pid = info.get("pid")
        if not isinstance(pid, int) or pid <= 0 or process_start_time(pid) != info.get("pid_start"):
            log.debug("portal in %s: pid %s is gone (stale %s)", home, pid, UI_FILE)
            return None
    address = _probe_address(info, same_machine)
    if address is None or not _probe(address, info, timeout):
        log.debug("portal in %s does not answer at %s", home, address)
        return None
    return info


def run_page_url(info: dict[str, Any], run_id: str) -> str:
    """The URL of run ``run_id``'s page in the portal ``info`` describes (with its token, if it has one)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(info["url"])
    return urlunsplit((parts.scheme, parts.netloc, f"/runs/{quote(run_id)}", parts.query, ""))


def portal_url(record: Any, *, report_records: list[Any] | None = None, title: str | None = None) -> str:
    """``Run.get_portal_url()``: the run's page in the live portal when one serves its home, else its HTML
    report (of ``report_records``, default the run itself) rendered now into ``report.html`` in the record,
    as a ``file://`` URL."""
    info = live_portal(record.store.home)
    if info is not None:
        return run_page_url(info, record.id)
    from urllib.parse import quote

    from ..history.compare import write_report

    records = [record] if report_records is None else report_records
    path = write_report(records, record.path("report.html"), title=title or f"run {record.id}")
    return "file://" + quote(path)
