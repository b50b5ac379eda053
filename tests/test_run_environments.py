"""Runs with a job environment (pip_packages / --pip, from a wheelhouse made in the test, --no-index), for
real: built once and reused, four concurrent runs that need one new environment (one build, all
Completed), a host without the shared filesystem (netns h3) building its own copy from the wheelhouse it is
sent, the record's key and pip freeze in `runs show` / `runs diff`, the preflight that names a host with
another TensorFlow, and bad package input as one line before anything is recorded."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import cli_env, last_run, pids_with_token, run_cli, show
from tests.infra.wheels import make_wheel

USE = """\
import json, os, socket, sys
import tfl_beta, tfl_alpha
from tflaunch import Run
rank = os.environ.get("TFLAUNCH_RANK", "0")
os.makedirs("outputs", exist_ok=True)
json.dump({"host": socket.gethostname(), "python": sys.executable, "beta": tfl_beta.__version__,
           "alpha_from": tfl_alpha.__file__}, open(f"outputs/used-{rank}.json", "w"))
print("using tfl_beta", tfl_beta.__version__, "on", socket.gethostname(), flush=True)
"""


@pytest.fixture
def wheelhouse(tmp_path):
    house = tmp_path / "wheels"
    make_wheel(house, "tfl-alpha", "1.0")
    make_wheel(house, "tfl-beta", "2.0", requires=["tfl-alpha>=1"])
    return house


@pytest.fixture
def src(project):
    return project(**{"use.py": USE})


def _offline(house) -> list[str]:
    return ["--no-index", "--find-links", str(house)]


def test_built_once_then_reused_and_recorded(src, wheelhouse, home, cli):
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--pip", "tfl-beta>=2", *_offline(wheelhouse),
                        "use.py", timeout=120)
    assert result.returncode == 0, result.stderr
    first = show(cli, last_run(home))
    env = first["environment"]
    assert env["built"] is True and sorted(env["freeze"]) == ["tfl-alpha==1.0", "tfl-beta==2.0"]
    stages = [line for line in result.stderr.splitlines() if line.startswith("tflaunch: environment: ")]
    assert len(stages) == 2 and stages[0] == (f"tflaunch: environment: building or reusing {env['key'][:12]} on "
                                             "host localhost (log: tflaunch_logs/environment.log)"), stages
    assert re.fullmatch(rf"tflaunch: environment: {env['key'][:12]} built on 1 of 1 \(\d+\.\d s\)", stages[1]), stages
    used = json.loads((Path(first["run_dir"]) / "outputs" / "used-0.json").read_text())
    assert used["python"] == env["python"] and used["python"].startswith(str(home / "envs"))
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--pip", "tfl-beta>=2", *_offline(wheelhouse),
                        "use.py", timeout=120)
    assert result.returncode == 0, result.stderr
    second = show(cli, last_run(home))
    assert second["environment"]["built"] is False and second["environment"]["key"] == env["key"]
    assert [line for line in result.stderr.splitlines()
            if line.startswith(f"tflaunch: environment: {env['key'][:12]} reused")], result.stderr  # the progress line
    text = cli("runs", "show", second["id"], check=True).stdout
    assert f"environment: {env['key'][:20]} (reused" in text and "tfl-alpha==1.0, tfl-beta==2.0" in text
    # another package set: runs diff shows the environment's key and the packages that differ
    make_wheel(wheelhouse, "tfl-beta", "3.0", requires=["tfl-alpha>=1"])
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--pip", "tfl-beta>=3", *_offline(wheelhouse),
                        "use.py", timeout=120)
    assert result.returncode == 0, result.stderr
    third = show(cli, last_run(home))
    diff = json.loads(cli("runs", "diff", second["id"], third["id"], "--json", check=True).stdout)
    changed = {(d["section"], d["key"]): (d["a"], d["b"]) for d in diff["differences"]}
    assert changed[("packages", "tfl-beta")] == ("2.0", "3.0")
    assert ("environment", "environment.key") in changed
    assert pids_with_token(third["id"]) == []


def test_four_concurrent_runs_need_one_new_environment(src, wheelhouse, home):
    """Four runs submitted at once need one environment nobody has built: one builds it, the others wait
    for it (the builder's lock) and use it; all Completed."""
    from tflaunch import Estimator, Experiment

    make_wheel(wheelhouse, "tfl-big", "1.0", payload_mb=30)  # the build takes long enough to overlap
    exp = Experiment("envs", home=str(home))
    runs = [exp.submit(Estimator(str(src), entry_script="use.py", pip_packages=["tfl-beta", "tfl-big"],
                                 no_index=True, find_links=[str(wheelhouse)])) for _ in range(4)]
    details = [r.wait_for_completion(raise_on_error=False, timeout=300) for r in runs]
    assert [d["status"] for d in details] == ["Completed"] * 4, [d.get("error") for d in details]
    envs = [d["environment"] for d in details]
    assert len({e["key"] for e in envs}) == 1 and len({e["python"] for e in envs}) == 1
    assert sum(e["built"] for e in envs) == 1, envs
    assert len([p for p in (home / "envs").iterdir() if not p.name.startswith(".")]) == 1


def test_a_host_without_the_shared_filesystem_builds_its_own_copy(netns_hosts, src, wheelhouse, home):
    """h1 sees the home (and the wheelhouse); h3 sees neither (its private tmpfs hides pytest's tmp dir):
    it gets the wheelhouse with the job's files and builds the same environment in its node-local scratch."""
    from tflaunch import Estimator, Experiment, SSHTarget

    est = Estimator(str(src), entry_script="use.py", node_count=2, pip_packages=["tfl-beta"], no_index=True,
                    find_links=[str(wheelhouse)], compute_target=SSHTarget(["h1", "h3"], ssh_config=netns_hosts.config))
    run = Experiment("envs", home=str(home)).submit(est)
    details = run.wait_for_completion(raise_on_error=False, timeout=300)
    assert details["status"] == "Completed", details
    record = Path(details["run_dir"])
    hosts = json.loads((record / "environment.json").read_text())["hosts"]
    assert sorted(hosts) == ["h1", "h3"] and hosts["h1"]["key"] == hosts["h3"]["key"]
    assert hosts["h1"]["path"].startswith(str(home / "envs")) and not hosts["h3"]["path"].startswith(str(home))
    assert sorted(hosts["h3"]["freeze"]) == sorted(hosts["h1"]["freeze"]) == ["tfl-alpha==1.0", "tfl-beta==2.0"]
    used = {json.loads(p.read_text())["host"]: json.loads(p.read_text()) for p in (record / "outputs").glob("used-*")}
    assert used["h1"]["python"] == hosts["h1"]["python"] and used["h3"]["python"] == hosts["h3"]["python"]
    assert used["h3"]["beta"] == "2.0"
    assert pids_with_token(run.id) == []


def test_preflight_names_the_host_whose_tensorflow_differs(netns_hosts, src, home, tmp_path):
    from tests.test_doctor import make_env
    from tflaunch import Estimator, Experiment, SSHTarget

    env_dir = tmp_path / "jobenv"
    python = make_env(env_dir, "2.21.0")
    make_env(env_dir, "2.99.0", netns_hosts.ssh_command("h3", "")[:-1])
    target = SSHTarget(["h1", "h2", "h3"], ssh_config=netns_hosts.config)
    est = Estimator(str(src), entry_script="use.py", node_count=3, python=python, compute_target=target)
    run = Experiment("pre", home=str(home)).submit(est)
    details = run.wait_for_completion(raise_on_error=False, timeout=120)
    assert details["status"] == "Failed" and details["error"]["reason"] == "preflight", details
    assert details["error"]["message"] == ("h3: tensorflow 2.99.0, the others (h1, h2) 2.21.0 (install the same "
                                           "TensorFlow everywhere, or --no-preflight to start anyway)")
    assert details["started"] is None and pids_with_token(run.id) == []
    est = Estimator(str(src), entry_script="use.py", node_count=3, python=python, compute_target=target,
                    preflight=False)
    details = Experiment("pre", home=str(home)).submit(est).wait_for_completion(raise_on_error=False, timeout=120)
    assert details["error"]["reason"] == "exit_code"  # it started (the script lacks the test's packages)


@pytest.mark.parametrize("args, fragment", [
    (["--pip", "tfl-nowhere"], "tfl-nowhere"),
    (["--pip", "bad spec !!"], "'bad spec !!' is not a valid requirement"),
    (["--pip", "git+https://example.org/x.git"], "wheel"),
    (["--conda", "scikit-learn"], "conda_packages (--conda): building a conda environment needs conda, mamba or "
                                  "micromamba on PATH"),
])
def test_bad_package_input_is_one_line(src, wheelhouse, home, args, fragment):
    result, _ = run_cli(cli_env(home, PATH="/usr/bin:/bin"), "--source-dir", str(src), *args, *_offline(wheelhouse),
                        "use.py", timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line or "Failed" in line]
    assert errors and fragment in errors[-1], result.stderr
    assert "Traceback" not in result.stderr


def _wait_for_build(home, timeout=60):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        envs = home / "envs"
        if envs.is_dir() and any(p.name.startswith(".build-") for p in envs.iterdir()):
            return
        time.sleep(0.05)
    raise AssertionError("no environment build started")


def test_sigkill_of_the_launcher_mid_build_then_the_next_run_rebuilds(src, wheelhouse, home, cli, cli_popen):
    """kill -9 of `tflaunch run` while its environment is being built: the agent stops the builder, the run
    reads as Failed (launcher_lost), nothing half-built is used, and the next run builds it and completes."""
    import signal
    from conftest import wait_no_processes

    make_wheel(wheelhouse, "tfl-big", "1.0", payload_mb=150)
    args = ["run", "--source-dir", str(src), "--pip", "tfl-beta", "--pip", "tfl-big", *_offline(wheelhouse),
            "--builder", "pip", "use.py"]
    proc = cli_popen(*args)
    _wait_for_build(home)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id = last_run(home)
    run = show(cli, run_id)
    assert run["status"] == "Failed" and run["error"]["reason"] == "launcher_lost", run
    wait_no_processes(run_id, timeout=10)  # the builder was the agent's helper: stopped with it
    assert [p for p in (home / "envs").iterdir() if not p.name.startswith(".")] == []  # nothing complete
    result, _ = run_cli(cli_env(home), *args[1:], timeout=300)
    assert result.returncode == 0, result.stderr
    assert show(cli, last_run(home))["environment"]["built"] is True


def test_cancel_during_the_build_stops_it(src, wheelhouse, home, cli, cli_popen):
    from conftest import wait_no_processes, wait_status

    make_wheel(wheelhouse, "tfl-big", "1.0", payload_mb=150)
    proc = cli_popen("run", "--source-dir", str(src), "--pip", "tfl-big", *_offline(wheelhouse), "--builder", "pip",
                     "use.py")
    _wait_for_build(home)
    run_id = last_run(home)
    cli("runs", "cancel", run_id, check=True)
    run = wait_status(cli, run_id, {"Canceled", "Failed"}, timeout=60)
    assert run["status"] == "Canceled", run
    assert proc.wait(30) == 130
    wait_no_processes(run_id, timeout=10)
    assert [p for p in (home / "envs").iterdir() if not p.name.startswith(".")] == []  # nothing complete
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--pip", "tfl-big", *_offline(wheelhouse), "use.py",
                        timeout=300)  # (use.py fails: no tfl_beta; the environment is built and used)
    assert show(cli, last_run(home))["environment"]["built"] is True
