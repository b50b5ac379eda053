"""The CLI of what runs leave behind: ``runs metrics|diff|report``, ``tensorboard``, ``models ...`` and
``export-onnx`` (the parsers are added to :func:`tflaunch.cli.build_parser`'s by :func:`add_commands`)."""
from __future__ import annotations

import json
import os
import sys

from .. import textfmt
from ..history.compare import comparable, diff, write_report
from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    import argparse
    from typing import Any

__all__ = ["add_commands", "add_runs_commands"]


def _store(args: argparse.Namespace) -> Any:
    from ..history.store import Store
    return Store(getattr(args, "home", None))


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -- runs metrics / diff / report ------------------------------------------------------------------------
def add_runs_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("metrics", parents=[common], help="a run's metrics: count, last, min, max per name")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--name", action="append", metavar="NAME", help="only this metric (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print every point: [{name, kind, count, last, ..., points: {value, step, time, rank}}]")
    p.add_argument("--summary", action="store_true", help="with --json: leave the points out")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("diff", parents=[common], help="what differs between two runs: params, git, environment, "
                                                      "final metrics")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--all", action="store_true", help="also show what is the same")
    p.add_argument("--json", action="store_true", help="print {a, b, differences: [{section, key, a, b}], same}")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("report", parents=[common], help="one self-contained HTML file: metric curves, params")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
    p.add_argument("--title", help="the report's title")
    p.set_defaults(func=cmd_report)


def cmd_metrics(args: argparse.Namespace) -> int:
    from ..history import metrics

    record = _store(args).run(args.run)
    series = metrics.load(record.dir)
    if args.name:
        missing = [n for n in args.name if n not in series]
        if missing:
            known = ", ".join(sorted(series)[:10]) or "none"
            raise SpecError(f"run {record.id} has no metric {missing[0]!r} (it has: {known})")
        series = {n: series[n] for n in args.name}
    summaries = [metrics.summary(s) for s in series.values()]
    if args.json:
        out = []
        for s, one in zip(summaries, series.values()):
            item = {k: metrics.json_safe(v) for k, v in s.items()}
            if not args.summary:
                item["points"] = {"value": metrics.json_safe_column(one.value), "step": one.step,
                                  "time": one.time, "rank": one.rank}
            out.append(item)
        sys.stdout.write(json.dumps({"run": record.id, "metrics": out}, ensure_ascii=False, allow_nan=False) + "\n")
        return 0
    if not summaries:
        sys.stdout.write(f"run {record.id} logged no metrics\n")
        return 0
    rows = [("NAME", "KIND", "COUNT", "LAST", "STEP", "MIN", "MAX", "RANKS")]
    fmt = textfmt.value
    for s in summaries:
        ranks = s["ranks"]
        rank_text = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{len(ranks)} ({ranks[0]}-{ranks[-1]})"
        count = str(s["count"]) + (f" ({s['nonfinite']} non-finite)" if s["nonfinite"] else "")
        rows.append((s["name"], s["kind"], count, fmt(s["last"]), fmt(s["step"]), fmt(s["min"]), fmt(s["max"]),
                     rank_text))
    sys.stdout.write(textfmt.table(rows))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    store = _store(args)
    a, b = store.run(args.run_a), store.run(args.run_b)
    left = comparable(a)
    differences, same = diff(left, comparable(b))
    if args.json:
        _dump({"a": a.id, "b": b.id, "differences": differences, "same": len(same)})
        return 0
    shown = differences + (same if args.all else [])
    order = list(left)
    shown.sort(key=lambda r: order.index(r["section"]))
    sys.stdout.write(f"a: {a.id}\nb: {b.id}\n")
    if not shown:
        sys.stdout.write(f"no differences ({len(same)} values compared)\n")
        return 0
    rows = [("SECTION", "KEY", "A", "B")]
    rows += [(r["section"], r["key"], textfmt.value(r["a"]), textfmt.value(r["b"])) for r in shown]
    sys.stdout.write(textfmt.table(rows))
    if not args.all:
        sys.stdout.write(f"({len(same)} values the same; --all shows them)\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    store = _store(args)
    records = []
    for ref in args.runs:
        record = store.run(ref)
        found = [record]
        if (record.read_status(check_lease=False) or {}).get("kind") == "sweep":  # a sweep: its trials
            from ..sweep.trials import LOST, STARTING, load
            found = [store.run(t["run_id"]) for t in load(record.dir)["trials"] if t["status"] not in (LOST, STARTING)]
        for item in found:
            if all(item.id != r.id for r in records):
                records.append(item)
    sys.stdout.write(write_report(records, args.output, title=args.title) + "\n")
    return 0


# -- tensorboard ------------------------------------------------------------------------------------------
def add_commands(commands: Any, common: argparse.ArgumentParser, key_value: Any, parser_class: type) -> None:
    p = commands.add_parser("tensorboard", parents=[common], help="TensorBoard over the runs' ./logs")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--port", type=int, default=6006, help="port (default 6006; 0: any free port)")
    p.add_argument("--host", default="localhost", help="address to listen on (default localhost)")
    p.add_argument("--print-command", action="store_true", help="print the tensorboard command instead of running it")
    p.add_argument("--tensorboard-arg", action="append", default=[], metavar="ARG",
                   help="an extra tensorboard argument (repeatable; --tensorboard-arg=--reload_interval=5)")
    p.set_defaults(func=cmd_tensorboard)

    models = commands.add_parser("models", parents=[common], help="the model registry: register, list, show, "
                                                                  "download")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", parser_class=parser_class)
    sub.required = True
    m = sub.add_parser("register", parents=[common], help="register a run's file or directory as a model version")
    m.add_argument("run", metavar="RUN")
    m.add_argument("path", metavar="PATH", help="path in the run, e.g. outputs/model")
    m.add_argument("--name", required=True, help="model name (letters, digits, _ - .)")
    m.add_argument("--tag", action="append", type=key_value("KEY"), default=[], metavar="KEY=VALUE")
    m.add_argument("--property", action="append", type=key_value("KEY"), default=[], metavar="KEY=VALUE")
    m.add_argument("--description", default=None)
    m.add_argument("--json", action="store_true", help="print the model version as JSON")
    m.set_defaults(func=cmd_models_register)
    m = sub.add_parser("list", parents=[common], help="registered model versions")
    m.add_argument("--name", help="only this model")
    m.add_argument("--tag", action="append", default=[], metavar="KEY[=VALUE]", help="only versions with this tag")
    m.add_argument("--latest", action="store_true", help="only the latest version of each model")
    m.add_argument("--json", action="store_true", help="print a JSON array of model versions")
    m.set_defaults(func=cmd_models_list)
    m = sub.add_parser("show", parents=[common], help="one model version (default: the latest)")
    m.add_argument("model", metavar="NAME[:VERSION]")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models_show)
    m = sub.add_parser("download", parents=[common], help="copy a model version's files to DEST")
    m.add_argument("model", metavar="NAME[:VERSION]")
    m.add_argument("dest", metavar="DEST", help="directory to copy into")
    m.add_argument("--exist-ok", action="store_true", help="overwrite what is already there")
    m.set_defaults(func=cmd_models_download)

    p = commands.add_parser("export-onnx", parents=[common], help="convert a Keras model / SavedModel to ONNX, "
                                                                  "checked against TensorFlow with onnxruntime")
    p.add_argument("model", metavar="RUN:PATH|PATH", help="a run's model (RUN:outputs/model) or a local path")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--register", metavar="NAME", help="also register the .onnx file as a version of model NAME")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: tf2onnx's)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |TensorFlow - onnxruntime| on random inputs (default 1e-4)")
    p.add_argument("--python", default=None, metavar="PATH",
                   help="interpreter with tensorflow, tf2onnx, onnxruntime (default: this one)")
    p.add_argument("--tag", action="append", type=key_value("KEY"), default=[], metavar="KEY=VALUE",
                   help="with --register: a tag of the model version (repeatable)")
    p.add_argument("--json", action="store_true", help="print the check's result as JSON")
    p.set_defaults(func=cmd_export_onnx)


def _logdirs(store: Any, refs: list[str]) -> list[tuple[str, str]]:
    """(readable name, logs directory) per run: ``<experiment>/<id suffix>``; a running run's live logs."""
    from ..history.store import TERMINAL

    found: list[tuple[str, str]] = []
    for ref in refs:
        record = store.run(ref)
        status = record.read_status() or {}
        live = status.get("status") not in TERMINAL
        path = record.path("work", "logs") if live and os.path.isdir(record.path("work", "logs")) else record.path("logs")
        if not os.path.isdir(path):
            raise SpecError(f"run {record.id} has no logs/ directory (TensorBoard reads the script's ./logs: "
                            "write summaries there, e.g. tf.keras.callbacks.TensorBoard(log_dir='logs'))")
        name = f"{status.get('experiment', 'run')}/{record.id[-8:]}"
        name = name.replace(",", "_").replace(":", "_")
        if any(name == n for n, _ in found):
            continue
        found.append((name, path))
    return found


def tensorboard_command(store: Any, refs: list[str], port: int, host: str, extra: list[str]) -> list[str]:
    """The tensorboard command line for the runs; SpecError when tensorboard is not installed."""
    import importlib.util
    import shutil

    spec_text = ",".join(f"{name}:{path}" for name, path in _logdirs(store, refs))
    if importlib.util.find_spec("tensorboard") is not None:
        base = [sys.executable, "-m", "tensorboard.main"]
    elif shutil.which("tensorboard"):
        base = [shutil.which("tensorboard") or "tensorboard"]
    else:
        raise SpecError("tensorboard is not installed: pip install 'tflaunch[tf]' (or tensorboard) in "
                        f"{sys.executable}'s environment, or put a tensorboard on PATH")
    return [*base, "--logdir_spec", spec_text, "--port", str(port), "--host", host, *extra]


def cmd_tensorboard(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    argv = tensorboard_command(_store(args), args.runs, args.port, args.host, args.tensorboard_arg)
    if args.print_command:
        sys.stdout.write(shlex.join(argv) + "\n")
        return 0
    sys.stderr.write(f"tflaunch: {shlex.join(argv)}\n")
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130


# -- models -----------------------------------------------------------------------------------------------
def _model_line(model: Any) -> tuple[str, ...]:
    tags = ",".join(f"{k}={v}" for k, v in sorted(model.tags.items()))
    return (model.name, str(model.version), textfmt.timestamp(model.created_time), str(model.size), model.run_id or "-", tags or "-")


def cmd_models_register(args: argparse.Namespace) -> int:
    from ..history.models import register_from_run

    record = _store(args).run(args.run)
    model = register_from_run(record, args.name, args.path, tags=dict(args.tag), properties=dict(args.property),
                              description=args.description)
    if args.json:
        _dump(model.to_dict())
    else:
        sys.stdout.write(f"registered {model.name}:{model.version} ({len(model.files)} files) from run {record.id}\n")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from ..history.models import Model

    tags: list[Any] = []
    for item in args.tag:
        key, sep, value = item.partition("=")
        tags.append([key, value] if sep else key)
    models = Model.list(_store(args).home, name=args.name, tags=tags or None, latest=args.latest)
    if args.json:
        _dump([m.to_dict() for m in models])
        return 0
    sys.stdout.write(textfmt.table([("NAME", "VERSION", "CREATED (UTC)", "BYTES", "RUN", "TAGS"),
                                    *[_model_line(m) for m in models]]))
    return 0


def _model(args: argparse.Namespace) -> Any:
    from ..history.models import Model, parse_ref

    name, version = parse_ref(args.model)
    return Model(name, version, home=_store(args).home)


def cmd_models_show(args: argparse.Namespace) -> int:
    model = _model(args)
    data = model.to_dict()
    if args.json:
        _dump(data)
        return 0
    lines = [f"model:       {model.name}:{model.version}",
             f"created:     {textfmt.timestamp(model.created_time)}",
             f"description: {model.description or '-'}",
             f"source run:  {model.run_id or '-'}" + (f" ({model.experiment})" if model.experiment else ""),
             f"tags:        {json.dumps(model.tags, ensure_ascii=False)}",
             f"properties:  {json.dumps(model.properties, ensure_ascii=False)}",
             f"path:        {model.path}",
             f"files:       {len(model.files)} ({model.size} bytes)"]
    lines += [f"  {f['sha256'][:12]}  {f['size']:>12}  {f['path']}" for f in model.files[:50]]
    if len(model.files) > 50:
        lines.append(f"  ... {len(model.files) - 50} more (--json lists them all)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    target = _model(args).download(args.dest, exist_ok=args.exist_ok)
    sys.stdout.write(target + "\n")
    return 0


# -- export-onnx ------------------------------------------------------------------------------------------
def resolve_model_path(store: Any, ref: str) -> tuple[str, Any, str | None]:
    """``RUN:outputs/model`` -> (path in the record, the record, the path in the run); a local path as is."""
    run, sep, inner = ref.partition(":")
    if sep and run and inner and not os.path.exists(ref):
        record = store.run(run)
        path = record.safe_path(inner)
        if not os.path.exists(path):
            raise SpecError(f"run {record.id} has no {inner!r} (see `tflaunch runs files {record.id}`)")
        return path, record, inner
    if not os.path.exists(ref):
        raise SpecError(f"{ref!r}: no such file or directory (give RUN:outputs/model or a local path)")
    return os.path.abspath(ref), None, None


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..onnx import export

    store = _store(args)
    path, record, inner = resolve_model_path(store, args.model)
    if args.register:  # check the name before spending a minute converting
        from ..history.models import validate_model_name
        validate_model_name(args.register)
    result = export(path, args.output, args.opset, tolerance=args.tolerance, python=args.python)
    if args.register:
        from ..history.models import register

        properties = {"format": "onnx", "onnx_max_abs_diff": result["max_abs_diff"],
                      "onnx_tolerance": result["tolerance"], "onnx_opset": result["opset"],
                      "onnx_method": result["method"], "tensorflow": result.get("tensorflow"),
                      "tf2onnx": result.get("tf2onnx"), "onnxruntime": result.get("onnxruntime"),
                      "source_model": f"{record.id}:{inner}" if record is not None else path}
        source_run = {"id": record.id, "experiment": (record.read_status() or {}).get("experiment"),
                      "path": inner} if record is not None else None
        model = register(store.home, args.register, result["output"], tags=dict(args.tag),
                         properties={k: v for k, v in properties.items() if v is not None},
                         description=f"ONNX export of {properties['source_model']}", source_run=source_run)
        result["registered"] = {"name": model.name, "version": model.version}
    if args.json:
        _dump(result)
    else:
        sys.stdout.write(f"wrote {result['output']} (opset {result['opset']}, {result['method']}); "
                         f"max |TensorFlow - onnxruntime| = {result['max_abs_diff']:.3g} on random inputs "
                         f"(tolerance {result['tolerance']:g})\n")
        if args.register:
            sys.stdout.write(f"registered {result['registered']['name']}:{result['registered']['version']}\n")
    return 0
