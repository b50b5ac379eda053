"""Snapshots: what is included, limits, content-addressed storage, stat cache, working copy."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tflaunch import SnapshotError
from tflaunch.history import snapshot
from tflaunch.history.snapshot import SnapshotLimits, materialize, scan, store


def _tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def _rels(result) -> set[str]:
    return {f.rel for f in result.files}


@pytest.fixture
def no_racy_window(monkeypatch):
    """Let the stat cache trust files changed just now (normally: only those older than 2 s)."""
    monkeypatch.setattr(snapshot, "RACY_WINDOW_NS", -10**9)


@pytest.fixture
def stored_files(monkeypatch):
    """Names of the files whose contents were read into the object store (a spy, not a mock)."""
    seen: list[str] = []
    real = snapshot._ObjectWriter.add

    def add(self, f):
        seen.append(f.rel)
        return real(self, f)
    monkeypatch.setattr(snapshot._ObjectWriter, "add", add)
    return seen


def test_default_excludes(tmp_path):
    src = _tree(tmp_path / "src", {
        "train.py": "", "pkg/mod.py": "", ".git/HEAD": "", "pkg/__pycache__/mod.pyc": "",
        "outputs/old.bin": "", "logs/old.txt": "", "pkg/outputs/kept.txt": "",
        "venv/pyvenv.cfg": "", "venv/lib/x.py": "", "env/conda-meta/history": "",
        ".ipynb_checkpoints/a": "",
    })
    result = scan(str(src), "train.py")
    assert _rels(result) == {"train.py", "pkg/mod.py", "pkg/outputs/kept.txt"}


def test_home_inside_source_is_excluded(tmp_path):
    src = _tree(tmp_path / "src", {"train.py": "", ".tfl/runs/x": "", ".tfl/store.json": ""})
    assert _rels(scan(str(src), "train.py", home=str(src / ".tfl"))) == {"train.py"}


def test_ignore_file_precedence_per_directory(tmp_path):
    src = _tree(tmp_path / "src", {
        "train.py": "", "a.dat": "", "b.dat": "", "c.dat": "",
        ".tflaunchignore": "a.dat\n", ".amlignore": "b.dat\n", ".gitignore": "c.dat\n",
        "sub/a.dat": "", "sub/b.dat": "", "sub/c.dat": "", "sub/.gitignore": "c.dat\n",
        "aml/b.dat": "", "aml/c.dat": "", "aml/.amlignore": "b.dat\n", "aml/.gitignore": "c.dat\n",
    })
    rels = _rels(scan(str(src), "train.py"))
    assert "a.dat" not in rels and {"b.dat", "c.dat"} <= rels          # .tflaunchignore wins at the root
    assert "sub/a.dat" not in rels and "sub/c.dat" not in rels and "sub/b.dat" in rels
    assert "aml/b.dat" not in rels and "aml/c.dat" in rels            # .amlignore beats .gitignore


def test_excluded_directory_cannot_be_reincluded(tmp_path):
    src = _tree(tmp_path / "src", {"train.py": "", "data/keep.txt": "", ".gitignore": "data/\n!data/keep.txt\n"})
    assert _rels(scan(str(src), "train.py")) == {"train.py", ".gitignore"}


def test_limits_fail_naming_the_biggest_offenders(tmp_path):
    src = _tree(tmp_path / "src", {"train.py": "x", "data/big.bin": b"0" * 3_000_000,
                                   "data/small.bin": b"0" * 10, "model.h5": b"0" * 1_500_000})
    with pytest.raises(SnapshotError) as info:
        scan(str(src), "train.py", limits=SnapshotLimits(max_bytes=1_000_000, max_files=100))
    message = str(info.value)
    assert "\n" not in message
    assert "over the limit" in message and "biggest: data/ (2.9 MB in 2 files), model.h5 (1.4 MB)" in message
    assert "data/big.bin (2.9 MB)" in message and "model.h5 (1.4 MB)" in message
    with pytest.raises(SnapshotError, match=r"in 4 files, over the limit .* / 3 files"):
        scan(str(src), "train.py", limits=SnapshotLimits(max_files=3))


def test_limits_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TFLAUNCH_SNAPSHOT_MAX_FILES", "1")
    src = _tree(tmp_path / "src", {"train.py": "", "b.py": ""})
    with pytest.raises(SnapshotError, match="2 files"):
        scan(str(src), "train.py", limits=SnapshotLimits.from_env())


@pytest.mark.parametrize("entry, fragment", [
    ("missing.py", "entry_script: 'missing.py' not found"),
    ("../outside.py", "is outside source_directory"),
    ("ignored.py", "is excluded from the snapshot"),
    ("sub", "is not a file"),
    ("link_out.py", "outside source_directory"),
])
def test_entry_script_must_be_a_file_in_the_snapshot(tmp_path, entry, fragment):
    (tmp_path / "outside.py").write_text("")
    src = _tree(tmp_path / "src", {"train.py": "", "ignored.py": "", ".gitignore": "ignored.py\n", "sub/x": ""})
    os.symlink(tmp_path / "outside.py", src / "link_out.py")
    with pytest.raises(SnapshotError) as info:
        scan(str(src), entry)
    assert fragment in str(info.value)


def test_missing_source_directory(tmp_path):
    with pytest.raises(SnapshotError, match="source_directory: .* does not exist"):
        scan(str(tmp_path / "nope"), "train.py")


def test_symlinks_are_kept_and_never_followed(tmp_path):
    outside = _tree(tmp_path / "data", {"huge.bin": b"0" * 1000})
    src = _tree(tmp_path / "src", {"train.py": "print(1)", "conf/a.yaml": "a: 1"})
    os.symlink(outside, src / "data")                      # points outside: kept as a link
    os.symlink("conf/a.yaml", src / "rel.yaml")            # inside, relative
    os.symlink(src / "conf" / "a.yaml", src / "abs.yaml")  # inside, absolute: rewritten relative
    result = scan(str(src), "train.py")
    assert _rels(result) == {"train.py", "conf/a.yaml"}
    links = dict(result.symlinks)
    assert links == {"data": str(outside), "rel.yaml": "conf/a.yaml", "abs.yaml": "conf/a.yaml"}
    assert any("points outside the source directory" in n for n in result.notes)
    home, run = tmp_path / "home", tmp_path / "run"
    run.mkdir()
    manifest = store(result, str(home), str(run))
    work = tmp_path / "work"
    materialize(manifest, str(home), str(work))
    assert (work / "abs.yaml").read_text() == "a: 1" and os.readlink(work / "abs.yaml") == "conf/a.yaml"
    assert os.readlink(work / "data") == str(outside)


def test_content_addressed_store_dedupes_and_hard_links(tmp_path, no_racy_window):
    src = _tree(tmp_path / "src", {"train.py": "print('hi')", "copy.py": "print('hi')", "run.sh": "#!/bin/sh\n"})
    os.chmod(src / "run.sh", 0o755)
    home = tmp_path / "home"
    runs = []
    for i in range(3):
        if i == 2:
            (src / "new.txt").write_text("new")
        run = tmp_path / f"run{i}"
        run.mkdir()
        store(scan(str(src), "train.py"), str(home), str(run))
        runs.append(run)
    objects = [p for p in (home / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 3                               # train.py == copy.py; run.sh (executable); new.txt
    assert os.readlink(runs[0] / "snapshot") == os.readlink(runs[1] / "snapshot")   # unchanged: one tree
    assert os.readlink(runs[2] / "snapshot") != os.readlink(runs[0] / "snapshot")
    assert not os.path.isabs(os.readlink(runs[0] / "snapshot"))                     # relative: rsync-able
    a, c = runs[0] / "snapshot" / "train.py", runs[2] / "snapshot" / "train.py"
    assert os.stat(a).st_ino == os.stat(c).st_ino == os.stat(runs[0] / "snapshot" / "copy.py").st_ino
    assert not (runs[0] / "snapshot" / "new.txt").exists() and (runs[2] / "snapshot" / "new.txt").exists()
    assert os.access(runs[1] / "snapshot" / "run.sh", os.X_OK)
    work = tmp_path / "work"
    materialize(__import__("json").loads((runs[0] / "snapshot.json").read_text()), str(home), str(work))
    assert os.stat(work / "train.py").st_ino != os.stat(a).st_ino   # the working copy is private
    (work / "train.py").write_text("changed")
    assert a.read_text() == "print('hi')"
    assert os.access(work / "run.sh", os.X_OK)


def test_unchanged_tree_reads_nothing_and_a_change_is_seen(tmp_path, no_racy_window, stored_files):
    src = _tree(tmp_path / "src", {"train.py": "v1", "data.txt": "d"})
    home = tmp_path / "home"
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
        store(scan(str(src), "train.py"), str(home), str(tmp_path / f"r{i}"))
    assert sorted(stored_files) == ["data.txt", "train.py"]     # the second snapshot read nothing
    time.sleep(0.02)
    (src / "train.py").write_text("v2")                    # same size, new content
    (tmp_path / "r2").mkdir()
    store(scan(str(src), "train.py"), str(home), str(tmp_path / "r2"))
    assert sorted(stored_files) == ["data.txt", "train.py", "train.py"]
    assert (tmp_path / "r2" / "snapshot" / "train.py").read_text() == "v2"
    assert (tmp_path / "r1" / "snapshot" / "train.py").read_text() == "v1"


def test_recently_changed_files_are_read_again(tmp_path, stored_files):
    src = _tree(tmp_path / "src", {"train.py": "v1"})      # just written: inside the racy window
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
        store(scan(str(src), "train.py"), str(tmp_path / "home"), str(tmp_path / f"r{i}"))
    assert stored_files == ["train.py", "train.py"]


def test_many_files_are_stored_by_threads(tmp_path, stored_files):
    src = _tree(tmp_path / "src", {f"d{i % 7}/f{i}.txt": f"content {i % 50}" for i in range(300)})
    (src / "train.py").write_text("")
    run = tmp_path / "run"
    run.mkdir()
    manifest = store(scan(str(src), "train.py"), str(tmp_path / "home"), str(run), threads=4)
    assert len(stored_files) == 301 and manifest["file_count"] == 301
    objects = [p for p in (tmp_path / "home" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 51                              # 50 distinct contents + the empty train.py
    for i in (0, 123, 299):
        assert (run / "snapshot" / f"d{i % 7}" / f"f{i}.txt").read_text() == f"content {i % 50}"
    assert not list((tmp_path / "home" / "objects" / "tmp").iterdir())
