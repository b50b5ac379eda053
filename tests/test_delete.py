"""``runs delete|restore|purge`` and ``Run.delete()``: runs into the home's trash and back, with real
files and real processes; and a record damaged outside tflaunch (a truncated ``status.json``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli_env, show, wait_no_processes, wait_status

from tflaunch import RunActiveError, SpecError
from tflaunch.history.store import COMPLETED, FAILED, Store, now_iso

TRAIN = """
import os
from tflaunch import Run
Run.get_context().log("accuracy", 0.75)
os.makedirs("outputs", exist_ok=True)
open("outputs/model.txt", "w").write("weights")
"""


def _record(store: Store, experiment: str, status: str, age_days: float, **definition) -> str:
    """A finished run written through the store, created ``age_days`` ago."""
    rec = store.create_run(experiment, {"spec": {"entry_script": "t.py"}, **definition})
    created = now_iso(time.time() - age_days * 86400)
    rec.write_status(status, created=created, started=created, ended=created, exit_code=0)
    rec.drop_lease()
    return rec.id


def _ids(cli, *args: str) -> list[str]:
    return [r["id"] for r in json.loads(cli("runs", "list", "--json", *args, check=True).stdout)]


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_size) for p in root.rglob("*"))


def _one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tflaunch: error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_delete_and_restore_a_real_run_keeps_listing_metrics_and_index_right(cli, project, home):
    src = project(**{"train.py": TRAIN})
    cli("run", "--source-dir", str(src), "train.py", check=True)
    cli("run", "--source-dir", str(src), "train.py", check=True)
    keep, gone = _ids(cli)
    before = show(cli, gone)
    listed = cli("runs", "list", "--metric", "accuracy", check=True).stdout
    assert gone in listed and "0.75" in listed
    index = home / "cache" / "runs-index.txt"
    assert gone in index.read_text()
    trees = _tree(home / "trees")

    result = cli("runs", "delete", gone[-8:], check=True)
    assert f"deleted {gone}" in result.stdout
    assert not (home / "runs" / gone).exists() and (home / "trash" / gone / "outputs" / "model.txt").exists()
    note = json.loads((home / "trash" / f"{gone}.json").read_text())
    assert note["status"] == COMPLETED and note["deleted"] and note["by"]
    assert _ids(cli) == [keep] and gone not in cli("runs", "list", "--metric", "accuracy").stdout
    assert gone not in index.read_text() and keep in index.read_text()
    for args in (("show", gone), ("show", gone[-8:], "--json"), ("metrics", gone), ("diff", keep, gone),
                 ("report", gone, "-o", str(home.parent / "r.html"))):
        line = _one_line_error(cli("runs", *args))
        assert "was deleted" in line and f"runs restore {gone}" in line, args
    assert _tree(home / "trees") == trees  # snapshots are shared: delete leaves them

    restored = cli("runs", "restore", gone[-8:], "--json", check=True)
    assert json.loads(restored.stdout) == {"restored": [gone]}
    assert show(cli, gone) == before
    assert _ids(cli) == [keep, gone]
    assert gone in index.read_text() and not (home / "trash" / f"{gone}.json").exists()
    metrics = json.loads(cli("runs", "metrics", gone, "--json", "--summary", check=True).stdout)
    assert metrics["metrics"][0]["last"] == 0.75
    _one_line_error(cli("runs", "restore", gone))  # not deleted: nothing to restore


def test_delete_by_filters_and_dry_run_writes_nothing(cli, home):
    store = Store(home)
    old_a = _record(store, "a", COMPLETED, 40)
    old_failed = _record(store, "a", FAILED, 40)
    new_a = _record(store, "a", COMPLETED, 1)
    old_b = _record(store, "b", COMPLETED, 40)
    cli("runs", "list", check=True)  # the index is built
    tree = _tree(home)
    dry = json.loads(cli("runs", "delete", "--experiment", "a", "--older-than", "30d", "--dry-run", "--json",
                         check=True).stdout)
    assert dry["dry_run"] is True and sorted(r["id"] for r in dry["deleted"]) == sorted([old_a, old_failed])
    text = cli("runs", "delete", "-e", "a", "--older-than", "720h", "--dry-run", check=True).stdout
    assert "would delete" in text and old_a in text and new_a not in text
    assert _tree(home) == tree

    cli("runs", "delete", "--experiment", "a", "--status", "failed", check=True)
    assert sorted(_ids(cli)) == sorted([old_a, new_a, old_b])
    cli("runs", "delete", "--older-than", "43200m", check=True)  # 30 days
    assert _ids(cli) == [new_a]
    assert "no run matches" in cli("runs", "delete", "--experiment", "nothing-here", check=True).stdout
    assert sorted(p.name for p in (home / "trash").iterdir() if p.is_dir()) == sorted([old_a, old_failed, old_b])


def test_purge_older_than_and_all(cli, home):
    store = Store(home)
    first, second, third = (_record(store, "e", COMPLETED, 0) for _ in range(3))
    cli("runs", "delete", first, second, check=True)
    note = home / "trash" / f"{first}.json"
    data = json.loads(note.read_text())
    data["deleted"] = now_iso(time.time() - 31 * 86400)
    note.write_text(json.dumps(data))
    listed = json.loads(cli("runs", "purge", "--dry-run", "--json", check=True).stdout)
    assert [e["id"] for e in listed["purged"]] == [second, first] and (home / "trash" / first).is_dir()
    purged = json.loads(cli("runs", "purge", "--older-than", "30d", "--json", check=True).stdout)
    assert [e["id"] for e in purged["purged"]] == [first]
    assert not (home / "trash" / first).exists() and not note.exists() and (home / "trash" / second).is_dir()
    assert "was deleted" not in _one_line_error(cli("runs", "restore", first))  # purged: gone for good
    assert "1 deleted run(s) removed" in cli("runs", "purge", check=True).stdout
    assert os.listdir(home / "trash") == [] and _ids(cli) == [third]


def test_a_running_run_is_refused_unless_cancel(cli, project, home):
    src = project(**{"sleep.py": "import time\ntime.sleep(120)\n"})
    run_id = cli("run", "--detach", "--source-dir", str(src), "sleep.py", check=True).stdout.strip()
    wait_status(cli, run_id, {"Running"})
    line = _one_line_error(cli("runs", "delete", run_id))
    assert run_id in line and "--cancel" in line and "nothing deleted" in line
    _one_line_error(cli("runs", "delete", "--experiment", "default", "--dry-run"))  # the same refusal
    assert show(cli, run_id)["status"] == "Running"
    result = cli("runs", "delete", run_id, "--cancel", "--json", check=True)
    assert [r["id"] for r in json.loads(result.stdout)["deleted"]] == [run_id]
    wait_no_processes(run_id)
    assert json.loads((home / "trash" / f"{run_id}.json").read_text())["status"] == "Canceled"
    status = json.loads((home / "trash" / run_id / "status.json").read_text())
    assert status["status"] == "Canceled" and not (home / "trash" / run_id / "lease.json").exists()
    assert not (home / "runs" / run_id).exists()  # the launcher did not recreate it


def test_bad_input_is_one_line_exit_2(cli, home):
    store = Store(home)
    run_id = _record(store, "e", COMPLETED, 0)
    assert "no run 'nope'" in _one_line_error(cli("runs", "delete", "nope"))
    assert "not both" in _one_line_error(cli("runs", "delete", run_id, "--experiment", "e"))
    assert "say which runs" in _one_line_error(cli("runs", "delete"))
    assert "duration '3 days'" in _one_line_error(cli("runs", "delete", "--older-than", "3 days"))
    assert "unknown status 'Done'" in _one_line_error(cli("runs", "delete", "--status", "Done"))
    assert "no deleted run" in _one_line_error(cli("runs", "restore", "nope"))
    assert _ids(cli) == [run_id]


def test_two_deletes_of_one_run_one_wins_and_creation_is_untouched(home):
    store = Store(home)
    run_id = _record(store, "e", COMPLETED, 0)
    staging = home / "runs" / f".new-{Store.new_run_id()}"  # a run being created meanwhile
    staging.mkdir()
    (staging / "run.json").write_text("{}")
    procs = [subprocess.Popen([sys.executable, "-m", "tflaunch", "runs", "delete", run_id], env=cli_env(home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "deleted" in loser and len(loser.strip().splitlines()) == 1
    assert (staging / "run.json").exists() and (home / "trash" / run_id).is_dir()

    from tflaunch.history import trash  # the loser of the rename itself: selected, then moved by the winner
    other = _record(store, "e", COMPLETED, 0)
    selection = trash.select(store, [other])
    deleted, gone = trash.delete_runs(store, trash.select(store, [other]))
    assert [r["id"] for r in deleted] == [other] and gone == []
    assert trash.delete_runs(store, selection) == ([], [other])


def test_a_sweep_goes_with_its_trials(cli, home):
    store = Store(home)
    sweep = _record(store, "e", COMPLETED, 0, kind="sweep")
    trials = [_record(store, "e", COMPLETED, 0, parent=sweep, trial=i) for i in range(2)]
    other = _record(store, "e", FAILED, 0)
    line = _one_line_error(cli("runs", "delete", trials[0]))
    assert f"trial 0 of sweep {sweep}" in line
    cli("runs", "delete", "--status", "Completed", "--dry-run", check=True)  # trials come with their sweep
    cli("runs", "delete", sweep, check=True)
    assert _ids(cli) == [other]
    assert json.loads((home / "trash" / f"{trials[1]}.json").read_text())["sweep"] == sweep
    assert "restore the sweep" in _one_line_error(cli("runs", "restore", trials[1]))
    assert json.loads(cli("runs", "restore", sweep, "--json", check=True).stdout)["restored"] == [sweep, *trials]
    assert sorted(_ids(cli)) == sorted([sweep, *trials, other])


def test_run_delete_and_restore_from_python(home):
    from tflaunch import Experiment, Run
    store = Store(home)
    done = _record(store, "e", COMPLETED, 0)
    unfinished = store.create_run("e", {"spec": {}})  # held by this process: it has not ended
    experiment = Experiment("e", home=str(home))
    run = Run(experiment, done)
    assert run.delete() == [done] and not (home / "runs" / done).exists()
    assert run.restore() == [done] and (home / "runs" / done).is_dir()
    try:
        Run(experiment, unfinished.id).delete()
    except RunActiveError as exc:
        assert "Preparing" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("an unfinished run was deleted")
    trial = _record(store, "e", COMPLETED, 0, parent=done, trial=0)
    try:
        Run(experiment, trial).delete()
    except SpecError as exc:
        assert "sweep" in str(exc)
    else:
        raise AssertionError("a trial was deleted alone")


def test_a_truncated_status_json_is_listed_with_a_warning(cli, home):
    store = Store(home)
    good = _record(store, "e", COMPLETED, 0)
    bad = _record(store, "e", COMPLETED, 0)
    status = home / "runs" / bad / "status.json"  # damaged outside tflaunch (a copy cut short)
    status.write_bytes(status.read_bytes()[:25])
    result = cli("runs", "list", check=True)
    assert bad in result.stdout and "Damaged" in result.stdout and good in result.stdout
    assert bad in result.stderr and "status.json" in result.stderr and "Traceback" not in result.stderr
    listed = {r["id"]: r for r in json.loads(cli("runs", "list", "--json").stdout)}
    assert listed[bad]["status"] == "Damaged" and "status.json is not valid JSON" in listed[bad]["damaged"]
    assert listed[bad]["experiment"] == "e" and listed[good]["status"] == COMPLETED
    line = _one_line_error(cli("runs", "show", bad), code=1)
    assert f"run {bad} is damaged: status.json is not valid JSON" in line
    assert json.loads(cli("runs", "delete", bad, "--json", check=True).stdout)["deleted"][0]["status"] == "Damaged"
    assert _ids(cli) == [good]
