"""The file-based run store: ids, records, listing cache, lease/launcher-lost, path safety."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tflaunch import PathSafetyError, RunNotFoundError, SpecError, StoreError
from tflaunch.history.store import (COMPLETED, FAILED, PREPARING, RUN_ID_RE, Store, exit_code_for, now_iso,
                                    parse_iso, with_duration)


def _definition():
    return {"spec": {"entry_script": "train.py", "arguments": []}}


def test_run_ids_are_unique_and_time_sortable():
    ids = [Store.new_run_id(1_700_000_000 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == 2000 and all(RUN_ID_RE.match(i) for i in ids)
    assert sorted(ids, key=lambda i: i[:19]) == ids


def test_create_run_is_atomic_and_complete(tmp_path):
    store = Store(tmp_path / "home")
    rec = store.create_run("exp", _definition(), tags={"k": "v"})
    names = set(os.listdir(rec.dir))
    assert {"run.json", "status.json", "events.jsonl", "lease.json", "tflaunch_logs"} <= names
    assert not [n for n in os.listdir(store.runs_dir) if n.startswith(".new-")]
    status = rec.read_status()
    assert status["status"] == PREPARING and status["experiment"] == "exp" and status["tags"] == {"k": "v"}
    assert json.loads((tmp_path / "home" / "experiments" / "exp.json").read_text())["name"] == "exp"


def test_experiment_creation_is_idempotent_under_concurrency(tmp_path):
    store = Store(tmp_path / "home")
    store.ensure()
    errors = []

    def create():
        try:
            store.ensure_experiment("same")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=create) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.experiments() == ["same"]


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 256, ".."])
def test_bad_experiment_names(tmp_path, name):
    with pytest.raises(SpecError, match="experiment name"):
        Store(tmp_path).ensure_experiment(name)


def test_run_lookup(tmp_path):
    store = Store(tmp_path / "home")
    a = store.create_run("e", _definition(), run_id="20261123-100000-000-aaaaaaaa")
    store.create_run("e", _definition(), run_id="20261123-100000-000-aaaabbbb")
    assert store.run(a.id).id == a.id
    assert store.run("aaaaaaaa").id == a.id            # unique suffix
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        store.run("20261123")
    with pytest.raises(RunNotFoundError, match="no run 'zzz'"):
        store.run("zzz")
    for bad in ("../x", "/etc", ".."):
        with pytest.raises(RunNotFoundError):
            store.run(bad)


def test_listing_cache_rebuilds_from_run_directories(tmp_path):
    store = Store(tmp_path / "home")
    recs = [store.create_run("e", _definition()) for _ in range(5)]
    for r in recs[:3]:
        r.write_status(COMPLETED, ended=now_iso(), exit_code=0)
    for r in recs[3:]:
        os.unlink(r.path("lease.json"))  # pretend their launchers are alive elsewhere
        r.write_lease()
    first = store.list_runs()
    assert [r["id"] for r in first] == sorted((r.id for r in recs), reverse=True)
    index = open(store.index_path).read().splitlines()
    assert index[0] == "tflaunch-runs-index 2"
    assert {line.split("\t")[0] for line in index[1:]} == {r.id for r in recs[:3]}  # only finished runs
    as_json = json.loads(store.list_runs_json())
    assert [(r["id"], r["status"]) for r in as_json] == [(r["id"], r["status"]) for r in first]
    assert [r for r in as_json if r["status"] == COMPLETED] == [r for r in first if r["status"] == COMPLETED]
    import shutil
    shutil.rmtree(recs[0].dir)
    open(store.index_path, "w").write("{ torn")
    second = store.list_runs()
    assert {r["id"] for r in second} == {r.id for r in recs[1:]}
    assert store.list_runs(statuses=["completed"]) == [r for r in second if r["status"] == COMPLETED]
    assert store.list_runs(experiment="other") == []


def test_dead_launcher_on_this_machine_means_failed(tmp_path):
    store = Store(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; sys.path.insert(0, sys.argv[1]);"
                             "from tflaunch.history.store import Store; r = Store(sys.argv[2]).create_run('e', {'spec': {}});"
                             "print(r.id, flush=True); import time; time.sleep(60)",
                             os.path.dirname(os.path.dirname(os.path.abspath(__file__))), store.home],
                            stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    rec = store.run(run_id)
    assert rec.launcher_state() == "alive" and rec.read_status()["status"] == PREPARING
    proc.kill()
    proc.wait()
    status = rec.read_status()
    assert status["status"] == FAILED and status["error"]["reason"] == "launcher_lost"
    assert json.loads(open(rec.path("status.json")).read())["status"] == FAILED  # recorded, not just shown
    assert [e["status"] for e in rec.events() if e["event"] == "status"] == [PREPARING, FAILED]


def test_launcher_lost_after_its_last_heartbeat_never_ends_before_it_started(tmp_path):
    # A launcher writes its lease (heartbeat) at creation and goes Running later, between two heartbeats;
    # it dies before the next one: its last heartbeat predates started.
    store = Store(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; sys.path.insert(0, sys.argv[1]);"
                             "from tflaunch.history.store import Store, now_iso;"
                             "r = Store(sys.argv[2]).create_run('e', {'spec': {}});"
                             "time.sleep(0.5); r.write_status('Running', started=now_iso());"
                             "print(r.id, flush=True); time.sleep(60)",
                             os.path.dirname(os.path.dirname(os.path.abspath(__file__))), store.home],
                            stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    rec = store.run(run_id)
    proc.kill()
    proc.wait()
    before = rec.read_status(check_lease=False)
    assert before["status"] == "Running" and rec.lease()["heartbeat"] < parse_iso(before["started"])
    status = rec.read_status()
    assert status["status"] == FAILED and status["error"]["reason"] == "launcher_lost"
    ended = parse_iso(status["ended"])
    assert ended >= parse_iso(status["started"]) and ended >= parse_iso(status["created"]), status
    assert json.loads(open(rec.path("status.json")).read())["ended"] == status["ended"]  # as recorded
    assert with_duration(status)["duration_seconds"] >= 0
    assert store.list_runs()[0]["duration_seconds"] >= 0


def test_lease_of_another_host_expires_by_heartbeat(tmp_path):
    store = Store(tmp_path / "home")
    rec = store.create_run("e", _definition())
    lease = json.loads(open(rec.path("lease.json")).read())
    lease.update(host="elsewhere-" + socket.gethostname(), pid=1, heartbeat=time.time(), timeout=30)
    open(rec.path("lease.json"), "w").write(json.dumps(lease))
    assert rec.launcher_state() == "alive"
    lease["heartbeat"] = time.time() - 31
    open(rec.path("lease.json"), "w").write(json.dumps(lease))
    assert rec.launcher_state() == "dead"


def test_safe_paths(tmp_path):
    store = Store(tmp_path / "home")
    rec = store.create_run("e", _definition())
    os.makedirs(rec.path("outputs"))
    open(rec.path("outputs", "m.bin"), "w").write("m")
    os.symlink("/etc", rec.path("outputs", "escape"))
    os.symlink("m.bin", rec.path("outputs", "inside"))
    assert rec.safe_path("outputs/m.bin") == os.path.realpath(rec.path("outputs", "m.bin"))
    assert rec.safe_path("outputs/inside").endswith("m.bin")
    for bad, why in [("../x", "'..'"), ("/etc/passwd", "relative"), ("outputs/escape/passwd", "symbolic link"),
                     ("outputs/../../x", "'..'"), ("", "relative")]:
        with pytest.raises(PathSafetyError, match=why):
            rec.safe_path(bad)


def test_home_that_is_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="is not writable"):
        Store(blocker / "home").ensure()


@pytest.mark.parametrize("run, code", [
    ({"status": "Completed"}, 0), ({"status": "Canceled"}, 130),
    ({"status": "Failed", "exit_code": 3}, 3), ({"status": "Failed", "signal": "SIGKILL"}, 137),
    ({"status": "Failed", "error": {"reason": "timeout"}, "signal": "SIGTERM"}, 124),
    ({"status": "Failed", "error": {"reason": "launcher_lost"}}, 1),
])
def test_exit_codes(run, code):
    assert exit_code_for(run) == code


def test_duration():
    run = {"status": "Completed", "started": "2026-11-23T10:00:00.000Z", "ended": "2026-11-23T10:00:02.500Z"}
    assert with_duration(run)["duration_seconds"] == 2.5
    backwards = dict(run, ended="2026-11-23T09:59:59.900Z")  # a record written before ended was kept >= started
    assert with_duration(backwards)["duration_seconds"] == 0
