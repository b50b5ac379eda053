"""`runs export` / `runs import` with real runs: the imported runs read exactly as at the source, importing
twice changes nothing, and unsafe, truncated or wrong archives are refused with one line, writing nothing."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, cli_env

TRAIN = """
import os, sys
from tflaunch import Run
run = Run.get_context()
lr = float(sys.argv[sys.argv.index("--lr") + 1])
for epoch in range(5):
    run.log("loss", 1.0 / (epoch + 1) * lr, step=epoch)
    run.log("accuracy", 0.5 + epoch * lr)
run.log_list("sizes", [1, 2, 3])
run.tag("kind", "test")
os.makedirs("outputs/model", exist_ok=True)
open("outputs/model/weights.bin", "wb").write(os.urandom(4096))
open("outputs/model/config.json", "w").write('{"lr": %s}' % lr)
os.symlink("model/config.json", "outputs/config-link")
open("logs/train.log", "w").write("trained\\n")
print("done", lr)
"""


def tflaunch(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tflaunch", *args], cwd=cwd or home.parent, env=cli_env(home),
                          capture_output=True, text=True, errors="replace", timeout=120)


def ok(home: Path, *args: str) -> str:
    result = tflaunch(home, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def listing(root: Path) -> list[tuple]:
    """Every path under root with its type, size, mode, mtime and link target (what 'nothing written' means)."""
    if not root.exists():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            out.append((str(path.relative_to(root)), st.st_mode, st.st_size if not path.is_dir() else 0,
                        st.st_mtime_ns if not path.is_dir() else 0,
                        os.readlink(path) if path.is_symlink() else None))
    return sorted(out)


def tree_bytes(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = ("link", os.readlink(path)) if path.is_symlink() else ("dir",) if path.is_dir() else path.read_bytes()
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A home with two finished runs (one registered as a model) and their archive."""
    base = tmp_path_factory.mktemp("archive")
    home = base / "home"
    proj = base / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "train.py").write_text(textwrap.dedent(TRAIN))
    (proj / "pkg" / "util.py").write_text("X = 1\n")
    (proj / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (proj / "run.sh").chmod(0o755)
    os.symlink("pkg/util.py", proj / "util-link.py")
    ids = []
    for lr in ("0.1", "0.2"):
        out = ok(home, "run", "--source-dir", str(proj), "--tag", f"lr={lr}", "train.py", "--", "--lr", lr)
        assert f"done {lr}" in out
        ids.append(json.loads(ok(home, "runs", "list", "--json", "--limit", "1"))[0]["id"])
    ok(home, "models", "register", ids[0], "outputs/model", "--name", "net", "--tag", "stage=dev")
    archive = base / "runs.tar.gz"
    ok(home, "runs", "export", *ids, "-o", str(archive), "--models")
    return {"base": base, "home": home, "ids": ids, "archive": archive}


def _show(home: Path, run_id: str) -> dict:
    shown = json.loads(ok(home, "runs", "show", run_id, "--json"))
    assert shown.pop("run_dir").startswith(str(home))
    return shown


def test_imported_runs_read_exactly_as_at_the_source(source, tmp_path):
    src, ids = source["home"], source["ids"]
    dst = tmp_path / "other-home"
    out = ok(dst, "runs", "import", str(source["archive"]))
    assert all(f"imported run {i}" in out for i in ids) and "imported model net:1" in out
    assert ok(dst, "runs", "list", "--json") == ok(src, "runs", "list", "--json")
    assert ok(dst, "runs", "list", "--metric", "accuracy") == ok(src, "runs", "list", "--metric", "accuracy")
    for run_id in ids:
        assert _show(dst, run_id) == _show(src, run_id)
        assert ok(dst, "runs", "metrics", run_id, "--json") == ok(src, "runs", "metrics", run_id, "--json")
        assert ok(dst, "runs", "files", run_id, "--json") == ok(src, "runs", "files", run_id, "--json")
        assert ok(dst, "runs", "logs", run_id) == ok(src, "runs", "logs", run_id)
        for home, where in ((src, tmp_path / "a" / run_id), (dst, tmp_path / "b" / run_id)):
            where.parent.mkdir(exist_ok=True)
            ok(home, "runs", "download", run_id, "snapshot", str(where))
            ok(home, "runs", "download", run_id, "outputs", str(where) + "-outputs")
        a, b = tree_bytes(tmp_path / "a" / run_id), tree_bytes(tmp_path / "b" / run_id)
        assert a == b and a["util-link.py"] == ("link", "pkg/util.py") and "run.sh" in a
        assert os.access(dst / "runs" / run_id / "snapshot" / "run.sh", os.X_OK)
        assert tree_bytes(Path(f"{tmp_path / 'a' / run_id}-outputs")) == tree_bytes(Path(f"{tmp_path / 'b' / run_id}-outputs"))
        assert not (dst / "runs" / run_id / "lease.json").exists()
    assert ok(dst, "runs", "diff", *ids) == ok(src, "runs", "diff", *ids)
    assert ok(dst, "runs", "diff", *ids, "--json") == ok(src, "runs", "diff", *ids, "--json")
    ok(src, "runs", "report", *ids, "-o", str(tmp_path / "a.html"))
    ok(dst, "runs", "report", *ids, "-o", str(tmp_path / "b.html"))
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()
    # the model: same metadata, same files, still verifiable; its file shares the imported run's inode
    assert ok(dst, "models", "show", "net", "--json") == ok(src, "models", "show", "net", "--json")
    sys.path.insert(0, str(REPO))
    from tflaunch.history.models import Model
    Model("net", home=str(dst)).verify()
    model_file = dst / "models" / "net" / "1" / "files" / "model" / "weights.bin"
    assert model_file.stat().st_ino == (dst / "runs" / ids[0] / "outputs" / "model" / "weights.bin").stat().st_ino
    assert not [p for p in dst.iterdir() if p.name.startswith(".import-")]


def test_importing_twice_changes_nothing_and_a_conflict_is_refused(source, tmp_path):
    dst = tmp_path / "home2"
    ok(dst, "runs", "import", str(source["archive"]))
    before = listing(dst)
    again = tflaunch(dst, "runs", "import", str(source["archive"]))
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout and "nothing to import" in again.stdout
    assert listing(dst) == before
    status = dst / "runs" / source["ids"][1] / "logs" / "train.log"
    status.chmod(0o644)
    status.write_text("changed\n")
    before = listing(dst)
    conflict = tflaunch(dst, "runs", "import", str(source["archive"]))
    assert conflict.returncode == 2 and conflict.stdout == ""
    assert conflict.stderr.count("\n") == 1 and "already in" in conflict.stderr and "logs/train.log" in conflict.stderr
    assert listing(dst) == before
    (dst / "trash").mkdir()  # a deleted run (runs delete: moved to trash/<id>) is not imported again beside it
    os.rename(dst / "runs" / source["ids"][1], dst / "trash" / source["ids"][1])
    before = listing(dst)
    trashed = tflaunch(dst, "runs", "import", str(source["archive"]))
    assert trashed.returncode == 2 and "trash" in trashed.stderr and trashed.stderr.count("\n") == 1
    assert listing(dst) == before


def test_an_import_into_a_home_sharing_the_snapshot_adds_only_what_is_new(source, tmp_path):
    one = tmp_path / "one.tar"
    ok(source["home"], "runs", "export", source["ids"][0], "-o", str(one))
    dst = tmp_path / "home3"
    first = json.loads(ok(dst, "runs", "import", str(one), "--json"))
    assert first["imported"] == [source["ids"][0]] and first["objects_added"] > 0 and first["trees_added"] == 1
    both = json.loads(ok(dst, "runs", "import", str(source["archive"]), "--json"))
    assert both["imported"] == [source["ids"][1]] and both["present"] == [source["ids"][0]]
    assert both["objects_added"] == 0 and both["trees_added"] == 0  # same source tree: shared, not copied
    manifest = json.loads(ok(source["home"], "runs", "export", source["ids"][0], "-o", str(tmp_path / "x.tar"),
                             "--json"))
    assert manifest["format"] == 1 and manifest["runs"][0]["id"] == source["ids"][0] and manifest["models"] == []
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert tar.getnames()[0] == "tflaunch-archive.json"


def test_a_run_still_being_recorded_is_not_exported(tmp_path):
    sys.path.insert(0, str(REPO))
    from tflaunch.history.store import Store
    home = tmp_path / "home"
    record = Store(str(home)).create_run("default", {"spec": {"entry_script": "train.py"}})  # leased by this test
    result = tflaunch(home, "runs", "export", record.id, "-o", str(tmp_path / "out.tar"))
    assert result.returncode == 2 and "Preparing" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.tar").exists() and not list(tmp_path.glob(".out.tar*"))
    bad_name = tflaunch(home, "runs", "export", record.id, "-o", str(tmp_path / "out.zip"))
    assert bad_name.returncode == 2 and "*.tar" in bad_name.stderr


# -- crafted archives ------------------------------------------------------------------------------------
def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]


def _craft(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], *, fix_counts: bool = True,
           manifest: dict | None = None) -> Path:
    """Write ``members`` (the first being the manifest) to ``path``, the manifest's counts made to match."""
    head, data = members[0]
    meta = manifest if manifest is not None else json.loads(data)
    rest = members[1:]
    if fix_counts and manifest is None:
        meta["members"] = len(rest)
        meta["bytes"] = sum(m.size for m, _ in rest if m.isreg())
    data = json.dumps(meta).encode()
    head = tarfile.TarInfo(head.name)
    head.size = len(data)
    with tarfile.open(path, "w") as tar:
        tar.addfile(head, io.BytesIO(data))
        for info, body in rest:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def _bad_archives(archive: Path, run_id: str, out: Path) -> dict[str, Path]:
    good = _members(archive)
    run = f"runs/{run_id}"
    obj = next(i for i, (m, _) in enumerate(good) if m.name.startswith("objects/"))
    altered = list(good)
    altered[obj] = (altered[obj][0], b"x" * altered[obj][0].size)
    head_data = good[0][1]
    newer = {**json.loads(head_data), "format": 99}
    blob = archive.read_bytes()
    (out / "truncated.tar.gz").write_bytes(blob[: len(blob) // 2])
    plain = _craft(out / "plain.tar", good)
    with tarfile.open(plain) as tar:  # cut in the middle of the biggest member's data
        biggest = max(tar.getmembers(), key=lambda m: m.size)
    (out / "truncated.tar").write_bytes(plain.read_bytes()[: biggest.offset_data + biggest.size // 2])
    # cut exactly after a member: the tar format cannot tell, the manifest's counts do
    cut = _craft(out / "cut.tar", good[:-3], fix_counts=False, manifest=json.loads(head_data))
    not_json = [(tarfile.TarInfo("tflaunch-archive.json"), b"{not json")] + good[1:]
    not_json[0][0].size = len(not_json[0][1])
    return {
        "absolute path": _craft(out / "abs.tar", good + [_info("/tmp/tflaunch-evil", data=b"x")]),
        "dot-dot": _craft(out / "dotdot.tar", good + [_info(f"{run}/../../../evil", data=b"x")]),
        "dot-dot at the start": _craft(out / "dotdot2.tar", good + [_info("../evil", data=b"x")]),
        "symlink to /etc/passwd": _craft(out / "link.tar", good + [_info(f"{run}/outputs/passwd", tarfile.SYMTYPE,
                                                                          linkname="/etc/passwd")]),
        "symlink up and out": _craft(out / "link2.tar", good + [_info(f"{run}/outputs/up", tarfile.SYMTYPE,
                                                                       linkname="../../../..")]),
        "member under a link": _craft(out / "under.tar", good + [
            _info(f"{run}/outputs/here", tarfile.SYMTYPE, linkname="."),
            _info(f"{run}/outputs/here/x", data=b"x")]),
        "hard link out": _craft(out / "hard.tar", good + [_info(f"{run}/outputs/h", tarfile.LNKTYPE,
                                                                 linkname="/etc/passwd")]),
        "a model's hard link out": _craft(out / "hard2.tar", good + [
            _info("models/net/1/files/model/passwd", tarfile.LNKTYPE, linkname="/etc/passwd")]),
        "device node": _craft(out / "dev.tar", good + [_info(f"{run}/outputs/null", tarfile.CHRTYPE)]),
        "fifo": _craft(out / "fifo.tar", good + [_info(f"{run}/outputs/pipe", tarfile.FIFOTYPE)]),
        "a lease": _craft(out / "lease.tar", good + [_info(f"{run}/lease.json", data=b"{}")]),
        "an undeclared run": _craft(out / "undeclared.tar", good + [
            _info("runs/20990101-000000-000-00000000/status.json", data=b"{}")]),
        "truncated gzip": out / "truncated.tar.gz",
        "truncated tar": out / "truncated.tar",
        "cut at a member boundary": cut,
        "an object that is not its hash": _craft(out / "object.tar", altered),
        "no manifest first": _craft(out / "nomanifest.tar", [good[1], good[0]] + good[2:], fix_counts=False,
                                    manifest={"kind": "something else"}),
        "a manifest that is not JSON": _write_raw(out / "notjson.tar", not_json),
        "a newer format": _craft(out / "newer.tar", good, fix_counts=False, manifest=newer),
        "not a tar file": _write_bytes(out / "garbage.tar", b"hello, this is not a tar archive\n" * 100),
    }


def _write_raw(path: Path, members: list) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, body in members:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_unsafe_truncated_and_wrong_archives_are_refused_writing_nothing(source, tmp_path):
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    cases = _bad_archives(source["archive"], source["ids"][0], crafted)
    target = tmp_path / "target"
    ok(target, "runs", "import", str(_craft(tmp_path / "other.tar", _members(source["archive"]))))  # not empty
    before = listing(target)
    missing = tmp_path / "never-created" / "home"
    for what, archive in cases.items():
        for home in (target, missing):
            result = tflaunch(home, "runs", "import", str(archive), cwd=tmp_path)
            assert result.returncode == 2, (what, result.stdout, result.stderr)
            assert result.stderr.startswith("tflaunch: error: ") and result.stderr.count("\n") == 1, (what, result.stderr)
            assert "Traceback" not in result.stderr and result.stdout == "", what
            assert listing(target) == before, what
            assert not missing.parent.exists(), what
    assert not Path("/tmp/tflaunch-evil").exists()
    # the crafted good copy (counts recomputed) imports: the checks refuse what is wrong, not the rewriting
    fresh = tmp_path / "fresh"
    ok(fresh, "runs", "import", str(tmp_path / "other.tar"))
    assert {p.name for p in (fresh / "runs").iterdir()} == set(source["ids"])


def test_a_link_leading_out_of_a_run_is_left_out_with_a_warning(tmp_path):
    home, proj = tmp_path / "home", tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text("import os\nos.makedirs('outputs', exist_ok=True)\n"
                                   "os.symlink('/etc/passwd', 'outputs/outside')\nopen('outputs/x', 'w').write('x')\n")
    ok(home, "run", "--source-dir", str(proj), "train.py")
    run_id = json.loads(ok(home, "runs", "list", "--json"))[0]["id"]
    result = tflaunch(home, "runs", "export", run_id, "-o", str(tmp_path / "r.tar"), "--json")
    assert result.returncode == 0 and "outputs/outside" in result.stderr
    assert json.loads(result.stdout)["skipped"] == [f"runs/{run_id}/outputs/outside"]
    ok(tmp_path / "h2", "runs", "import", str(tmp_path / "r.tar"))
    names = {f["name"] for f in json.loads(ok(tmp_path / "h2", "runs", "files", run_id, "--json"))}
    assert "outputs/x" in names and "outputs/outside" not in names


def test_a_gc_between_the_check_and_the_commit_takes_nothing_the_import_needs(source, tmp_path, monkeypatch):
    """The home has the archive's snapshot objects, but only under a tree no run uses any more (a purged
    run of the same files plus one): a gc while the import is being checked removes that tree, and would
    remove the objects, which the import then links into its new tree. It holds them (hard links in its
    staging directory) and its tree (touched, made again if taken), so the import completes intact."""
    from tflaunch.history import archive_import, gc
    from tflaunch.history.store import Store

    one = tmp_path / "one.tar"
    ok(source["home"], "runs", "export", source["ids"][0], "-o", str(one))
    dst = tmp_path / "home"
    proj = tmp_path / "proj"
    src_snapshot = source["home"] / "runs" / source["ids"][0] / "snapshot"
    subprocess.run(["cp", "-a", str(src_snapshot) + "/.", str(proj)], check=True)
    (proj / "extra.txt").write_text("only in this tree\n")
    ok(dst, "run", "--source-dir", str(proj), "train.py", "--", "--lr", "0.3")
    other = json.loads(ok(dst, "runs", "list", "--json"))[0]["id"]
    ok(dst, "runs", "delete", other)
    ok(dst, "runs", "purge")
    old = os.path.getmtime(dst / "runs") - 7200
    for sub in ("objects", "trees"):
        for dirpath, dirs, names in os.walk(dst / sub):
            for name in names + dirs:
                os.utime(Path(dirpath) / name, (old, old))
    collected = {}
    commit = archive_import._Importer.commit

    def gc_first(self):
        collected.update(gc.collect_garbage(str(dst), grace=0))
        return commit(self)

    monkeypatch.setattr(archive_import._Importer, "commit", gc_first)
    result = archive_import.import_archive(Store(str(dst)), str(one))
    assert result["imported"] == [source["ids"][0]]
    assert collected["removed"]["trees"]["count"] == 1  # the purged run's tree went
    assert tree_bytes(dst / "runs" / source["ids"][0] / "snapshot") == tree_bytes(src_snapshot)
    assert not [p for p in dst.iterdir() if p.name.startswith(".import-")]
