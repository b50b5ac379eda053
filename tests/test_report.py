"""The HTML run report: self-contained, escaped, honest about what it did not draw, fast on big series, and
rendered by a real browser (headless Chromium) into charts with the runs' colours."""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tflaunch.history import report
from tflaunch.errors import SpecError

CHROMIUM = "/usr/bin/chromium"

# Every element the report may contain: anything else (script, link, img, iframe, ...) is a failure.
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "section", "nav", "a", "div",
    "table", "thead", "tbody", "tr", "th", "td", "span", "strong", "figure", "figcaption", "footer",
    "svg", "rect", "line", "text", "polyline", "g", "circle",
}


class Page(HTMLParser):
    """Start tags with their attributes and enclosing figure id, and the page's text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict, str | None]] = []
        self.text: list[str] = []
        self.figure: str | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figure = attrs.get("id")
        self.tags.append((tag, attrs, self.figure))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "figure":
            self.figure = None

    def handle_data(self, data):
        self.text.append(data)

    def all_text(self) -> str:
        return "".join(self.text)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict, str | None]]:
        return [(a, fig) for t, a, fig in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def points(attrs: dict) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in attrs["points"].split()]


def make_run(i: int, **metrics) -> dict:
    return {"id": f"20261123-10153{i}-123-5f3a9c1{i}", "experiment": "tf-mnist",
            "status": ("Completed", "Failed", "Running")[i % 3], "created": "2026-11-23T10:15:30.123Z",
            "duration_seconds": 12.5 * (i + 1), "params": {"arguments": f"--lr 0.0{i + 1} --epochs 3",
                                                          "tag:team": "a"},
            "metrics": {name: {"steps": list(range(len(v))), "values": list(v)} for name, v in metrics.items()}}


def sample_runs() -> list[dict]:
    """Three runs, three metrics: accuracy (all runs, one NaN), loss/val (runs 0 and 2), lr (one point each)."""
    rng = random.Random(7)
    runs = []
    for i in range(3):
        acc = [1 - 0.9 * math.exp(-s / (6 + 3 * i)) + rng.uniform(-0.02, 0.02) for s in range(40)]
        loss = [2.3 * math.exp(-s / (5 + 3 * i)) for s in range(40)]
        metrics = {"accuracy": acc, "lr": [0.01 * (i + 1)]}
        if i != 1:
            metrics["loss/val"] = loss
        runs.append(make_run(i, **metrics))
    runs[1]["metrics"]["accuracy"]["values"][7] = float("nan")
    runs[2]["params"]["git.commit"] = "abc123"
    return runs


def test_report_is_one_self_contained_page_with_charts_legend_and_params():
    runs = sample_runs()
    html = report.render(runs)
    assert html == report.render(runs)  # deterministic: no timestamps
    assert html.startswith("<!DOCTYPE html>")
    assert "http:" not in html.lower() and "https:" not in html.lower() and "//" not in html
    page = Page(html)
    tags = {t for t, _, _ in page.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for _, attrs, _ in page.tags:  # no resource references of any kind; links only to anchors in the page
        assert not {"src", "srcset", "xlink:href", "action"} & set(attrs), attrs
        assert attrs.get("href", "#").startswith("#"), attrs
        assert "url(" not in (attrs.get("style") or ""), attrs
    csp = page.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and "default-src 'none'" in csp[0][0]["content"]

    figures = {a["id"] for a, _ in page.find("figure")}
    assert figures == {"metric-1", "metric-2", "metric-3"}  # accuracy, loss/val, lr (sorted by name)
    lines = Counter(fig for _, fig in page.find("polyline"))
    assert lines == {"metric-1": 3, "metric-2": 2}  # loss/val only in runs 0 and 2: still charted
    by_run = {a["data-run"]: a for a, fig in page.find("polyline") if fig == "metric-1"}
    assert set(by_run) == {r["id"] for r in runs}
    assert len({a["stroke"] for a in by_run.values()}) == 3  # distinct colours
    assert len(points(by_run[runs[1]["id"]])) == 39  # the NaN is not drawn...
    assert "1 non-finite value not drawn" in page.all_text()  # ...but said
    markers = [fig for _, fig in page.find("circle")]
    assert markers.count("metric-3") == 3  # lr: one point per run, drawn as a marker
    # Axes: round tick labels, and the labels "step" and the metric name.
    ticks = [a for a, fig in page.find("text") if fig == "metric-1"]
    assert any(a.get("class") == "axis-label" for a in ticks)
    assert re_texts(html, "metric-1", "tick") == ["0.25", "0.5", "0.75", "1", "0", "10", "20", "30"]  # y, x
    assert re_texts(html, "metric-1", "axis-label") == ["step", "accuracy"]
    # Legend/stats table under each chart: min, max and last of every run, computed on every point.
    acc0 = runs[0]["metrics"]["accuracy"]["values"]
    assert f"{max(acc0):.6g}" in page.all_text() and f"{min(acc0):.6g}" in page.all_text()
    # Params: union of keys; the differing rows are highlighted, the identical one is not.
    diff_rows = [a for a, _ in page.find("tr", **{"class": "diff"})]
    assert len(diff_rows) == 2  # arguments differ; git.commit is missing in two runs
    assert "2 of 3 params differ" in page.all_text()


def re_texts(html: str, figure: str, cls: str) -> list[str]:
    """Texts of the ``<text class=cls>`` elements inside the figure with id ``figure``."""
    class Texts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.fig, self.inside, self.out = None, False, []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "figure":
                self.fig = attrs.get("id")
            self.inside = tag == "text" and self.fig == figure and attrs.get("class") == cls

        def handle_data(self, data):
            if self.inside:
                self.out.append(data)

        def handle_endtag(self, tag):
            self.inside = False
    parser = Texts()
    parser.feed(html)
    return parser.out


def test_everything_is_escaped():
    evil = "<script>alert(\"x\")</script>&amp;'"
    run = make_run(0, **{"loss/val": [1.0, 2.0], evil: [3.0, 1.0], "ünï 🚀 \"q\"": [1.0, 1.5]})
    run["id"] = "run\"><img src=x onerror=alert(1)>"
    run["experiment"] = "exp<b>"
    run["status"] = "Completed\" onmouseover=\"x"
    run["params"] = {evil: evil, "undecodable": "a\udcffb", "multi": "line1\nline2"}
    html = report.render([run], title=evil)
    html.encode("utf-8")  # writable as UTF-8 although a param held a lone surrogate
    page = Page(html)
    assert {t for t, _, _ in page.tags} <= ALLOWED_TAGS  # no <script>, no <img>, no <b>
    assert not any(k.startswith("on") for _, a, _ in page.tags for k in a)
    text = page.all_text()
    assert text.count(evil) >= 4  # title, h1, param key and value, metric caption...
    for raw in ("ünï 🚀 \"q\"", "exp<b>", "Completed\" onmouseover=\"x", "a\\udcffb", "line1\nline2", "loss/val"):
        assert raw in text, raw
    assert {a["data-run"] for a, _ in page.find("polyline")} == {run["id"]}
    assert text.count(run["id"]) >= 3  # runs table, params header, stats table, SVG titles


def test_non_finite_and_non_numeric_values_are_counted_not_drawn():
    run = make_run(0)
    run["metrics"] = {
        "m": {"steps": [0, 1, 2, 3, 4, 5, 6, 7, 8], "values": [1, float("nan"), float("inf"), float("-inf"), None,
                                                              "0.5", True, 10 ** 400, 2.5]},
        "only-nan": {"steps": [0, 1], "values": [float("nan"), float("nan")]},
        "bad-steps": {"steps": [0, None, "x", 3], "values": [1.0, 2.0, 3.0, 4.0]},
    }
    page = Page(report.render([run]))
    text = page.all_text()
    assert "4 non-finite values not drawn; 3 non-numeric values skipped" in text  # 10**400: beyond a float
    assert "2 non-finite values not drawn" in text and "No numeric values to draw." in text
    assert "2 non-numeric values skipped" in text  # bad-steps: two points without a numeric step
    drawn = {fig: len(points(a)) for a, fig in page.find("polyline")}
    assert drawn == {"metric-1": 2, "metric-2": 2}  # bad-steps: 0 and 3; m: 1 and 2.5


def test_values_at_the_float_limits_still_draw():
    run = make_run(0)
    run["metrics"] = {"huge": {"steps": [0, 1], "values": [-1.7e308, 1.7e308]},
                      "subnormal": {"steps": [0, 10 ** 30], "values": [5e-324, 1e-323]}}
    page = Page(report.render([run]))
    coords = [c for a, _ in page.find("polyline") for xy in points(a) for c in xy]
    assert len(coords) == 8 and all(map(math.isfinite, coords))


def test_unsorted_steps_are_sorted_and_last_is_the_last_step():
    run = make_run(0)
    run["metrics"] = {"m": {"steps": [3, 1, 2, 0], "values": [30.0, 10.0, 20.0, 0.5]}}
    html = report.render([run])
    (line, _), = Page(html).find("polyline")
    xs = [x for x, _ in points(line)]
    assert xs == sorted(xs) and len(xs) == 4
    # Stats: last (at the last step), min, max, last step, points; the run's duration comes first.
    assert re.findall(r'<td class="num">([^<]*)</td>', html)[1:] == ["30", "0.5", "30", "3", "4"]


def test_a_million_point_series_is_downsampled_keeping_its_spikes():  # its speed: bench/scale_checks.py
    n = 1_000_000
    rng = random.Random(3)
    values = [math.sin(i / 20000) + rng.random() * 0.1 for i in range(n)]
    values[123_457], values[777_777] = 1000.0, -500.0
    run = {"id": "big", "metrics": {"m": {"steps": list(range(n)), "values": values}}}
    html = report.render([run], max_points=1000)
    assert len(html) < 60_000
    page = Page(html)
    (line, _), = page.find("polyline")
    pts = points(line)
    assert len(pts) <= 1000
    assert [x for x, _ in pts] == sorted(x for x, _ in pts)
    (frame, _), = page.find("rect", **{"class": "frame"})
    height = float(frame["height"])
    ys = [y for _, y in pts]
    # Both spikes survive: the line spans the data's whole range (which is padded by 5% on each side).
    assert max(ys) - min(ys) > 0.9 * height / 1.1 * 0.99
    assert "1000" in page.all_text() and "-500" in page.all_text()  # exact min and max in the table
    assert "downsampled to 1000 points" in page.all_text()

    xs, ys = report._downsample(list(range(n)), values, 1000)
    assert 1000.0 in ys and -500.0 in ys and xs[0] == 0 and xs[-1] == n - 1 and len(xs) <= 1000
    assert xs == sorted(xs)


def test_axis_ticks_are_round_numbers():
    def labels(lo, hi, integer=False):
        ticks, step = report._nice_ticks(lo, hi, 5, integer)
        return [report._fmt_tick(t, step) for t in ticks]
    assert labels(0, 1) == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    assert labels(0, 999, True) == ["0", "200", "400", "600", "800"]
    assert labels(0, 1e6, True) == ["0", "200k", "400k", "600k", "800k", "1M"]
    assert labels(-1, 1, True) == ["-1", "0", "1"]  # whole steps only
    assert labels(1e-7, 3e-7) == ["1e-7", "1.5e-7", "2e-7", "2.5e-7", "3e-7"]
    assert labels(0.9, 1.01) == ["0.9", "0.925", "0.95", "0.975", "1"]


def test_bad_max_points_is_a_spec_error():
    with pytest.raises(SpecError, match="max_points"):
        report.render([], max_points=1)
    assert "No runs." in report.render([])


# ---------------------------------------------------------------------------------------------- Chromium

def png_rows(data: bytes) -> tuple[int, int, list[Counter]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) with zlib only: the RGB colours
    of each row of pixels, counted."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + length])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (2, 6), header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 255
        elif kind == 2:
            row = bytearray(map(lambda a, b: (a + b) & 255, row, prev))
        elif kind == 3:
            for i in range(stride):
                row[i] = (row[i] + ((row[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a, b = (row[i - bpp], prev[i]) if i >= bpp else (0, prev[i])
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(Counter(bytes(row[j:j + 3]) for j in range(0, stride, bpp)))
        prev = row
    return width, height, rows


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_chromium_renders_the_charts(tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS"):
            pytest.fail(f"{CHROMIUM} is required here (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed")
    runs = sample_runs()
    page_file = tmp_path / "report.html"
    page_file.write_text(report.render(runs), encoding="utf-8")
    url = page_file.as_uri()

    dom = chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = Page(dom.stdout)
    lines = Counter((a["data-run"], fig) for a, fig in rendered.find("polyline"))
    expected = {(r["id"], "metric-1") for r in runs} | {(runs[0]["id"], "metric-2"), (runs[2]["id"], "metric-2")}
    assert set(lines) == expected and set(lines.values()) == {1}
    assert [fig for _, fig in rendered.find("circle")].count("metric-3") == 3

    shot = tmp_path / "report.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    if os.environ.get("TFLAUNCH_TEST_REPORT_PNG"):  # keep the screenshot to look at
        shutil.copyfile(shot, os.environ["TFLAUNCH_TEST_REPORT_PNG"])
    width, height, rows = png_rows(shot.read_bytes())
    assert (width, height) == (1200, 2000)
    colours = sum(rows, Counter())
    assert len(colours) > 50, len(colours)  # text, grid, antialiased lines: far from a blank page
    # Each run's colour is drawn over many rows of the page: its lines climb and fall across the charts (the
    # legend swatches alone cover a few rows each).
    for colour in report.PALETTE[:len(runs)]:
        target = bytes.fromhex(colour[1:])
        near = {px for px in colours if sum(abs(a - b) for a, b in zip(px, target)) <= 30}
        line_rows = sum(1 for row in rows if not near.isdisjoint(row))
        assert line_rows > 80, (colour, line_rows)
