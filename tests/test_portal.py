"""The live local portal (``tflaunch ui``): HTTP-level checks of its pages and JSON, the token and Host checks,
paths that try to leave the home, the CLI (URL printed, ``ui.json``, clean stops, bad input), and a real
headless Chromium following a live run."""
from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from conftest import cli_env, last_run_when
from test_report import CHROMIUM, chromium, png_rows
from tflaunch.history.models import register_from_run
from tflaunch.history.store import Store
from tflaunch.portal import discover
from tflaunch.portal.server import Portal

TRAIN = """\
import os, sys
from tflaunch import Run
run = Run.get_context()
lr = float(sys.argv[sys.argv.index("--lr") + 1])
for step in range(4):
    run.log("loss", 1.0 / (step + 1) + lr)
    run.log("acc", step * lr)
    print("step", step, flush=True)
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.bin", "wb") as fh:
    fh.write(bytes(range(256)) * 40)
with open("outputs/notes.txt", "w") as fh:
    fh.write("notes\\n")
os.symlink("/etc/passwd", "outputs/passwd")
os.symlink("../../../..", "outputs/esc")
print("h\\u00e9llo \\u2713 end", flush=True)
sys.exit(3 if "--fail" in sys.argv else 0)
"""

LIVE = """\
import os, sys, time
from tflaunch import Run
run = Run.get_context()
for step in range(3):
    print("live line", step, flush=True)
    run.log("loss", 1.0 / (step + 1))
deadline = time.time() + 60
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.05)
run.log("loss", 0.1)
print("finished line", flush=True)
"""

EVIL = "<script>alert(1)</script>"


def tflaunch(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tflaunch", *args], env=cli_env(home), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A home with two finished runs: A (exp1, team=a, Completed) and B (exp2, team=b, Failed), and a model."""
    root = tmp_path_factory.mktemp("portal")
    home, src = root / "home", root / "proj"
    src.mkdir()
    (src / "train.py").write_text(TRAIN)
    a = tflaunch(home, "run", "--source-dir", str(src), "-e", "exp1", "--tag", "team=a", "--tag", f"note={EVIL}",
                 "train.py", "--lr", "0.1")
    assert a.returncode == 0, a.stderr
    b = tflaunch(home, "run", "--source-dir", str(src), "-e", "exp2", "--tag", "team=b", "train.py", "--lr", "0.5",
                 "--fail")
    assert b.returncode == 3, b.stderr
    store = Store(str(home))
    ids = {r["experiment"]: r["id"] for r in store.list_runs()}
    register_from_run(store.run(ids["exp1"]), "mnist", "outputs/model.bin", tags={"stage": "dev"})
    return {"home": home, "a": ids["exp1"], "b": ids["exp2"], "store": store}


@contextmanager
def serve(home: Path, host: str = "127.0.0.1"):
    portal = Portal(str(home), host, 0)
    portal.publish()
    portal.start_thread()
    try:
        yield portal
    finally:
        portal.shutdown()


def get(portal: Portal, path: str, host: str | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    """A raw GET (the path is sent exactly as given) to the portal over loopback."""
    address = "127.0.0.1" if portal.host in ("0.0.0.0", "127.0.0.1") else portal.host
    conn = http.client.HTTPConnection(address, portal.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{portal.port}"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(portal: Portal, path: str) -> object:
    status, headers, body = get(portal, path)
    assert status == 200, (path, status, body[:300])
    assert headers["content-type"] == "application/json"
    return json.loads(body)


class Dom(HTMLParser):
    """Elements with their attributes, the text under each id, and the page's text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.by_id: dict[str, list[str]] = {}
        self.open: list[str | None] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in ("meta", "input", "br", "img", "link", "circle", "rect", "line", "polyline"):
            self.open.append(attrs.get("id"))
            if attrs.get("id"):
                self.by_id.setdefault(attrs["id"], [])

    def handle_endtag(self, tag):
        if self.open:
            self.open.pop()

    def handle_data(self, data):
        self.text.append(data)
        for ident in self.open:
            if ident:
                self.by_id[ident].append(data)

    def id_text(self, ident: str) -> str:
        return "".join(self.by_id.get(ident, []))

    def find(self, tag: str, **attrs: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


# ---------------------------------------------------------------------------------------------- HTTP level

def test_runs_list_filters_and_metric_columns(recorded):
    a, b = recorded["a"], recorded["b"]
    with serve(recorded["home"]) as portal:
        ids = lambda query: [r["id"] for r in get_json(portal, "/api/runs" + query)]  # noqa: E731
        assert ids("") == [b, a]  # newest first
        assert ids("?experiment=exp1") == [a]
        assert ids("?status=Failed") == [b]
        assert ids("?status=Completed,Failed") == [b, a]
        assert ids("?tag=team=a") == [a] and ids("?tag=team") == [b, a] and ids("?tag=team=c") == []
        assert ids(f"?tag={quote('note=' + EVIL)}") == [a]

        status, headers, body = get(portal, "/?experiment=exp1&metric=loss,acc")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        html = body.decode()
        dom = Dom(html)
        rows = dom.find("tr", **{"class": "run"})
        assert [r["data-run"] for r in rows] == [a]
        assert [m["data-metric"] for m in dom.find("td", **{"class": "num metric"})] == ["loss", "acc"]
        assert "<script" not in html and EVIL in "".join(dom.text)  # the tag is shown, escaped
        assert dom.find("a", href=f"/runs/{a}")
        # Default metric columns: the metrics the runs logged; the filter form keeps its choices.
        dom = Dom(get(portal, "/?status=Failed")[2].decode())
        assert {m["data-metric"] for m in dom.find("td", **{"class": "num metric"})} == {"acc", "loss"}
        assert [o for o in dom.find("option", value="Failed") if "selected" in o]
        assert "No runs match." in get(portal, "/?experiment=nope")[2].decode()


def test_run_page_logs_by_offset_and_file_downloads(recorded):
    a, b = recorded["a"], recorded["b"]
    record = recorded["store"].run(a)
    with serve(recorded["home"]) as portal:
        dom = Dom(get(portal, f"/runs/{b}")[2].decode())
        assert dom.id_text("status") == "Failed" and "exit" in dom.id_text("error")
        dom = Dom(get(portal, f"/runs/{a}")[2].decode())
        assert dom.id_text("status") == "Completed"
        assert len(dom.find("svg", **{"class": "plot"})) == 2  # the report's charts: acc and loss
        assert "step 3" in "".join(dom.text) and "h\u00e9llo \u2713 end" in "".join(dom.text)
        files = {f["name"] for f in get_json(portal, f"/api/runs/{a}/files")}
        assert {"outputs/model.bin", "outputs/passwd", "tflaunch_logs/rank-0.stdout", "snapshot/train.py"} <= files

        # Logs by byte offset: whole, from an offset, at the end, a tail from a line, never half a character.
        full = Path(record.path("tflaunch_logs", "rank-0.stdout")).read_bytes()
        log = f"/api/runs/{a}/log?file=tflaunch_logs/rank-0.stdout"
        chunk = get_json(portal, log + "&offset=0")
        assert chunk["text"].encode() == full and chunk["next_offset"] == chunk["size"] == len(full)
        assert get_json(portal, log + "&offset=5")["text"].encode() == full[5:]
        assert get_json(portal, log + f"&offset={len(full)}") == {
            "file": "tflaunch_logs/rank-0.stdout", "offset": len(full), "next_offset": len(full), "size": len(full),
            "text": ""}
        tail = get_json(portal, log + "&offset=-12")
        assert tail["text"] == full[tail["offset"]:].decode() and full[tail["offset"] - 1:tail["offset"]] == b"\n"
        tick = full.index("\u2713".encode())
        assert get_json(portal, log + f"&offset={tick}&limit=2")["next_offset"] == tick  # waits for the 3rd byte
        assert get_json(portal, log + f"&offset={tick}&limit=3")["text"] == "\u2713"
        assert get(portal, log + "&offset=abc")[0] == 400

        # Downloads: the bytes as recorded; binary files as attachments; everything sandboxed.
        status, headers, body = get(portal, f"/runs/{a}/files/outputs/model.bin")
        assert status == 200 and body == Path(record.path("outputs", "model.bin")).read_bytes()
        assert headers["content-type"] == "application/octet-stream" and "attachment" in headers["content-disposition"]
        assert "sandbox" in headers["content-security-policy"]
        status, headers, body = get(portal, f"/runs/{a}/files/outputs/notes.txt")
        assert (status, body) == (200, b"notes\n") and headers["content-type"].startswith("text/plain")
        assert "attachment" in get(portal, f"/runs/{a}/files/outputs/notes.txt?download=1")[1]["content-disposition"]
        assert get(portal, f"/runs/{a}/files/snapshot/train.py")[2].decode() == TRAIN

        # Unknown runs and pages: 404, as a page or as JSON.
        assert get(portal, "/runs/20990101-000000-000-deadbeef")[0] == 404
        status, _, body = get(portal, "/api/runs/nope")
        assert status == 404 and "no run 'nope'" in json.loads(body)["error"]
        assert get(portal, f"/runs/{a}/files/outputs/missing.bin")[0] == 404
        assert get(portal, "/no/such/page")[0] == 404
        assert get(portal, "/")[0] == 200


def test_no_path_outside_the_home_is_served(recorded, tmp_path):
    a = recorded["a"]
    home = recorded["home"]
    outside = tmp_path / "outside-run"  # a run directory linked into runs/ from outside the home
    (outside / "outputs").mkdir(parents=True)
    (outside / "outputs" / "secret.txt").write_text("root:x:0:0 secret\n")
    for name in ("run.json", "status.json"):
        (outside / name).write_text(Path(recorded["store"].run(a).path(name)).read_text())
    linked = "20990101-000000-000-0badc0de"
    os.symlink(outside, home / "runs" / linked)
    try:
        with serve(home) as portal:
            attempts = [
                f"/runs/{a}/files/outputs/passwd",                           # a link to /etc/passwd
                f"/runs/{a}/files/outputs/esc/etc/passwd",                   # a link to a directory above the home
                f"/runs/{a}/files/outputs/../../../../../../etc/passwd",
                f"/runs/{a}/files/outputs/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                f"/runs/{a}/files/outputs%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
                f"/runs/{a}/files//etc/passwd",
                f"/runs/{a}/files/%2Fetc%2Fpasswd",
                f"/runs/{a}/files/snapshot/../../../../../../etc/passwd",
                f"/runs/{a}/files/run.json",                                 # not one of the served directories
                f"/runs/{a}/files/outputs%5c..%5c..%5crun.json",
                f"/runs/{a}/files/outputs/model.bin%00.txt",
                f"/runs/{a}/files/outputs/%ff",
                "/runs/..%2f..%2f..%2f..%2fetc/files/passwd",
                "/runs/../../../../etc/passwd",
                f"/runs/{linked}/files/outputs/secret.txt",                  # a run directory that lives elsewhere
                f"/api/runs/{a}/log?file=/etc/passwd",
                f"/api/runs/{a}/log?file=outputs/passwd",
                f"/api/runs/{a}/log?file=outputs/../../../../../../etc/passwd",
                f"/api/runs/{linked}/log?file=outputs/secret.txt",
                "http://127.0.0.1/../../../../etc/passwd",
            ]
            for path in attempts:
                status, _, body = get(portal, path)
                assert status in (400, 403, 404), (path, status)
                assert b"root:x:0:0" not in body, path
            assert get(portal, f"/runs/{a}/files/outputs/passwd")[0] == 403
            assert get(portal, f"/runs/{linked}/files/outputs/secret.txt")[0] == 403
    finally:
        os.unlink(home / "runs" / linked)


def test_compare_and_models_pages(recorded):
    a, b = recorded["a"], recorded["b"]
    with serve(recorded["home"]) as portal:
        result = get_json(portal, f"/api/compare?a={a}&b={b}")
        keys = {(d["section"], d["key"]): (d["a"], d["b"]) for d in result["differences"]}
        assert keys[("params", "--lr")] == ("0.1", "0.5") and keys[("run", "status")] == ("Completed", "Failed")
        assert keys[("params", "tag:team")] == ("a", "b") and result["same"] > 0
        dom = Dom(get(portal, f"/compare?a={a}&b={b}")[2].decode())
        assert f"{len(result['differences'])} differences" in dom.id_text("diff-summary")
        assert {p["data-run"] for p in dom.find("polyline")} == {a, b}  # both runs overlaid in each chart
        assert get(portal, "/compare")[0] == 200 and get(portal, f"/compare?a={a}&b=nope")[0] == 404

        models = get_json(portal, "/api/models")
        assert [(m["name"], m["version"]) for m in models] == [("mnist", 1)]
        dom = Dom(get(portal, "/models")[2].decode())
        assert [r["data-model"] for r in dom.find("tr", **{"class": "model"})] == ["mnist:1"]
        assert dom.find("a", href=f"/runs/{a}") and "stage=dev" in "".join(dom.text)
        assert get(portal, "/api/runs", host="evil.example:80")[0] == 403  # DNS rebinding: a foreign Host


def test_token_required_on_a_non_loopback_bind(recorded):
    home = recorded["home"]
    with serve(home, "0.0.0.0") as portal:
        assert not portal.loopback and portal.token and f"?token={portal.token}" in portal.url
        for path in ("/", "/api/runs", f"/runs/{recorded['a']}", "/health", "/api/runs?token=wrong",
                     f"/api/runs?token={portal.token[:-1]}"):
            status, _, body = get(portal, path)
            assert status == 403 and b"token" in body, path
        assert get(portal, f"/api/runs?token={portal.token}")[0] == 200
        status, _, body = get(portal, f"/?token={portal.token}")
        dom = Dom(body.decode())
        assert status == 200 and dom.find("a", href=f"/runs/{recorded['a']}?token={portal.token}")  # links keep it
        info = discover.read_ui_file(str(home))
        assert stat.S_IMODE(os.stat(home / "ui.json").st_mode) == 0o600 and info["token"] == portal.token
        live = discover.live_portal(str(home))
        assert live is not None
        url = discover.run_page_url(live, recorded["a"])
        assert url.endswith(f"/runs/{recorded['a']}?token={portal.token}")
    assert not (home / "ui.json").exists()
    assert discover.live_portal(str(home)) is None


# ---------------------------------------------------------------------------------------------- the CLI

def _start_ui(cli_popen, *args: str) -> tuple[subprocess.Popen, str]:
    proc = cli_popen("ui", "--port", "0", *args)
    line = proc.stdout.readline().decode().strip()
    assert line.startswith("http://"), (line, proc.stderr.read().decode() if proc.poll() is not None else "")
    return proc, line


def test_cli_ui_prints_its_url_publishes_it_and_stops_cleanly(recorded, cli_popen, tmp_path):
    from tflaunch import Experiment, Run, Workspace

    home, a = recorded["home"], recorded["a"]
    run = Run(Experiment("exp1", workspace=Workspace(str(home))), a)
    proc, url = _start_ui(cli_popen, "--home", str(home), "--host", "0.0.0.0")
    try:
        assert "?token=" in url
        assert stat.S_IMODE(os.stat(home / "ui.json").st_mode) == 0o600
        shown = tflaunch(home, "runs", "show", a)
        line = [x for x in shown.stdout.splitlines() if x.startswith("portal:")]
        assert line and line[0].split()[-1].endswith(f"/runs/{a}?{urlsplit(url).query}"), shown.stdout
        assert json.loads(tflaunch(home, "runs", "show", a, "--json").stdout)["portal_url"] == line[0].split()[-1]
        assert run.get_portal_url() == line[0].split()[-1]
        second = tflaunch(home, "ui", "--port", "0", timeout=20)  # one portal per home
        assert second.returncode == 1 and "already serves" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert "Traceback" not in proc.stderr.read().decode()
    assert not (home / "ui.json").exists()
    assert run.get_portal_url().startswith("file://")  # no portal: the report, as before
    assert "portal:" not in tflaunch(home, "runs", "show", a).stdout

    proc, url = _start_ui(cli_popen, "--home", str(home))  # loopback: no token; Ctrl-C stops it with 130
    assert "token" not in url and urlsplit(url).hostname == "127.0.0.1"
    assert run.get_portal_url() == f"{url.rstrip('/')}/runs/{a}"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert not (home / "ui.json").exists()

    # A stale ui.json (its portal was killed): ignored.
    info = {"url": url, "host": "127.0.0.1", "port": urlsplit(url).port, "loopback": True, "token": None,
            "pid": proc.pid, "pid_start": "1", "hostname": os.uname().nodename, "boot_id": "", "instance": "x"}
    discover.write_ui_file(str(home), info)
    try:
        assert discover.live_portal(str(home)) is None and run.get_portal_url().startswith("file://")
    finally:
        os.unlink(home / "ui.json")


def test_bad_cli_input_is_one_line_and_a_nonzero_exit(tmp_path):
    home = tmp_path / "home"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cases = [(["--port", "abc"], "not a port number"), (["--port", "70000"], "not a port number"),
                 (["--port", str(busy.getsockname()[1])], "in use"),
                 (["--host", "no-such-host.invalid"], "not an address")]
        for args, message in cases:
            result = tflaunch(home, "ui", *args, timeout=30)
            assert result.returncode == 2, (args, result.returncode, result.stderr)
            assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "Traceback" not in result.stderr and result.stdout == ""
    finally:
        busy.close()


# ---------------------------------------------------------------------------------------------- Chromium

class _Requests(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.1)


def test_a_live_run_in_headless_chromium(home, project, cli_popen, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS"):
            pytest.fail(f"{CHROMIUM} is required here (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed")
    src = project(**{"train.py": LIVE})
    release = tmp_path / "release"
    job = cli_popen("run", "--source-dir", str(src), "-e", "live", "train.py", str(release))
    run_id = last_run_when(home)
    requests = _Requests()
    logger = logging.getLogger("tflaunch.portal.server")
    old_level = logger.level
    logger.addHandler(requests)
    logger.setLevel(logging.DEBUG)
    try:
        with serve(home) as portal:
            state = lambda: get_json(portal, f"/api/runs/{run_id}")  # noqa: E731
            log = f"/api/runs/{run_id}/log?file=tflaunch_logs/rank-0.stdout"
            _wait(lambda: state()["run"]["status"] == "Running" and any(e["size"] for e in state()["logs"])
                  and "live line 2" in get_json(portal, log)["text"], 30, "the run did not print while Running")
            first = get_json(portal, log)
            page = f"http://127.0.0.1:{portal.port}/runs/{run_id}"

            # While it runs: the page shows Running and the lines printed so far; a screenshot of it.
            dom = chromium(tmp_path, "--dump-dom", page)
            assert dom.returncode == 0, dom.stderr[-2000:]
            parsed = Dom(dom.stdout)
            assert parsed.id_text("status") == "Running"
            assert all(f"live line {i}" in parsed.id_text("logs") for i in range(3))
            assert "finished line" not in parsed.id_text("logs")
            assert parsed.find("svg", **{"class": "plot"})  # loss, charted while the run goes on
            shot = tmp_path / "live.png"
            result = chromium(tmp_path, "--window-size=1200,1400", f"--screenshot={shot}", page)
            assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
            data = shot.read_bytes()
            width, height, rows = png_rows(data)
            assert (width, height) == (1200, 1400) and len(data) > 20_000
            colours = sum(rows, Counter())
            assert len(colours) > 50, len(colours)  # text, charts, the dark log box: far from a blank page
            badge = bytes.fromhex("dbeafe")  # the Running badge's background
            assert sum(1 for row in rows if badge in row) >= 5

            # The page follows the run: its script long-polls the state and appends the output by offset.
            requests.lines.clear()
            dumped: list[subprocess.CompletedProcess] = []
            browser = threading.Thread(target=lambda: dumped.append(
                chromium(tmp_path, "--virtual-time-budget=30000", "--dump-dom", page)))
            browser.start()
            _wait(lambda: any(f"/runs/{run_id} " in line for line in requests.lines), 60, "the page was not loaded")
            time.sleep(1.0)  # its script is waiting on its first long poll now
            release.touch()
            browser.join(timeout=90)
            assert dumped and dumped[0].returncode == 0, dumped and dumped[0].stderr[-2000:]
            parsed = Dom(dumped[0].stdout)
            assert parsed.id_text("status") == "Completed", parsed.id_text("status")
            logs = parsed.id_text("logs")
            assert logs.count("live line 0") == 1 and "finished line" in logs  # appended once, nothing repeated
            assert parsed.find("main", data_terminal="1")
            assert any("/log?" in line for line in requests.lines)

            # The JSON endpoint says Completed; the log goes on from where it was read.
            _wait(lambda: state()["run"]["status"] == "Completed", 30, "the run did not complete")
            rest = get_json(portal, log + f"&offset={first['next_offset']}")
            assert rest["text"] == "finished line\n"
            assert job.wait(timeout=30) == 0
    finally:
        logger.removeHandler(requests)
        logger.setLevel(old_level)


def test_a_huge_log_is_served_in_bounded_pieces(tmp_path):
    """A 24 MB log: the log API returns at most MAX_LOG_CHUNK per request whatever limit is asked, the run
    page stays small, and a download streams the whole file without the server holding it in memory."""
    import tracemalloc

    from tflaunch.portal.data import MAX_LOG_CHUNK

    home, src = tmp_path / "home", tmp_path / "proj"
    src.mkdir()
    (src / "train.py").write_text("print('start')\n")
    assert tflaunch(home, "run", "--source-dir", str(src), "train.py").returncode == 0
    run_id = Store(str(home)).list_runs()[0]["id"]
    log = home / "runs" / run_id / "tflaunch_logs" / "rank-0.stdout"
    line = b"x" * 99 + b"\n"
    with open(log, "ab") as fh:
        for _ in range(24):
            fh.write(line * 10_000 + line * 485)  # ~1 MB a time
    size = log.stat().st_size
    assert size > 24_000_000
    name = "tflaunch_logs/rank-0.stdout"
    with serve(home) as portal:
        chunk = get_json(portal, f"/api/runs/{run_id}/log?file={name}&offset=0&limit=1000000000")
        assert chunk["size"] == size and 0 < len(chunk["text"]) <= MAX_LOG_CHUNK
        assert chunk["next_offset"] == len(chunk["text"].encode())
        tail = get_json(portal, f"/api/runs/{run_id}/log?file={name}&offset=-1000")  # the end, from a line start
        assert tail["next_offset"] == size and tail["text"].endswith(line.decode()) and len(tail["text"]) <= 1000
        status, _, page = get(portal, f"/runs/{run_id}")
        assert status == 200 and len(page) < 2 * MAX_LOG_CHUNK + 200_000
        tracemalloc.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=30)
            conn.request("GET", f"/runs/{run_id}/files/{name}?download=1", headers={"Host": f"127.0.0.1:{portal.port}"})
            response = conn.getresponse()
            received = 0
            while True:
                piece = response.read(1 << 16)
                if not piece:
                    break
                received += len(piece)
            conn.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status == 200 and received == size
    assert peak < 4 << 20, peak  # a 24 MB file through a few 64 KB buffers
