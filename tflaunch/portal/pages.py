"""The portal's HTML pages: the runs list, a run, two runs compared, the models, an error.

Every value that comes from a record is escaped (:func:`esc`); every page carries its styles and script
inline, under a Content-Security-Policy that allows no other origin and only this response's script
(:func:`page`). Links carry the portal's token when it has one (:class:`Links`).
"""
from __future__ import annotations

import json
from urllib.parse import quote, urlencode

from .. import textfmt
from .._version import __version__
from ..history.layout import CANCELED, COMPLETED, FAILED, FINALIZING, PREPARING, QUEUED, RECOVERING, RUNNING
from ..history.report import esc
from .assets import CSS, RUN_SCRIPT

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["Links", "esc", "page", "runs_page", "run_page", "compare_page", "models_page", "error_page",
           "STATUSES"]

STATUSES = (PREPARING, QUEUED, RUNNING, RECOVERING, FINALIZING, COMPLETED, FAILED, CANCELED)


class Links:
    """Builds the portal's own URLs (path + query), adding ``token`` when the portal has one."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def url(self, path: str, params: Any = ()) -> str:
        items = [(k, v) for k, v in (params.items() if isinstance(params, dict) else params) if v not in (None, "")]
        if self.token:
            items.append(("token", self.token))
        quoted = quote(path, safe="/")
        return quoted + ("?" + urlencode(items) if items else "")

    def run(self, run_id: str) -> str:
        return self.url(f"/runs/{run_id}")

    def file(self, run_id: str, name: str, download: bool = False) -> str:
        return self.url(f"/runs/{run_id}/files/{name}", {"download": "1"} if download else ())


def page(links: Links, title: str, body: str, *, nonce: str | None = None, script: str | None = None) -> str:
    """A whole page: ``body`` under the top navigation, with the styles and (with ``nonce``) ``script`` inline."""
    from ..history.report import CSS as REPORT_CSS

    script_src = f"'nonce-{nonce}'" if nonce and script else "'none'"
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; script-src {script_src}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(csp)}\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        "<meta name=\"referrer\" content=\"no-referrer\">\n",
        f"<title>{esc(title)} \u00b7 tflaunch</title>\n<style>{REPORT_CSS}{CSS}</style>\n</head>\n<body>\n",
        f"<nav class=\"top\"><a id=\"nav-runs\" href=\"{esc(links.url('/'))}\">Runs</a>"
        f"<a id=\"nav-compare\" href=\"{esc(links.url('/compare'))}\">Compare</a>"
        f"<a id=\"nav-models\" href=\"{esc(links.url('/models'))}\">Models</a>"
        f"<span class=\"home\">tflaunch {esc(__version__)}</span></nav>\n",
        body,
        f"<script nonce=\"{esc(nonce)}\">{script}</script>\n" if nonce and script else "",
        "</body>\n</html>\n",
    ])


def _badge(status: Any) -> str:
    text = str(status or "-")
    return f"<span class=\"status status-{esc(text.lower())}\">{esc(text)}</span>"


def _table(head: list[str], rows: list[str], cls: str, body_id: str | None = None) -> str:
    body_attr = f" id=\"{body_id}\"" if body_id else ""
    return (f"<div class=\"scroll\"><table class=\"{cls}\"><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
            + f"</tr></thead><tbody{body_attr}>\n" + "".join(rows) + "</tbody></table></div>\n")


def _select(name: str, label: str, options: list[str], chosen: str | None) -> str:
    opts = "".join(f"<option value=\"{esc(o)}\"{' selected' if o == chosen else ''}>{esc(o or 'any')}</option>"
                   for o in ["", *options])
    return f"<label>{esc(label)}<select name=\"{esc(name)}\" id=\"filter-{esc(name)}\">{opts}</select></label>"


# -- runs list ---------------------------------------------------------------------------------------------
def runs_page(links: Links, runs: list[dict[str, Any]], columns: list[str], filters: dict[str, Any],
              experiments: list[str], home: str) -> str:
    hidden = f"<input type=\"hidden\" name=\"token\" value=\"{esc(links.token)}\">" if links.token else ""
    form = ("<form class=\"filters\" method=\"get\" action=\"/\">" + hidden
            + _select("experiment", "experiment", experiments, filters.get("experiment"))
            + _select("status", "status", list(STATUSES), filters.get("status"))
            + "<label>tag (key or key=value)<input name=\"tag\" id=\"filter-tag\" "
              f"value=\"{esc(filters.get('tag') or '')}\"></label>"
            + f"<label>metric columns (comma-separated)<input name=\"metric\" id=\"filter-metric\" "
              f"value=\"{esc(','.join(filters.get('metric') or []))}\"></label>"
            + "<button type=\"submit\">Filter</button></form>\n")
    rows = []
    for run in runs:
        latest = run.get("metrics") or {}
        tags = run.get("tags") or {}
        link = f"<a class=\"run-link\" href=\"{esc(links.run(run['id']))}\">{esc(run['id'])}</a>"
        cells = [f"<td class=\"mono\">{link}</td>",
                 f"<td>{esc(run.get('experiment') or '-')}</td>", f"<td>{_badge(run.get('status'))}</td>",
                 f"<td>{esc(textfmt.timestamp(run.get('created')))}</td>",
                 f"<td class=\"num\">{esc(textfmt.duration(run.get('duration_seconds')))}</td>",
                 "<td class=\"mono\">" + esc(", ".join(f"{k}={v}" for k, v in tags.items())) + "</td>"]
        cells += [f"<td class=\"num metric\" data-metric=\"{esc(m)}\">{esc(textfmt.value(latest.get(m)))}</td>"
                  for m in columns]
        rows.append(f"<tr class=\"run\" data-run=\"{esc(run['id'])}\">" + "".join(cells) + "</tr>\n")
    table = (_table(["run", "experiment", "status", "created (UTC)", "duration", "tags", *columns], rows, "runs")
             if rows else "<p class=\"empty\" id=\"no-runs\">No runs match.</p>\n")
    body = (f"<header><h1>Runs</h1><p class=\"sub\">{len(runs)} run{'' if len(runs) == 1 else 's'} in "
            f"{esc(home)}</p></header>\n{form}{table}")
    return page(links, "Runs", body)


# -- one run -----------------------------------------------------------------------------------------------
def _facts(items: list[tuple[str, str, str | None]]) -> str:
    out = ["<dl class=\"facts\">"]
    for label, value, ident in items:
        attr = f" id=\"{ident}\"" if ident else ""
        out.append(f"<dt>{esc(label)}</dt><dd{attr}>{value}</dd>")
    return "".join(out) + "</dl>\n"


def _event_row(event: dict[str, Any]) -> str:
    rest = {k: v for k, v in event.items() if k not in ("time", "event")}
    return (f"<tr><td>{esc(str(event.get('time') or '')[:23].replace('T', ' '))}</td><td>{esc(event.get('event'))}</td>"
            f"<td>{esc(json.dumps(rest, ensure_ascii=False, default=str))}</td></tr>\n")


def run_page(links: Links, run: dict[str, Any], state: dict[str, Any], logs: list[dict[str, Any]],
             files: list[dict[str, Any]], charts: str, trials: list[dict[str, Any]], nonce: str) -> str:
    """``run``: its description (``runs show --json``); ``state``: :func:`~tflaunch.portal.data.run_state`;
    ``logs``: each output file's tail (:func:`~tflaunch.portal.data.log_chunk`) with its ``kind``."""
    import shlex

    run_id = run["id"]
    error = run.get("error") or {}
    dash = esc("-")
    code = run.get("exit_code") if run.get("exit_code") is not None else run.get("signal")
    status_badge = (f"<span id=\"status\" class=\"status status-{esc(str(run.get('status')).lower())}\">"
                    f"{esc(run.get('status'))}</span>")
    facts = [
        ("status", status_badge + "<span id=\"live\" class=\"live\"></span>", None),
        ("experiment", esc(run.get("experiment") or "-"), None),
        ("created", esc(textfmt.timestamp(run.get("created"))), None),
        ("started", esc(textfmt.timestamp(run.get("started"))), "started"),
        ("ended", esc(textfmt.timestamp(run.get("ended"))), "ended"),
        ("duration", esc(textfmt.duration(run.get("duration_seconds"))), "duration"),
        ("exit code", esc(code) if code is not None else dash, "exit-code"),
        ("command", esc(shlex.join([run.get("entry_script") or "?", *map(str, run.get("arguments", []))])), None),
        ("host", esc(f"{run.get('user') or '?'}@{run.get('host') or '?'}"), None),
        ("tags", esc(", ".join(f"{k}={v}" for k, v in (run.get("tags") or {}).items()) or "-"), None),
        ("error", esc(error.get("message") or error.get("reason") or "-"), "error"),
    ]
    if run.get("parent"):
        facts.append(("sweep", f"<a href=\"{esc(links.run(run['parent']))}\">{esc(run['parent'])}</a> trial "
                      f"{esc(run.get('trial'))}", None))
    if run.get("metrics"):
        facts.append(("metrics", esc(", ".join(f"{k}={textfmt.value(v)}" for k, v in run["metrics"].items())), None))
    log_parts = []
    for chunk in logs:
        log_parts.append(f"<details open><summary>{esc(chunk['file'])}</summary>"
                         f"<pre class=\"log {esc(chunk['kind'])}\" "
                         f"data-file=\"{esc(chunk['file'])}\" data-offset=\"{chunk['next_offset']}\">"
                         f"{esc(chunk['text'])}</pre></details>\n")
    if not log_parts:
        log_parts.append("<p class=\"empty\" id=\"no-logs\">No output yet.</p>\n")
    file_rows = [f"<tr><td class=\"mono\"><a class=\"file-link\" href=\"{esc(links.file(run_id, f['name']))}\">"
                 f"{esc(f['name'])}</a>{' (link)' if f.get('link') else ''}</td><td class=\"num\">{f['size']:,}</td>"
                 f"<td><a href=\"{esc(links.file(run_id, f['name'], True))}\">download</a></td></tr>\n" for f in files]
    trial_rows = [f"<tr><td class=\"mono\"><a href=\"{esc(links.run(t['id']))}\">{esc(t['id'])}</a></td>"
                  f"<td>{esc(t.get('trial'))}</td><td>{_badge(t.get('status'))}</td>"
                  f"<td class=\"mono\">{esc(json.dumps(t.get('hyperparameters') or {}, default=str))}</td></tr>\n"
                  for t in trials]
    api = f"/api/runs/{run_id}"
    attrs = {"state-url": links.url(api), "log-url": links.url(api + "/log"),
             "charts-url": links.url(f"/runs/{run_id}/charts"), "version": state["version"],
             "events": str(state["event_count"]), "terminal": "1" if state["terminal"] else "0",
             "metrics": json.dumps(state["run"].get("metrics") or {}, separators=(",", ":"))}
    data = " ".join(f"data-{k}=\"{esc(v)}\"" for k, v in attrs.items())
    body = [f"<main id=\"run\" data-run=\"{esc(run_id)}\" {data}>\n",
            f"<header><h1>Run <span class=\"mono\">{esc(run_id)}</span></h1>"
            f"<p class=\"sub\"><a href=\"{esc(links.url('/compare', {'a': run_id}))}\">compare with another run</a>"
            f"</p></header>\n", _facts(facts)]
    if trials:
        body += ["<section id=\"trials\"><h2>Trials</h2>\n",
                 _table(["run", "trial", "status", "hyperparameters"], trial_rows, "trials"), "</section>\n"]
    body += ["<section id=\"metrics\"><h2>Metrics</h2><div id=\"charts\">", charts, "</div></section>\n",
             "<section><h2>Logs</h2><div id=\"logs\">", "".join(log_parts), "</div></section>\n",
             "<section id=\"events\"><h2>Events</h2>\n",
             _table(["time (UTC)", "event", "details"], [_event_row(e) for e in state["events"]], "events",
                    "events-body"), "</section>\n",
             "<section id=\"files\"><h2>Files</h2>\n",
             _table(["name", "bytes", ""], file_rows, "files") if file_rows else "<p class=\"empty\">No files.</p>\n",
             "</section>\n</main>\n"]
    return page(links, f"run {run_id}", "".join(body), nonce=nonce, script=RUN_SCRIPT)


# -- compare, models, errors -------------------------------------------------------------------------------
def compare_page(links: Links, a: str | None, b: str | None, result: dict[str, Any] | None, charts: str,
                 run_ids: list[str]) -> str:
    hidden = f"<input type=\"hidden\" name=\"token\" value=\"{esc(links.token)}\">" if links.token else ""
    form = ("<form class=\"filters\" method=\"get\" action=\"/compare\">" + hidden
            + _select("a", "run a", run_ids, a) + _select("b", "run b", run_ids, b)
            + "<button type=\"submit\">Compare</button></form>\n")
    body = ["<header><h1>Compare two runs</h1></header>\n", form]
    if result is not None:
        rows = [f"<tr><td>{esc(r['section'])}</td><td class=\"mono\">{esc(r['key'])}</td>"
                f"<td>{esc(textfmt.value(r['a']))}</td><td>{esc(textfmt.value(r['b']))}</td></tr>\n"
                for r in result["differences"]]
        body.append(f"<p class=\"sub\" id=\"diff-summary\">a: <a href=\"{esc(links.run(result['a']))}\">"
                    f"{esc(result['a'])}</a> \u00b7 b: <a href=\"{esc(links.run(result['b']))}\">{esc(result['b'])}</a>"
                    f" \u00b7 {len(result['differences'])} differences, {result['same']} values the same</p>\n")
        body.append(_table(["section", "key", "a", "b"], rows, "diff") if rows
                    else "<p class=\"empty\">No differences.</p>\n")
        body += ["<section id=\"metrics\"><h2>Metrics</h2>", charts, "</section>\n"]
    return page(links, "compare", "".join(body))


def models_page(links: Links, found: list[dict[str, Any]]) -> str:
    rows = []
    for m in found:
        source = m.get("source_run") or {}
        run_cell = (f"<a href=\"{esc(links.run(source['id']))}\">{esc(source['id'])}</a>"
                    + (f" {esc(source.get('path') or '')}" if source.get("path") else "")) if source.get("id") else "-"
        rows.append(f"<tr class=\"model\" data-model=\"{esc(m.get('name'))}:{esc(m.get('version'))}\">"
                    f"<td>{esc(m.get('name'))}</td><td class=\"num\">{esc(m.get('version'))}</td>"
                    f"<td>{esc(textfmt.timestamp(m.get('created')))}</td><td>{esc(m.get('basename') or '-')}</td>"
                    f"<td class=\"num\">{int(m.get('size') or 0):,}</td><td class=\"mono\">{run_cell}</td>"
                    f"<td class=\"mono\">{esc(', '.join(f'{k}={v}' for k, v in (m.get('tags') or {}).items()))}</td>"
                    f"<td>{esc(m.get('description') or '')}</td></tr>\n")
    table = (_table(["name", "version", "created (UTC)", "file", "bytes", "source run", "tags", "description"], rows,
                    "models") if rows else "<p class=\"empty\" id=\"no-models\">No models registered.</p>\n")
    return page(links, "models", f"<header><h1>Models</h1></header>\n{table}")


def error_page(links: Links, status: int, message: str) -> str:
    return page(links, f"error {status}", f"<header><h1>Error {status}</h1></header>\n"
                                          f"<p class=\"error\" id=\"message\">{esc(message)}</p>\n")
