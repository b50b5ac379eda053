"""The portal's HTTP server: :class:`Portal` (bind, publish ``ui.json``, serve, stop) and its request handler.

Read-only: GET only (other methods get 405). Pages and JSON:

    /                         runs list (?experiment=E&status=S&tag=K[=V]&metric=M[,M2])
    /runs/ID                  a run: live status, events, logs that follow, charts, files
    /runs/ID/charts           the run's charts (the report's SVG), an HTML fragment
    /runs/ID/files/NAME       one file of the run (outputs/, logs/, tflaunch_logs/, hosts/, snapshot/); ?download=1
    /compare?a=ID&b=ID        two runs compared (``runs diff``) with their charts overlaid
    /models                   the model registry
    /api/runs                 the runs list as JSON (same filters)
    /api/runs/ID              the run's live state (?version=V&wait=S: long poll; ?events=K: events from K)
    /api/runs/ID/log          ?file=NAME&offset=N[&limit=L]: a log's bytes from offset N (negative: a tail)
    /api/runs/ID/files        the run's files; /api/compare?a=&b=; /api/models; /health

Security: a loopback bind (the default) accepts only loopback ``Host`` headers (no DNS rebinding); any other
bind requires ``?token=`` (:func:`secrets.token_urlsafe`, compared with :func:`hmac.compare_digest`) on every
request, else 403. Files are served only from inside the home (:func:`tflaunch.portal.data.open_run_file`),
as text, an image or an attachment, under a sandboxing Content-Security-Policy.
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .._version import __version__
from ..errors import ModelNotFoundError, PathSafetyError, RunNotFoundError, SpecError, TflaunchError
from ..history.lease import hostname, local_identity, process_start_time
from ..history.layout import now_iso
from . import data, discover, pages

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable

__all__ = ["Portal", "PortalError"]

log = logging.getLogger(__name__)

MAX_WAIT = 30.0  # seconds a long poll may be held
_TEXT_TYPES = {".txt", ".log", ".csv", ".tsv", ".json", ".jsonl", ".py", ".stdout", ".stderr", ".yaml", ".yml", ".md",
               ".cfg", ".ini", ".toml", ".sh", ".out", ".err", ".rst"}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
_FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class PortalError(TflaunchError):
    """The portal cannot start (another one serves the home, the home is not a directory)."""


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a long poll never holds up the stop
    portal: "Portal"

    def server_bind(self) -> None:  # HTTPServer's calls getfqdn(): a reverse DNS lookup that may hang
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class Portal:
    """The portal over ``home``, bound to ``host:port`` (0: any free port) when created."""

    def __init__(self, home: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        from ..history.store import Store

        self.store = Store(home)
        if os.path.exists(self.store.home) and not os.path.isdir(self.store.home):
            raise PortalError(f"{self.store.home} is not a directory (give the tflaunch home with --home)")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise SpecError(f"--port {port!r} is invalid: give a port number from 0 to 65535 (0: any free port)")
        other = discover.live_portal(self.store.home)
        if other is not None:
            raise PortalError(f"a portal already serves {self.store.home} at {other.get('url')} "
                              f"(pid {other.get('pid')} on {other.get('hostname')}): stop it first (Ctrl-C), "
                              "or open that URL")
        self.stopping = threading.Event()
        self.instance = secrets.token_hex(12)
        self.httpd = self._bind(host, port)
        self.httpd.portal = self
        self.host, self.port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        self.loopback = _is_loopback(self.host)
        self.token = None if self.loopback else secrets.token_urlsafe(24)
        self.links = pages.Links(self.token)
        self._published = False

    @staticmethod
    def _bind(host: str, port: int) -> _Server:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SpecError(f"--host {host!r} is not an address of this machine: {reason}") from None
        family, _, _, _, address = infos[0]
        cls = _Server6 if family == socket.AF_INET6 else _Server
        try:
            return cls(address[:2] if family != socket.AF_INET6 else address, _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SpecError(f"cannot listen on {host}:{port}: the port is in use (choose another --port, or "
                                "--port 0 for any free one)") from None
            raise SpecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    @property
    def url(self) -> str:
        """The portal's root URL, with its token when it has one."""
        if self.host in ("0.0.0.0", "::"):
            name = hostname()
        else:
            name = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{name}:{self.port}/" + (f"?token={quote(self.token)}" if self.token else "")

    def publish(self) -> None:
        """Write ``<home>/ui.json`` (mode 0600) so that ``runs show`` and ``Run.get_portal_url()`` find this portal."""
        identity = local_identity()
        pid = os.getpid()
        try:
            self.store.ensure()  # a new home: created as a first run would create it
            discover.write_ui_file(self.store.home, {
                "url": self.url, "host": self.host, "port": self.port, "loopback": self.loopback, "token": self.token,
                "pid": pid, "pid_start": process_start_time(pid), "hostname": identity["host"],
                "boot_id": identity["boot_id"], "instance": self.instance, "home": self.store.home,
                "started": now_iso(), "version": __version__})
        except (OSError, TflaunchError) as exc:  # a home this user may only read: serve it all the same
            log.warning("cannot write %s (%s): `runs show` and Run.get_portal_url() will not name this portal",
                        discover.ui_file(self.store.home), getattr(exc, "strerror", None) or exc)
            return
        self._published = True

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.25)

    def start_thread(self) -> threading.Thread:
        """Serve in a background thread (for tests and embedding); :meth:`close` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="tflaunch-portal", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop serving, close the socket and remove ``ui.json`` (if it is still this portal's)."""
        self.stopping.set()
        if self._published:
            discover.remove_ui_file(self.store.home, self.instance)
            self._published = False
        self.httpd.server_close()

    def shutdown(self) -> None:
        """From another thread: end :meth:`serve_forever`, then :meth:`close`."""
        self.stopping.set()
        self.httpd.shutdown()
        self.close()

    # -- request checks ----------------------------------------------------------------------------------
    def token_ok(self, given: str | None) -> bool:
        if self.token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())

    def host_ok(self, header: str | None) -> bool:
        """On a loopback bind, the Host header must name this machine's loopback (DNS rebinding)."""
        if not self.loopback:
            return True
        if not header:
            return False
        name = header.strip().lower()
        if name.startswith("["):
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":")[0]
        return name in _LOOPBACK_NAMES or _is_loopback(name)


# -- routes ------------------------------------------------------------------------------------------------
_ROUTES: list[tuple[re.Pattern, str]] = []


def _route(pattern: str) -> Callable:
    def register(fn: Callable) -> Callable:
        _ROUTES.append((re.compile(pattern + r"\Z"), fn.__name__))
        return fn
    return register


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _many(query: dict[str, list[str]], key: str) -> list[str]:
    return [v.strip() for item in query.get(key, []) for v in item.split(",") if v.strip()]


def _int(query: dict[str, list[str]], key: str, default: int) -> int:
    text = _one(query, key)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"{key}={text!r} is not a whole number") from None


class _Handler(BaseHTTPRequestHandler):
    server_version = f"tflaunch-ui/{__version__}"
    timeout = 60  # a client that sends nothing for this long is dropped
    server: _Server

    # -- plumbing ----------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _headers(self, status: int, content_type: str, length: int, csp: str,
                 extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", csp)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def send_html(self, status: int, html: str, nonce: str | None = None) -> None:
        body = html.encode("utf-8", "backslashreplace")
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        self._headers(status, "text/html; charset=utf-8", len(body),
                      f"default-src 'none'; style-src 'unsafe-inline'; script-src {script}; connect-src 'self'; "
                      "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
        self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        try:
            text = json.dumps(obj, ensure_ascii=True, allow_nan=False, default=str)
        except ValueError:  # a NaN or infinity: as the CLI's --json writes them
            from ..history.metrics import json_safe
            text = json.dumps(json_safe(obj), ensure_ascii=True, allow_nan=False, default=str)
        body = text.encode("ascii")
        self._headers(status, "application/json", len(body), "default-src 'none'; frame-ancestors 'none'")
        self.wfile.write(body)

    def send_error_page(self, status: int, message: str, api: bool) -> None:
        if api:
            self.send_json(status, {"error": message, "status": status})
        else:
            self.send_html(status, pages.error_page(self.server.portal.links, status, message))

    # -- dispatch ----------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        parts = urlsplit(self.path)
        path = parts.path or "/"
        api = path.startswith("/api/") or path == "/health"
        query = parse_qs(parts.query, keep_blank_values=True)
        portal = self.server.portal
        if not portal.host_ok(self.headers.get("Host")):
            return self.send_error_page(403, "unexpected Host header: open the portal at the URL `tflaunch ui` "
                                             "printed", api)
        if not portal.token_ok(_one(query, "token")):
            return self.send_error_page(403, "this portal needs its token: open the URL `tflaunch ui` printed "
                                             "(it ends with ?token=...)", api)
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            return self.send_error_page(400, "the path is not valid UTF-8", api)
        if "\x00" in decoded or "\\" in decoded:
            return self.send_error_page(400, "the path holds a NUL or a backslash", api)
        for pattern, name in _ROUTES:
            match = pattern.match(decoded)
            if match:
                try:
                    return globals()[name](self, query, *match.groups())
                except (RunNotFoundError, ModelNotFoundError, FileNotFoundError) as exc:
                    return self.send_error_page(404, str(exc) if not isinstance(exc, FileNotFoundError)
                                                else f"no such file: {exc.filename or exc}", api)
                except PathSafetyError as exc:
                    return self.send_error_page(403, str(exc), api)
                except SpecError as exc:
                    return self.send_error_page(400, str(exc), api)
                except TflaunchError as exc:
                    return self.send_error_page(500, str(exc), api)
                except (BrokenPipeError, ConnectionResetError):
                    return None
                except Exception as exc:  # a bug: one line to the client, the traceback in the log
                    log.warning("portal: %s failed: %r", decoded, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                    return self.send_error_page(500, f"internal error: {exc!r}", api)
        return self.send_error_page(404, f"no page {decoded!r}", api)

    def _read_only(self) -> None:
        self.send_error_page(405, "the portal is read-only: only GET requests", self.path.startswith("/api/"))

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only  # noqa: N815

    def do_HEAD(self) -> None:  # noqa: N802
        self._read_only()


def _store(handler: _Handler) -> Any:
    return handler.server.portal.store


def _links(handler: _Handler) -> pages.Links:
    return handler.server.portal.links


@_route(r"/health")
def health(handler: _Handler, query: dict) -> None:
    handler.send_json(200, {"ok": True, "instance": handler.server.portal.instance, "version": __version__})


def _filters(query: dict) -> dict[str, Any]:
    return {"experiment": _one(query, "experiment") or None, "status": _one(query, "status") or None,
            "tag": _one(query, "tag") or None, "metric": _many(query, "metric")}


def _list(handler: _Handler, query: dict) -> list[dict[str, Any]]:
    f = _filters(query)
    return data.list_runs(_store(handler), experiment=f["experiment"], statuses=_many(query, "status"),
                          tags=query.get("tag", []), limit=max(1, _int(query, "limit", 500)))


@_route(r"/")
def runs_list(handler: _Handler, query: dict) -> None:
    runs = _list(handler, query)
    f = _filters(query)
    store = _store(handler)
    handler.send_html(200, pages.runs_page(_links(handler), runs, data.metric_columns(runs, f["metric"]), f,
                                           store.experiments(), store.home))


@_route(r"/api/runs")
def api_runs(handler: _Handler, query: dict) -> None:
    handler.send_json(200, _list(handler, query))


@_route(r"/runs/([^/]+)")
def run_page(handler: _Handler, query: dict, ref: str) -> None:
    from ..history.metrics import json_safe
    from ..history.runviews import describe

    record = _store(handler).run(ref)
    run = json_safe(describe(record))
    state = data.run_state(record)
    logs = []
    for entry in state["logs"]:
        try:
            logs.append({**data.log_chunk(record, entry["file"], -65536), "kind": entry["kind"]})
        except (OSError, TflaunchError) as exc:
            log.debug("run %s: %s: %s", record.id, entry["file"], exc)
    trials = []
    if run.get("kind") == "sweep":
        trials = sorted((r for r in _store(handler).list_runs() if r.get("parent") == record.id),
                        key=lambda r: (r.get("trial") is None, r.get("trial") or 0))
    nonce = secrets.token_urlsafe(16)
    html = pages.run_page(_links(handler), run, state, logs, data.run_files(record), _charts(handler, record, trials),
                          trials, nonce)
    handler.send_html(200, html, nonce)


def _charts(handler: _Handler, record: Any, trials: list[dict[str, Any]]) -> str:
    from ..history.compare import report_run
    from ..history.report import charts

    store = _store(handler)
    records = [store.run(t["id"]) for t in trials[:50]] if trials else [record]
    return charts([report_run(r) for r in records])


@_route(r"/runs/([^/]+)/charts")
def run_charts(handler: _Handler, query: dict, ref: str) -> None:
    record = _store(handler).run(ref)
    status = record.read_status() or {}
    trials = ([r for r in _store(handler).list_runs() if r.get("parent") == record.id]
              if status.get("kind") == "sweep" else [])
    handler.send_html(200, _charts(handler, record, trials))


@_route(r"/runs/([^/]+)/files/(.+)")
def run_file(handler: _Handler, query: dict, ref: str, name: str) -> None:
    record = _store(handler).run(ref)
    fh, size = data.open_run_file(record, name)
    with fh:
        base = name.rsplit("/", 1)[-1]
        ext = os.path.splitext(base)[1].lower()
        if ext in _IMAGE_TYPES:
            ctype = _IMAGE_TYPES[ext]
        elif ext in _TEXT_TYPES or (not ext and base.startswith("rank-")):
            ctype = "text/plain; charset=utf-8"
        else:
            ctype = "application/octet-stream"
        extra = {}
        if _one(query, "download") or ctype == "application/octet-stream":
            ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "file"
            extra["Content-Disposition"] = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base)}"
        handler._headers(200, ctype, size, _FILE_CSP, extra)
        remaining = size
        while remaining > 0:  # exactly the size announced, even if the file grows meanwhile
            chunk = fh.read(min(65536, remaining))
            if not chunk:
                break
            handler.wfile.write(chunk)
            remaining -= len(chunk)


@_route(r"/api/runs/([^/]+)")
def api_run(handler: _Handler, query: dict, ref: str) -> None:
    record = _store(handler).run(ref)
    known = _one(query, "version")
    try:
        wait = min(max(float(_one(query, "wait") or 0), 0.0), MAX_WAIT)
    except ValueError:
        raise SpecError(f"wait={_one(query, 'wait')!r} is not a number of seconds") from None
    deadline = time.monotonic() + wait
    portal = handler.server.portal
    while known and time.monotonic() < deadline and not portal.stopping.is_set():
        if data.state_version(record) != known:
            break
        portal.stopping.wait(0.2)
    handler.send_json(200, data.run_state(record, max(0, _int(query, "events", 0))))


@_route(r"/api/runs/([^/]+)/log")
def api_log(handler: _Handler, query: dict, ref: str) -> None:
    record = _store(handler).run(ref)
    name = _one(query, "file")
    if not name:
        raise SpecError("give the log as ?file=tflaunch_logs/rank-0.stdout")
    handler.send_json(200, data.log_chunk(record, name, _int(query, "offset", 0),
                                          _int(query, "limit", data.MAX_LOG_CHUNK)))


@_route(r"/api/runs/([^/]+)/files")
def api_files(handler: _Handler, query: dict, ref: str) -> None:
    handler.send_json(200, data.run_files(_store(handler).run(ref)))


def _compare(handler: _Handler, query: dict) -> tuple[str | None, str | None, dict | None, str]:
    from ..history.compare import report_run
    from ..history.report import charts

    a, b = _one(query, "a") or None, _one(query, "b") or None
    if not (a and b):
        return a, b, None, ""
    store = _store(handler)
    ra, rb = store.run(a), store.run(b)
    return ra.id, rb.id, data.compare(ra, rb), charts([report_run(ra), report_run(rb)])


@_route(r"/compare")
def compare_page(handler: _Handler, query: dict) -> None:
    a, b, result, chart_html = _compare(handler, query)
    ids = [r["id"] for r in _store(handler).list_runs(limit=500)]
    handler.send_html(200, pages.compare_page(_links(handler), a, b, result, chart_html, ids))


@_route(r"/api/compare")
def api_compare(handler: _Handler, query: dict) -> None:
    a, b, result, _ = _compare(handler, query)
    if result is None:
        raise SpecError("give two runs: /api/compare?a=RUN&b=RUN")
    handler.send_json(200, result)


@_route(r"/models")
def models_page(handler: _Handler, query: dict) -> None:
    handler.send_html(200, pages.models_page(_links(handler), data.models(_store(handler).home)))


@_route(r"/api/models")
def api_models(handler: _Handler, query: dict) -> None:
    handler.send_json(200, data.models(_store(handler).home))
