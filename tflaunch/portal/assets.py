"""The portal's styles and its one script, inlined into every page (no file is ever loaded from elsewhere).

The run page's script follows a run that has not ended: it long-polls the run's state (``/api/runs/ID?
version=V&wait=S`` answers as soon as the run's status, events, output or metrics change, or after S
seconds), appends new output to each log by byte offset (``/api/runs/ID/log?file=F&offset=N``) and redraws
the charts (``/runs/ID/charts``, the report's SVG) when the metrics change; it stops once the run has ended.
Log text goes into the page as text nodes only; the charts fragment is HTML the portal escaped itself.
"""
from __future__ import annotations

__all__ = ["CSS", "RUN_SCRIPT"]

CSS = """
nav.top { display: flex; gap: 16px; align-items: baseline; border-bottom: 1px solid #dde1e8; padding: 4px 0 8px; }
nav.top a { color: #2a5db0; text-decoration: none; font-weight: 500; }
nav.top .home { color: #5b6474; font-size: 12.5px; margin-left: auto; }
a { color: #2a5db0; }
form.filters { display: flex; flex-wrap: wrap; gap: 10px; align-items: end; margin: 10px 0; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; color: #414a5a; gap: 2px; }
form.filters input, form.filters select { font: inherit; padding: 2px 4px; }
.status-preparing, .status-finalizing, .status-recovering { background: #fdf6b2; color: #723b13; }
.status-canceled { background: #e5e7eb; color: #374151; }
.status-damaged { background: #fde2e1; color: #9b1c1c; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; }
dl.facts dt { color: #5b6474; }
dl.facts dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 12.5px; white-space: pre-wrap; word-break: break-all; }
pre.log { background: #0f1420; color: #e6e9ef; padding: 8px 10px; max-height: 420px; overflow: auto; margin: 4px 0 12px;
  font-size: 12px; white-space: pre-wrap; word-break: break-all; border-radius: 4px; }
pre.log.stderr { color: #ffd2cc; }
details > summary { cursor: pointer; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
.live { font-size: 12px; color: #5b6474; margin-left: 8px; }
.live.on::before { content: "\\25cf "; color: #2ca02c; }
.live.off::before { content: "\\25cf "; color: #d62728; }
table.events td, table.files td, table.diff td { font-size: 12.5px; }
table.diff td { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all; }
.error { color: #9b1c1c; }
"""

RUN_SCRIPT = r"""
(function () {
  "use strict";
  var root = document.getElementById("run");
  if (!root) { return; }
  var stateUrl = new URL(root.dataset.stateUrl, location.href);
  var logUrl = new URL(root.dataset.logUrl, location.href);
  var chartsUrl = new URL(root.dataset.chartsUrl, location.href);
  var version = root.dataset.version;
  var events = parseInt(root.dataset.events, 10) || 0;
  var metrics = root.dataset.metrics || "";
  var logs = {};
  document.querySelectorAll("pre.log").forEach(function (pre) {
    logs[pre.dataset.file] = {pre: pre, offset: parseInt(pre.dataset.offset, 10) || 0};
  });
  var live = document.getElementById("live");
  function setLive(text, cls) { if (live) { live.textContent = text; live.className = "live " + cls; } }
  function sleep(ms) { return new Promise(function (done) { setTimeout(done, ms); }); }
  function getJSON(url) {
    return fetch(url, {cache: "no-store", credentials: "omit"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    });
  }
  function text(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = value === null || value === undefined || value === "" ? "-" : String(value); }
  }
  function duration(s) {
    if (typeof s !== "number") { return "-"; }
    if (s < 120) { return s.toFixed(1) + "s"; }
    if (s < 7200) { return (s / 60).toFixed(1) + "m"; }
    return (s / 3600).toFixed(1) + "h";
  }
  function show(state) {
    var run = state.run;
    var badge = document.getElementById("status");
    if (badge) {
      badge.textContent = run.status;
      badge.className = "status status-" + String(run.status).toLowerCase();
    }
    text("started", run.started ? run.started.slice(0, 19).replace("T", " ") : null);
    text("ended", run.ended ? run.ended.slice(0, 19).replace("T", " ") : null);
    text("duration", duration(run.duration_seconds));
    text("exit-code", run.exit_code !== null && run.exit_code !== undefined ? run.exit_code : run.signal);
    text("error", run.error ? (run.error.message || run.error.reason) : null);
    var body = document.getElementById("events-body");
    (state.events || []).forEach(function (e) {
      if (!body) { return; }
      var tr = document.createElement("tr");
      var rest = Object.assign({}, e);
      delete rest.time; delete rest.event;
      [String(e.time || "").slice(0, 23).replace("T", " "), e.event, JSON.stringify(rest)].forEach(function (v) {
        var td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    events = state.event_count;
  }
  function ensureLog(entry) {
    if (logs[entry.file]) { return; }
    var box = document.getElementById("logs");
    var none = document.getElementById("no-logs");
    if (none) { none.remove(); }
    var details = document.createElement("details");
    details.open = true;
    var summary = document.createElement("summary");
    summary.textContent = entry.file;
    var pre = document.createElement("pre");
    pre.className = "log " + entry.kind;
    pre.dataset.file = entry.file;
    details.appendChild(summary);
    details.appendChild(pre);
    box.appendChild(details);
    logs[entry.file] = {pre: pre, offset: 0};
  }
  async function follow(file) {
    var log = logs[file];
    for (var i = 0; i < 64; i++) {
      logUrl.searchParams.set("file", file);
      logUrl.searchParams.set("offset", String(log.offset));
      var chunk = await getJSON(logUrl);
      var pre = log.pre;
      var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      if (chunk.text) { pre.appendChild(document.createTextNode(chunk.text)); }
      if (pre.textContent.length > 2000000) { pre.textContent = pre.textContent.slice(-1000000); }
      if (atEnd) { pre.scrollTop = pre.scrollHeight; }
      log.offset = chunk.next_offset;
      if (!chunk.text || chunk.next_offset >= chunk.size) { return; }
    }
  }
  async function charts() {
    var r = await fetch(chartsUrl, {cache: "no-store", credentials: "omit"});
    if (r.ok) { document.getElementById("charts").innerHTML = await r.text(); }
  }
  async function loop() {
    var polls = 0;
    for (;;) {
      var state;
      stateUrl.searchParams.set("version", version);
      stateUrl.searchParams.set("events", String(events));
      stateUrl.searchParams.set("wait", "20");
      try {
        state = await getJSON(stateUrl);
      } catch (err) {
        setLive("disconnected: " + err.message, "off");
        await sleep(2000);
        continue;
      }
      polls += 1;
      root.dataset.polls = String(polls);
      version = state.version;
      show(state);
      for (var i = 0; i < state.logs.length; i++) {
        var entry = state.logs[i];
        ensureLog(entry);
        if (entry.size > logs[entry.file].offset) {
          try { await follow(entry.file); } catch (err) { setLive("log: " + err.message, "off"); }
        }
      }
      var now = JSON.stringify(state.run.metrics || {});
      if (now !== metrics || state.terminal) {
        metrics = now;
        try { await charts(); } catch (err) { setLive("charts: " + err.message, "off"); }
      }
      if (state.terminal) {
        root.dataset.terminal = "1";
        setLive("ended", "");
        return;
      }
      setLive("live", "on");
    }
  }
  if (root.dataset.terminal !== "1") { setLive("live", "on"); loop(); }
})();
"""
