"""``tflaunch gc``: what no run uses is removed and reported (the trash's runs count), the grace is respected,
a dry run changes nothing, interrupted writes are cleaned up, old environments and package copies go; and
gc in a loop beside concurrent real runs that reuse the same snapshot objects loses no snapshot."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli

from tflaunch.history import gc as gc_mod
from tflaunch.history import gc_fs, snapshot
from tflaunch.history.runviews import download
from tflaunch.history.store import Store

TRAIN = """
import hashlib, json, os, sys
seen = {}
for dirpath, dirnames, filenames in os.walk("."):
    dirnames[:] = sorted(d for d in dirnames if d not in ("outputs", "logs", "__pycache__"))
    for name in filenames:
        path = os.path.join(dirpath, name)
        seen[os.path.relpath(path, ".")] = hashlib.sha256(open(path, "rb").read()).hexdigest()
os.makedirs("outputs", exist_ok=True)
json.dump({"arg": sys.argv[1:], "files": seen}, open("outputs/result.json", "w"), sort_keys=True)
"""
HOUR = 3600.0


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _project(tmp_path: Path, name: str, **extra: str) -> Path:
    """A source directory: the same train.py and lib/common.py as every other project (shared objects),
    plus files of its own."""
    return _write(tmp_path / name, {"train.py": TRAIN, "lib/common.py": "SHARED = 42\n",
                                    "data.txt": f"data of {name}\n", **extra})


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not path.is_symlink() and rel.parts[0] not in ("outputs", "logs") \
                and "__pycache__" not in rel.parts:
            out[str(rel)] = path.read_bytes()
    return out


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything under it to ``seconds`` ago (links not followed)."""
    when = time.time() - seconds
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in reversed(paths):
        os.utime(p, (when, when), follow_symlinks=False)


def _age_store(home: Path, seconds: float = 2 * HOUR) -> None:
    for sub in ("objects", "trees"):
        if (home / sub).exists():
            _age(home / sub, seconds)


def _gc(home: Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tflaunch", "gc", "--json", *args], env=cli_env(home),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tflaunch", *args], env=cli_env(home), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def _run(home: Path, src: Path, *args: str) -> str:
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "train.py", *args)
    assert result.returncode == 0, result.stderr
    return sorted(p.name for p in (home / "runs").iterdir() if not p.name.startswith("."))[-1]


def _tree_of(home: Path, run_id: str, where: str = "runs") -> str:
    return json.loads((home / where / run_id / "snapshot.json").read_text())["tree"]


def _objects(home: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in (home / "objects").glob("??/*") if not p.name.startswith(".")}


def _tree_objects(home: Path, key: str) -> set[str]:
    listing = json.loads((home / "trees" / f"{key}.json").read_text())
    return {f"{d[:2]}/{d[2:]}{'.x' if x else ''}" for _rel, d, _size, x in listing["files"]}


def _snapshot_intact(home: Path, run_id: str, src_files: dict[str, bytes], tmp: Path) -> None:
    """The run's snapshot, as `runs download RUN snapshot` copies it, is the source; its listing and every
    object it names are in the store."""
    store = Store(home)
    dest = tmp / f"snap-{run_id}"
    download(store.run(run_id), "snapshot", str(dest))
    assert _files(dest) == src_files, run_id
    key = _tree_of(home, run_id)
    assert _tree_objects(home, key) <= _objects(home), run_id


def _expected_result(src_files: dict[str, bytes], arg: str) -> dict:
    return {"arg": [arg], "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in src_files.items()}}


def _one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tflaunch: error: ") and "Traceback" not in result.stderr
    return lines[0]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- what is removed ------------------------------------------------------------------------------------------
def test_unreferenced_objects_and_trees_are_removed_and_reported(tmp_path, home):
    keep_src = _project(tmp_path, "keep")
    gone_src = _project(tmp_path, "gone", **{"big.bin": "x" * 5000})
    keep, gone = _run(home, keep_src), _run(home, gone_src)
    keep_key, gone_key = _tree_of(home, keep), _tree_of(home, gone)
    only_gone = _tree_objects(home, gone_key) - _tree_objects(home, keep_key)
    assert len(only_gone) == 2  # data.txt and big.bin; train.py and lib/common.py are shared
    _cli(home, "runs", "delete", gone)
    _cli(home, "runs", "purge")
    _age_store(home)
    listing_size = (home / "trees" / f"{gone_key}.json").stat().st_size
    report = _gc(home)
    removed = report["removed"]
    assert removed["trees"]["paths"] == [f"trees/{gone_key}"] and removed["trees"]["count"] == 1
    assert removed["trees"]["bytes"] == listing_size  # its files are links to the objects: counted there
    assert sorted(removed["objects"]["paths"]) == sorted(f"objects/{o}" for o in only_gone)
    assert removed["objects"]["bytes"] == 5000 + len("data of gone\n")
    assert report["count"] == 3 and report["bytes"] == removed["objects"]["bytes"] + removed["trees"]["bytes"]
    assert not (home / "trees" / gone_key).exists() and not (home / "trees" / f"{gone_key}.json").exists()
    assert not only_gone & _objects(home)
    assert report["referenced"] == {"runs": 1, "deleted_runs": 0, "trees": 1}
    _snapshot_intact(home, keep, _files(keep_src), tmp_path)
    again = _gc(home, "--grace", "0")
    assert again["count"] == 0
    assert not [p for p in (home / "trees").iterdir() if p.name.startswith((".gc-", ".rm-"))]


def test_trash_entries_keep_their_objects_and_restore_intact(tmp_path, home):
    src = _project(tmp_path, "p")
    run_id = _run(home, src)
    key = _tree_of(home, run_id)
    _cli(home, "runs", "delete", run_id)
    _age_store(home)
    report = _gc(home, "--grace", "0")
    assert report["count"] == 0, report["removed"]
    assert report["referenced"] == {"runs": 0, "deleted_runs": 1, "trees": 1}
    _cli(home, "runs", "restore", run_id)
    assert _tree_of(home, run_id) == key
    _snapshot_intact(home, run_id, _files(src), tmp_path)
    out = tmp_path / "train.py"
    _cli(home, "runs", "download", run_id, "snapshot/train.py", str(out))
    assert out.read_text() == textwrap.dedent(TRAIN)


def test_grace_is_respected_and_a_dry_run_removes_nothing(tmp_path, home):
    run_id = _run(home, _project(tmp_path, "p"))
    key = _tree_of(home, run_id)
    _cli(home, "runs", "delete", run_id)
    _cli(home, "runs", "purge")
    young = _gc(home)  # everything is seconds old: within the default grace (1h)
    assert young["count"] == 0 and young["kept"]["young"] == 1  # the tree (its listing keeps its objects)
    _age_store(home, 600)
    assert _gc(home, "--grace", "1h")["count"] == 0
    assert _gc(home, "--grace", "3600")["count"] == 0
    before = sorted((str(p.relative_to(home)), p.lstat().st_mtime_ns) for p in home.rglob("*"))
    dry = _gc(home, "--grace", "5m", "--dry-run")
    assert dry["dry_run"] is True and dry["removed"]["trees"]["paths"] == [f"trees/{key}"]
    assert dry["removed"]["objects"]["count"] == 3
    assert sorted((str(p.relative_to(home)), p.lstat().st_mtime_ns) for p in home.rglob("*")) == before
    text = subprocess.run([sys.executable, "-m", "tflaunch", "gc", "--grace", "5m", "--dry-run"], env=cli_env(home),
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "would remove" in text.stdout and f"trees/{key}" in text.stdout
    real = _gc(home, "--grace", "5m")
    assert real["dry_run"] is False
    assert {k: v["paths"] for k, v in real["removed"].items()} == {k: v["paths"] for k, v in dry["removed"].items()}
    assert {k: v["bytes"] for k, v in real["removed"].items()} == {k: v["bytes"] for k, v in dry["removed"].items()}
    assert not (home / "trees" / key).exists() and not _objects(home)


def test_json_fields_are_stable(tmp_path, home):
    _run(home, _project(tmp_path, "p"))
    report = _gc(home)
    assert set(report) == {"home", "dry_run", "grace_seconds", "unused_for_seconds", "removed", "count", "bytes",
                           "kept", "referenced"}
    assert report["home"] == str(home) and report["grace_seconds"] == 3600
    assert report["unused_for_seconds"] == 30 * 86400
    assert list(report["removed"]) == ["objects", "trees", "leftovers", "lib", "environments", "caches"]
    assert all(set(v) == {"count", "bytes", "paths"} for v in report["removed"].values())
    assert set(report["kept"]) == {"young", "in_use", "writer_alive"}
    assert set(report["referenced"]) == {"runs", "deleted_runs", "trees"}
    assert _gc(home, "--grace", "90m", "--unused-for", "2w")["unused_for_seconds"] == 14 * 86400


# -- interrupted writers --------------------------------------------------------------------------------------
def test_leftovers_of_interrupted_writers_are_removed_unless_their_writer_lives(tmp_path, home, monkeypatch):
    _run(home, _project(tmp_path, "p"))
    store = Store(home)
    real_rename = os.rename

    def interrupted(src, dst, *a, **k):  # Ctrl-C just before the staged run is renamed into runs/
        if "/.new-" in str(src) and str(dst).startswith(str(home / "runs")):
            raise KeyboardInterrupt
        return real_rename(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.create_run("default", {"spec": {"entry_script": "t.py"}})
    staged = [p for p in (home / "runs").iterdir() if p.name.startswith(".new-")]
    assert len(staged) == 1
    importing = home / ".import-0123456789ab"
    (importing / "runs" / "x").mkdir(parents=True)
    (importing / "runs" / "x" / "run.json").write_text("{}")
    fresh_import = home / ".import-ba9876543210"
    fresh_import.mkdir()
    tree_build = home / "trees" / f".new-{'a' * 64}-{_dead_pid()}-123"
    tree_build.mkdir()
    mine = home / "objects" / "tmp" / f"{os.getpid()}-1-0.tmp"  # this process lives: its write is kept
    mine.write_bytes(b"partial")
    env_build = home / "envs" / f".build-{'b' * 20}-xyz"
    (env_build / "bin").mkdir(parents=True)
    for path in (staged[0], importing, tree_build, mine, env_build):
        _age(path, 2 * HOUR)
    first = _gc(home)
    leftovers = first["removed"]["leftovers"]["paths"]
    assert sorted(leftovers) == sorted([".import-0123456789ab", f"trees/{tree_build.name}",
                                        f"envs/{env_build.name}"])
    assert first["kept"]["writer_alive"] == 2  # the staged run (its lease: this process) and objects/tmp
    assert staged[0].exists() and mine.exists() and fresh_import.exists()
    lease = json.loads((staged[0] / "lease.json").read_text())
    (staged[0] / "lease.json").write_text(json.dumps({**lease, "pid": _dead_pid()}))
    _age(staged[0], 2 * HOUR)
    second = _gc(home)
    assert second["removed"]["leftovers"]["paths"] == [f"runs/{staged[0].name}"]
    assert not staged[0].exists() and fresh_import.exists()
    assert second["removed"]["leftovers"]["bytes"] > 0
    _age(fresh_import, 60)
    assert _gc(home, "--grace", "30")["removed"]["leftovers"]["paths"] == [fresh_import.name]


# -- environments, package copies, caches -----------------------------------------------------------------------
def _fake_env(home: Path, short: str, last_used_days: float) -> Path:
    env = home / "envs" / short
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("#!/bin/sh\n")
    (env / "env.json").write_text(json.dumps({"key": short + "0" * 44}))
    (env / ".last-used").write_text("")
    _age(env, last_used_days * 86400)
    return env


def test_old_environments_lib_copies_and_caches_go_recent_and_used_ones_stay(tmp_path, home):
    src = _project(tmp_path, "p")
    _run(home, src)
    current_lib = [p for p in (home / "lib").iterdir()][0]
    _age(current_lib, 40 * 86400)
    _run(home, src)  # the run puts it on its PYTHONPATH: marked as used now
    assert time.time() - current_lib.stat().st_mtime < 60
    old_lib = home / "lib" / ("c" * 16)
    (old_lib / "tflaunch").mkdir(parents=True)
    (old_lib / "tflaunch" / "__init__.py").write_text("x = 1\n" * 100)
    _age(old_lib, 40 * 86400)
    old_env = _fake_env(home, "1" * 20, 40)
    recent_env = _fake_env(home, "2" * 20, 1)
    middle_env = _fake_env(home, "3" * 20, 20)
    used_env = _fake_env(home, "4" * 20, 40)
    active = Store(home).create_run("default", {"spec": {"entry_script": "t.py",
                                                         "environment": {"key": "4" * 64}}})  # Preparing, alive
    stat_dir = home / "cache" / "stat"
    gone_cache = stat_dir / "0123456789abcdef01234567.json"
    gone_cache.write_text(json.dumps({"root": str(tmp_path / "no-such-dir"), "entries": {}, "tree": {}}))
    _age(gone_cache, 2 * HOUR)
    kept_caches = sorted(p.name for p in stat_dir.iterdir() if p != gone_cache)
    report = _gc(home)
    assert report["removed"]["lib"]["paths"] == [f"lib/{old_lib.name}"]
    assert report["removed"]["lib"]["bytes"] == len("x = 1\n" * 100)
    assert report["removed"]["environments"]["paths"] == [f"envs/{old_env.name}"]
    assert report["removed"]["environments"]["bytes"] > 0
    assert report["removed"]["caches"]["paths"] == [f"cache/stat/{gone_cache.name}"]
    assert report["kept"]["in_use"] >= 1  # the environment of the run that has not ended
    assert current_lib.exists() and recent_env.exists() and middle_env.exists() and used_env.exists()
    assert not old_env.exists() and not old_lib.exists() and not gone_cache.exists()
    assert sorted(p.name for p in stat_dir.iterdir()) == kept_caches
    shorter = _gc(home, "--unused-for", "10d")
    assert shorter["removed"]["environments"]["paths"] == [f"envs/{middle_env.name}"]
    active.write_status("Completed", ended="2026-01-01T00:00:00.000Z")
    active.drop_lease()
    assert _gc(home, "--unused-for", "10d")["removed"]["environments"]["paths"] == [f"envs/{used_env.name}"]
    assert recent_env.exists()
    assert not [p for p in (home / "envs").iterdir() if p.name.startswith((".gc-", ".rm-"))]


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--grace", "abc"], "--grace: 'abc' is not an age"),
    (["--grace", "-5"], "--grace: must be 0 or more seconds"),
    (["--unused-for", "3x"], "--unused-for: '3x' is not an age"),
    (["--home", "/nonexistent/tflaunch-home"], "/nonexistent/tflaunch-home does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(home, tmp_path, args, fragment):
    result = subprocess.run([sys.executable, "-m", "tflaunch", "gc", *args], env=cli_env(home), capture_output=True,
                            text=True, timeout=60)
    assert fragment in _one_line_error(result)
    assert not home.exists() and not Path("/nonexistent").exists()


def test_a_directory_that_is_not_a_home_is_refused(tmp_path):
    (tmp_path / "stuff" / "objects").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "tflaunch", "gc", "--grace", "0", "--home", str(tmp_path / "stuff")],
                            env=cli_env(tmp_path / "h"), capture_output=True, text=True, timeout=60)
    assert "is not a tflaunch home" in _one_line_error(result)
    assert (tmp_path / "stuff" / "objects").is_dir()


# -- the protocol, step by step ---------------------------------------------------------------------------------
def _stored_run(home: Path, src: Path) -> tuple[str, dict]:
    store = Store(home)
    record = store.create_run("default", {"spec": {"entry_script": "train.py"}})
    manifest = snapshot.store(snapshot.scan(str(src), "train.py", home=str(home)), str(home), record.dir)
    record.write_status("Completed", ended="2026-01-01T00:00:00.000Z")
    record.drop_lease()
    return record.id, manifest


def test_a_tree_taken_after_it_was_checked_is_built_again_after_the_manifest(tmp_path, home, monkeypatch):
    src = _project(tmp_path, "p")
    first, manifest = _stored_run(home, src)
    key = manifest["tree"]
    import shutil
    shutil.rmtree(home / "runs" / first)  # the tree and its objects are no run's now
    real_write = snapshot.fsio.atomic_write_json

    def gc_strikes(path, obj, **kw):  # a gc that read the references earlier removes everything meanwhile
        if path.endswith(snapshot.MANIFEST):
            shutil.rmtree(home / "trees" / key)
            (home / "trees" / f"{key}.json").unlink()
            for obj_path in (home / "objects").glob("??/*"):
                obj_path.unlink()
        return real_write(path, obj, **kw)

    monkeypatch.setattr(snapshot.fsio, "atomic_write_json", gc_strikes)
    second, again = _stored_run(home, src)
    monkeypatch.undo()
    assert again["tree"] == key
    _snapshot_intact(home, second, _files(src), tmp_path)


def test_gc_puts_back_what_is_touched_between_its_listing_and_its_claim(tmp_path, home, monkeypatch):
    run_id, manifest = _stored_run(home, _project(tmp_path, "p"))
    import shutil
    shutil.rmtree(home / "runs" / run_id)
    _age_store(home)
    real_claim = gc_fs.claim

    def writer_holds_first(path):  # the writer's touch lands between the gc's listing and its rename
        os.utime(path)
        return real_claim(path)

    monkeypatch.setattr(gc_fs, "claim", writer_holds_first)
    report = gc_mod.collect_garbage(home, grace=0)
    assert report["count"] == 0 and report["kept"]["in_use"] >= 1
    key = manifest["tree"]
    assert (home / "trees" / key).is_dir() and (home / "trees" / f"{key}.json").is_file()
    assert not [p for p in (home / "trees").iterdir() if p.name.startswith((".gc-", ".rm-"))]
    monkeypatch.undo()
    assert gc_mod.collect_garbage(home, grace=0)["removed"]["trees"]["count"] == 0  # touched now: young
    _age_store(home)
    assert gc_mod.collect_garbage(home, grace=0)["removed"]["trees"]["paths"] == [f"trees/{key}"]


def test_a_killed_gc_claim_is_put_back(tmp_path, home):
    run_id, manifest = _stored_run(home, _project(tmp_path, "p"))
    key = manifest["tree"]
    claimed = home / "trees" / f".gc-{key}-{_dead_pid()}-0123abcd"
    os.rename(home / "trees" / key, claimed)
    gc_mod.collect_garbage(home, grace=0)
    assert (home / "trees" / key).is_dir() and not claimed.exists()
    _snapshot_intact(home, run_id, _files(tmp_path / "p"), tmp_path)


# -- concurrency ------------------------------------------------------------------------------------------------
GC_LOOP = """
import json, os, sys
from tflaunch.history import gc
gc.RACY_SECONDS = 0.0  # ext4 has ns timestamps: age protects nothing at all, only the protocol does
home, stop, out = sys.argv[1:4]
totals = {"iterations": 0, "trees": 0, "objects": 0, "in_use": 0}
while not os.path.exists(stop):
    report = gc.collect_garbage(home, grace=0)
    totals["iterations"] += 1
    totals["trees"] += report["removed"]["trees"]["count"]
    totals["objects"] += report["removed"]["objects"]["count"]
    totals["in_use"] += report["kept"]["in_use"]
json.dump(totals, open(out, "w"))
"""


def test_gc_in_a_loop_beside_20_concurrent_runs_loses_no_snapshot(tmp_path, home):
    """gc in a loop (another process; grace 0 and not even the 2 s margin: age protects nothing, only the
    protocol does) beside 20 real runs of four source directories (sharing files; their stat caches make
    each run reuse the stored tree), six at a time: each run is checked as it ends (its snapshot as `runs
    download RUN snapshot` copies it, its outputs) and then deleted and purged, so a project's tree keeps
    losing its last reference while the next run of it adopts it (or its objects, for the project whose
    data changes) and the gc removes it."""
    from tflaunch.history import trash

    env = cli_env(home)
    projects = [_project(tmp_path, f"p{i}") for i in range(4)]
    for src in projects:
        _run(home, src, "warm-up")
    store = Store(home)
    trash.delete_runs(store, trash.select(store, statuses=["Completed"]))
    trash.purge(store)
    stop, out = tmp_path / "stop", tmp_path / "gc.json"
    loop = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(home), str(stop), str(out)], env=env)
    checked, inflight, started = 0, {}, 0
    try:
        while checked < 20:
            while started < 20 and len(inflight) < 6:
                src = projects[started % 4]
                if src is projects[3] and not any(s is src for s, _, _ in inflight.values()):
                    (src / "data.txt").write_text(f"data of p3, run {started}\n")  # a new tree of old objects
                arg = f"run-{started}"
                proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src),
                                         "train.py", arg], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                inflight[proc] = (src, arg, _files(src))
                started += 1
            for proc in [p for p in inflight if p.poll() is not None]:
                src, arg, files = inflight.pop(proc)
                _stdout, stderr = proc.communicate()
                assert proc.returncode == 0, (arg, stderr)
                run_id = stderr.split("tflaunch: run ", 1)[1].split()[0]
                assert json.loads((home / "runs" / run_id / "status.json").read_text())["status"] == "Completed"
                _snapshot_intact(home, run_id, files, tmp_path)
                result = json.loads((home / "runs" / run_id / "outputs" / "result.json").read_text())
                assert result == _expected_result(files, arg), arg
                checked += 1
                trash.delete_runs(store, trash.select(store, [run_id]))
                trash.purge(store)  # the last reference to its tree may be gone now
            time.sleep(0.005)
    finally:
        for proc in inflight:
            proc.kill()
            proc.wait()
        stop.touch()
        assert loop.wait(timeout=60) == 0
    totals = json.loads(out.read_text())
    assert totals["iterations"] >= 3 and totals["trees"] >= 2 and totals["objects"] >= 2, totals  # it did work
    assert not [p for p in (home / "trees").iterdir() if p.name.startswith((".gc-", ".rm-", ".new-"))]
