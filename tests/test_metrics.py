"""Run tracking: ``Run.get_context()`` logging from real runs, the JSON-lines files, the reader and its cache,
``runs metrics|list --metric|diff|show``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env
from tflaunch import Experiment, Run
from tflaunch.history.metrics import MetricsWriter, load, summary
from tflaunch.history.store import Store


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity: what jq or a browser would accept."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _last_run(home) -> str:
    return Store(home).list_runs()[0]["id"]


def test_script_logs_on_every_rank_and_cli_reads_it(project, cli, home):
    src = project(**{"train.py": """
        import math, sys
        from tflaunch import Run
        run = Run.get_context()
        rank = int(__import__("os").environ["TFLAUNCH_RANK"])
        __import__("time").sleep(0.3 * rank)  # rank 1 logs last: the latest value is its
        for i in range(5):
            run.log("accuracy", i / 10 + rank)
        run.log("loss/val", float("nan"))
        run.log("ünï/name", math.inf, step=7)
        run.log_list("lst", [1, 2, 3])
        run.log_row("tbl", a=1, b="x")
        run.tag("stage", "dev")
        run.set_tags({"rank%d" % rank: "yes"})
        run.add_properties({"p": 1})
        run.add_properties({"p": 2})   # a property keeps its first value
        print("context", type(run).__name__, run.id)
    """})
    result = cli("run", "--source-dir", str(src), "--procs-per-node", "2", "train.py")
    assert result.returncode == 0, result.stderr
    run_id = _last_run(home)
    assert f"context Run {run_id}" in result.stdout

    run = Run(Experiment("default", home=home), run_id)
    got = run.get_metrics()
    assert got["accuracy"] == [0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2, 1.3, 1.4]  # rank 0's points, then rank 1's
    assert all(math.isnan(v) for v in got["loss/val"]) and got["ünï/name"] == [math.inf, math.inf]
    assert got["lst"] == [1, 2, 3, 1, 2, 3] and got["tbl"] == {"a": [1, 1], "b": ["x", "x"]}
    assert run.get_tags() == {"stage": "dev", "rank0": "yes", "rank1": "yes"}
    assert run.get_properties() == {"p": 1}

    table = cli("runs", "metrics", run_id, check=True).stdout
    assert "accuracy" in table and "ünï/name" in table and "2 (2 non-finite)" in table
    data = _strict_json(cli("runs", "metrics", run_id, "--json", check=True).stdout)
    by_name = {m["name"]: m for m in data["metrics"]}
    acc = by_name["accuracy"]
    assert (acc["count"], acc["last"], acc["min"], acc["max"], acc["ranks"]) == (10, 1.4, 0.0, 1.4, [0, 1])
    assert acc["points"]["step"] == [0, 1, 2, 3, 4] * 2 and acc["points"]["rank"] == [0] * 5 + [1] * 5
    assert by_name["loss/val"]["points"]["value"] == ["NaN", "NaN"] and by_name["loss/val"]["nonfinite"] == 2
    assert by_name["ünï/name"]["last"] == "Infinity" and by_name["ünï/name"]["step"] == 7
    assert by_name["tbl"]["kind"] == "row" and by_name["lst"]["kind"] == "list"

    shown = _strict_json(cli("runs", "show", run_id, "--json", check=True).stdout)
    assert shown["metrics"]["accuracy"] == 1.4 and shown["metrics"]["loss/val"] == "NaN"
    assert shown["tags"]["stage"] == "dev" and shown["properties"] == {"p": 1}
    listed = _strict_json(cli("runs", "list", "--json", check=True).stdout)
    assert listed[0]["metrics"]["accuracy"] == 1.4
    text = cli("runs", "list", "--metric", "accuracy", "--metric", "nope", check=True).stdout
    assert "ACCURACY" in text.splitlines()[0] and "1.4" in text.splitlines()[1]

    bad = cli("runs", "metrics", run_id, "--name", "missing")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no metric 'missing'" in bad.stderr


def test_eight_ranks_log_ten_thousand_points_each_concurrently(project, cli, home):
    src = project(**{"train.py": """
        from tflaunch import Run
        run = Run.get_context()
        for i in range(10000):
            run.log("loss", i * 0.5)
    """})
    cli("run", "--source-dir", str(src), "--procs-per-node", "8", "train.py", check=True, timeout=300)
    run_dir = Store(home).run(_last_run(home)).dir
    series = load(run_dir, cache=False)["loss"]
    assert len(series) == 80000
    assert sorted(zip(series.rank, series.step)) == [(r, s) for r in range(8) for s in range(10000)]
    lines = sum(open(os.path.join(run_dir, "metrics", n), "rb").read().count(b"\n")
                for n in os.listdir(os.path.join(run_dir, "metrics")) if n.endswith(".jsonl"))
    assert lines == 80000


def test_torn_last_line_and_garbage_are_skipped_and_the_cache_follows_appends(tmp_path):
    run_dir = str(tmp_path)
    writer = MetricsWriter(os.path.join(run_dir, "metrics"), 0)
    for i in range(3):
        writer.log("a/b", i)
    path = os.path.join(run_dir, "metrics", f"rank-0.{os.getpid()}.jsonl")
    with open(path, "ab") as fh:  # a crash in the middle of a line
        fh.write(b'{"name":"a/b","value":9')
    assert load(run_dir)["a/b"].value == [0, 1, 2]
    assert os.path.exists(os.path.join(run_dir, "metrics", ".cache-1.marshal"))
    with open(path, "ab") as fh:  # the line completes (a writer that was still writing)
        fh.write(b',"step":3,"time":1.0,"rank":0}\nnot json at all\n')
    writer.log("a/b", 10)
    assert load(run_dir)["a/b"].value == [0, 1, 2, 9, 10]
    assert load(run_dir, cache=False)["a/b"].value == [0, 1, 2, 9, 10]
    os.truncate(path, 0)  # replaced / shrunk: read again from the start
    writer.log("a/b", 11)
    assert load(run_dir)["a/b"].value == [11]


def test_values_and_names_are_checked(tmp_path):
    writer = MetricsWriter(str(tmp_path / "metrics"), None)
    from tflaunch import SpecError
    with pytest.raises(SpecError, match="metric name"):
        writer.log("", 1)
    with pytest.raises(SpecError, match="a value must be a number"):
        writer.log("x", object())
    with pytest.raises(SpecError, match="step must be an integer"):
        writer.log("x", 1, step="three")
    import numpy as np
    writer = MetricsWriter(str(tmp_path / "metrics"), None)
    writer.log("x", np.float32(0.5))
    writer.log("x", np.int64(3))
    writer.log("x", float("-inf"))
    writer.log("x", "text")
    s = summary(load(str(tmp_path))["x"])
    assert (s["count"], s["min"], s["max"], s["nonfinite"], s["last"], s["ranks"]) == (4, 0.5, 3, 1, "text", [])


def test_offline_run_prints_instead_of_failing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("from tflaunch import Run\nrun = Run.get_context()\nrun.log('acc', 0.5)\n"
                      "run.log_list('l', [1, 2])\nrun.tag('t', 'v')\nprint(run.get_metrics(), run.id[:11])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFLAUNCH_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    assert "Attempted to log scalar metric acc:\n0.5" in out
    assert "{'acc': 0.5, 'l': [1, 2]} OfflineRun_" in out


def test_script_without_tflaunch_installed_imports_it_from_the_home(project, cli, home, tmp_path):
    """The job's Python may not have tflaunch (another venv, the system python): the launcher provides it."""
    src = project(**{"train.py": "from tflaunch import Run\nRun.get_context().log('x', 1)\n"})
    env = cli_env(home)
    del env["PYTHONPATH"]  # the launcher finds tflaunch in its working directory (REPO), the job does not
    bare = subprocess.run(["/usr/bin/python3", "-c", "import tflaunch"], capture_output=True,
                          env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert bare.returncode != 0, "the system python must not have tflaunch for this test"
    result = cli("run", "--source-dir", str(src), "--python", "/usr/bin/python3", "train.py", env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert Run(Experiment("default", home=home), _last_run(home)).get_metrics() == {"x": 1}


def test_diff_shows_params_git_and_metrics(project, cli, home, tmp_path):
    src = project(**{"train.py": """
        import sys
        from tflaunch import Run
        Run.get_context().log("acc", float(sys.argv[2]))
    """})
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "first"], check=True)
    cli("run", "--source-dir", str(src), "train.py", "--lr", "0.1", check=True)
    first = _last_run(home)
    (src / "train.py").write_text((src / "train.py").read_text() + "# changed\n")
    cli("run", "--source-dir", str(src), "--tag", "team=b", "train.py", "--lr", "0.2", check=True)
    second = _last_run(home)
    diff = _strict_json(cli("runs", "diff", first, second, "--json", check=True).stdout)
    rows = {(d["section"], d["key"]): (d["a"], d["b"]) for d in diff["differences"]}
    assert rows[("params", "--lr")] == ("0.1", "0.2")
    assert rows[("params", "tag:team")] == (None, "b")
    assert rows[("git", "dirty")] == (False, True)
    assert rows[("metrics", "acc")] == (0.1, 0.2)
    assert ("environment", "python") not in rows and ("git", "commit") not in rows
    text = cli("runs", "diff", first, second, check=True).stdout
    assert "--lr" in text and "values the same" in text
    patch = Store(home).run(second).path("git.patch")
    assert "+# changed" in open(patch).read()
    shown = cli("runs", "show", second, check=True).stdout
    assert "uncommitted changes in git.patch" in shown and "acc=0.2" in shown

    report = tmp_path / "report.html"
    assert cli("runs", "report", first, second, "-o", str(report), check=True).stdout.strip() == str(report)
    html = report.read_text(encoding="utf-8")
    assert html.count("<polyline") + html.count("<circle") >= 2 and first[-8:] in html and "--lr" in html
    assert "http://" not in html and "https://" not in html
    bad = cli("runs", "report", "nosuchrun", "-o", str(tmp_path / "x.html"))
    assert bad.returncode == 2 and not (tmp_path / "x.html").exists()


def test_tensorboard_command_and_its_errors(project, cli, home, tmp_path):
    src = project(**{"train.py": "import os\nos.makedirs('logs/tb', exist_ok=True)\n"})
    cli("run", "-e", "exp", "--source-dir", str(src), "train.py", check=True)
    run_id = _last_run(home)
    printed = cli("tensorboard", run_id, "--print-command", "--port", "0", check=True).stdout
    assert f"--logdir_spec exp/{run_id[-8:]}:{Store(home).run(run_id).path('logs')} " in printed
    # an interpreter without tensorboard, and none on PATH: one line saying what to install
    env = cli_env(home, PATH="/usr/bin:/bin")
    missing = subprocess.run(["/usr/bin/python3", "-m", "tflaunch", "tensorboard", run_id], env=env, cwd=tmp_path,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "tensorboard is not installed: pip install 'tflaunch[tf]'" in missing.stderr


def test_latest_value_is_the_latest_in_time_across_ranks(tmp_path):
    import time
    first, second = MetricsWriter(str(tmp_path / "metrics"), 0), MetricsWriter(str(tmp_path / "metrics"), 1)
    for i in range(100):
        second.log("loss", 10 + i)
    time.sleep(0.01)
    first.log("loss", 1)  # rank 0 logs last, though its points are read first
    s = summary(load(str(tmp_path))["loss"])
    assert (s["last"], s["rank"], s["count"], s["min"], s["max"]) == (1, 0, 101, 1, 109)
