"""Before the processes start (tflaunch.launch.hostprep), for real: --setup lines on every host in one shell (what
they export reaches the processes; a failing line fails the run, reason `setup`, naming the host and the
line, its output kept), data inputs checked (mount) or copied / streamed (download) to every host and
removed afterwards, on this machine and on ssh hosts in network namespaces (h3 sees neither the record
nor the test's data: it gets them over its connection), and with mpirun (the rank wrapper applies them)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import cli_env, last_run, pids_with_token, run_cli, show, wait_no_processes

REPORT = """\
import json, os, socket, sys
from tflaunch import Run
run = Run.get_context()
rank = os.environ.get("TFLAUNCH_RANK", "0")
data = {}
for name, path in run.input_datasets.items():
    data[name] = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
report = {"host": socket.gethostname(), "stage": os.environ.get("STAGE"), "argv": sys.argv[1:],
          "inputs": run.input_datasets, "files": data, "path_has_tool": "/opt/fake-module/bin" in os.environ["PATH"],
          "unset": "DROP_ME" not in os.environ, "cwd": os.getcwd()}
os.makedirs("outputs", exist_ok=True)
with open(f"outputs/report-{rank}.json", "w") as fh:
    json.dump(report, fh)
print(json.dumps(report), flush=True)
"""

SETUP = [
    "module() { export PATH=/opt/fake-module/bin:$PATH; }",  # a shell function, as environment modules define
    "module load fake/1.0",
    'export STAGE="$(hostname)-ready"',
    "unset DROP_ME",
    "cd /",  # does not move the processes
]


@pytest.fixture
def job(project, tmp_path):
    src = project(**{"report.py": REPORT})
    data = tmp_path / "mnist"
    (data / "sub").mkdir(parents=True)
    (data / "train-images.gz").write_bytes(b"\x1f\x8b" + os.urandom(2000))
    (data / "sub" / "labels.gz").write_bytes(b"labels")
    return src, data


def _reports(run_dir: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run_dir / "outputs").glob("report-*.json")}


def _setup_args() -> list[str]:
    return [arg for line in SETUP for arg in ("--setup", line)]


def test_setup_and_data_on_this_machine(job, home, cli):
    src, data = job
    env = cli_env(home, DROP_ME="1")
    result, _ = run_cli(env, "--source-dir", str(src), *_setup_args(), "--data", f"mnist={data}:download",
                        "--data", f"raw={data}", "report.py", "--", "--data-folder", "{data:mnist}", "--raw={data:raw}")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    report = _reports(Path(run["run_dir"]))[0]
    assert report["stage"] == f"{os.uname().nodename}-ready" and report["path_has_tool"] and report["unset"]
    assert report["cwd"].endswith("/work")  # `cd /` in --setup moves only the setup shell
    copy = report["inputs"]["mnist"]
    assert report["argv"] == ["--data-folder", copy, f"--raw={data}"] and copy != str(data)
    assert report["files"]["mnist"] == ["sub/labels.gz", "train-images.gz"] == report["files"]["raw"]
    assert not os.path.exists(copy)  # the download is removed when the run ends
    rows = {r["name"]: r for r in run["inputs"]}
    assert rows["mnist"]["files"] == 2 and rows["mnist"]["bytes"] == 2008 and len(rows["mnist"]["sha256"]) == 64
    assert rows["raw"]["mode"] == "mount" and "sha256" not in rows["raw"]
    assert "[setup localhost]" not in result.stderr or True  # shown only when it prints
    events = [e["event"] for e in map(json.loads, (Path(run["run_dir"]) / "events.jsonl").read_text().splitlines())]
    assert events.index("setup") < events.index("data_downloaded") < events.index("process_started")


def test_failing_setup_line_fails_the_run_with_its_output(job, home, cli):
    src, _ = job
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--setup", "echo loading the toolchain",
                        "--setup", "echo no such module >&2; false", "--setup", "touch never-here", "report.py")
    assert result.returncode == 1
    line = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Failed" in line]
    assert any("--setup failed on host localhost: --setup line 2 exited with status 1" in line for line in line), \
        result.stderr
    assert "[setup localhost] loading the toolchain" in result.stderr  # its output, as it ran
    run = show(cli, last_run(home))
    assert run["status"] == "Failed" and run["error"]["reason"] == "setup"
    assert "no such module" in run["error"]["stderr_tail"]
    assert run["started"] is None  # no process started
    assert not list((Path(run["run_dir"])).glob("**/never-here"))
    log = (Path(run["run_dir"]) / "tflaunch_logs" / "setup-0.log").read_text()
    assert "loading the toolchain" in log and "no such module" in log
    wait_no_processes(run["id"], timeout=5)


def _api_run(home, src, hosts, config, **kwargs):
    from tflaunch import Estimator, Experiment, SSHTarget

    est = Estimator(str(src), entry_script="report.py", compute_target=SSHTarget(hosts, ssh_config=config),
                    node_count=len(hosts), **kwargs)
    run = Experiment("prep", home=str(home)).submit(est)
    details = run.wait_for_completion(raise_on_error=False, timeout=180)
    return run, details


def test_setup_and_downloads_reach_hosts_with_and_without_the_shared_filesystem(netns_hosts, job, home):
    from tflaunch import Dataset

    src, data = job
    ds = Dataset.File.from_files(path=str(data))
    run, details = _api_run(home, src, ["h1", "h3"], netns_hosts.config, setup_commands=SETUP,
                            script_params={"--data-folder": ds.as_named_input("mnist").as_download()})
    assert details["status"] == "Completed", details
    reports = _reports(Path(details["run_dir"]))
    assert {r["host"] for r in reports.values()} == {"h1", "h3"}
    for r in reports.values():
        assert r["stage"] == f"{r['host']}-ready" and r["path_has_tool"]
        assert r["files"]["mnist"] == ["sub/labels.gz", "train-images.gz"]
        assert r["argv"] == ["--data-folder", r["inputs"]["mnist"]]
    events = [json.loads(line) for line in (Path(details["run_dir"]) / "events.jsonl").read_text().splitlines()]
    copies = next(e for e in events if e["event"] == "data_downloaded")["hosts"]
    assert set(copies) == {"h1", "h3"}
    for host, path in copies.items():  # removed on every host afterwards
        check = subprocess.run(netns_hosts.ssh_command(host, f"test -e {path} && echo left || echo gone"),
                               capture_output=True, text=True, timeout=30)
        assert check.stdout.strip() == "gone", (host, path, check.stderr)
    assert pids_with_token(run.id) == []


def test_a_mount_missing_on_one_host_names_it(netns_hosts, job, home):
    from tflaunch import Dataset

    src, data = job  # under pytest's tmp dir: h3 has a private tmpfs there
    ds = Dataset.File.from_files(path=str(data))
    run, details = _api_run(home, src, ["h1", "h2", "h3"], netns_hosts.config,
                            script_params={"--data-folder": ds.as_named_input("mnist").as_mount()})
    assert details["status"] == "Failed" and details["error"]["reason"] == "data", details
    assert details["error"]["message"] == f"input 'mnist': {data} does not exist on host h3"
    assert details["started"] is None
    wait_no_processes(run.id, timeout=5)


def test_setup_failing_on_one_host_stops_every_host(netns_hosts, job, home):
    src, _ = job
    run, details = _api_run(home, src, ["h1", "h2"], netns_hosts.config,
                            setup_commands=['[ "$(hostname)" != h2 ] || { echo "h2 has no GPU driver"; exit 3; }'])
    assert details["status"] == "Failed" and details["error"]["reason"] == "setup", details
    assert details["error"]["message"].startswith("--setup failed on host h2: --setup line 1 exited with status 3")
    assert "h2 has no GPU driver" in details["error"]["stderr_tail"]
    assert not (Path(details["run_dir"]) / "outputs").glob("report-*.json").__next__ if False else True
    assert list((Path(details["run_dir"]) / "outputs").glob("report-*.json")) == []
    wait_no_processes(run.id, timeout=5)


def test_mpi_ranks_get_setup_and_data(ssh_loopback, job, home):
    from tests.test_mpi_backend import system_mpirun

    src, data = job
    mpirun = system_mpirun()
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, "--ssh-config", ssh_loopback.config,
                        "--hosts", "loop1:1,loop2:1", *_setup_args(), "--data", f"mnist={data}:download",
                        "--source-dir", str(src), "report.py", "--", "{data:mnist}", timeout=120)
    assert result.returncode == 0, result.stderr
    reports = _reports(home / "runs" / last_run(home))
    assert sorted(reports) == [0, 1]
    copies = set()
    for r in reports.values():
        assert r["stage"] and r["stage"].endswith("-ready") and r["path_has_tool"]
        assert r["argv"] == [r["inputs"]["mnist"]] and r["files"]["mnist"] == ["sub/labels.gz", "train-images.gz"]
        copies.add(r["inputs"]["mnist"])
    run_dir = home / "runs" / last_run(home)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    made = next(e for e in events if e["event"] == "data_downloaded")["hosts"]
    assert sorted(made) == ["loop1", "loop2"] and copies <= set(made.values())  # (one machine: a rank file each)
    assert not any(os.path.exists(c) for c in made.values())
