"""tflaunch.history.gitinfo against real git repositories made in temporary directories."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import pids_with_token, wait_no_processes
from tflaunch.history import gitinfo

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

BINARY_V1 = bytes(range(256)) * 8
BINARY_V2 = BINARY_V1[:1000] + b"\0changed\0" + BINARY_V1[1000:]


@pytest.fixture(autouse=True)
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user or system git config, no repository above tmp_path, no inherited GIT_DIR."""
    monkeypatch.setenv("HOME", str(tmp_path / "git-home"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG_PARAMETERS"):
        monkeypatch.delenv(name, raising=False)


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main",
                             *args], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def make_repo(path: Path, files: dict[str, str | bytes], *, commit: bool = True) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    write(path, files)
    git(path, "add", "-A")
    if commit:
        git(path, "commit", "-q", "-m", "first")
    return path


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under root (without .git and the names in skip) → bytes."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".git/") and rel not in skip:
            out[rel] = path.read_bytes()
    return out


def apply_on_checkout(tmp_path: Path, repo: Path, commit: str | None, patch: bytes) -> Path:
    """A clean copy of ``commit`` (an empty directory for None) with the patch applied by git apply."""
    target = tmp_path / "replay"
    if commit is None:
        target.mkdir()
    else:
        git(tmp_path, "clone", "-q", "--no-checkout", str(repo), str(target))
        git(target, "checkout", "-q", commit)
    (tmp_path / "replay.patch").write_bytes(patch)
    subprocess.run(["git", "apply", str(tmp_path / "replay.patch")], cwd=target, check=True)
    return target


def test_clean_repo(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "print(1)\n", "ignored.log": "x", ".gitignore": "*.log\n"})
    (repo / "new.log").write_text("ignored, so not dirty")
    info, patch = gitinfo.collect(str(repo))
    assert info == {"status": "ok", "commit": git(repo, "rev-parse", "HEAD"), "branch": "main", "upstream": None,
                    "remote": None, "dirty": False, "dirty_outside": False, "root": str(repo.resolve()),
                    "path": ".", "untracked": [], "patch": None, "patch_bytes": 0}
    assert patch is None


def test_dirty_tree_patch_recreates_tracked_files(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "a = 1\n", "staged.py": "b = 1\n", "gone.py": "c = 1\n",
                                      "with space.txt": "s\n", "weights.bin": BINARY_V1})
    head = git(repo, "rev-parse", "HEAD")
    for key, value in (("diff.noprefix", "true"), ("color.ui", "always"), ("diff.external", "false")):
        git(repo, "config", key, value)  # user settings that would spoil a `git diff` patch
    write(repo, {"train.py": "a = 2\n", "staged.py": "b = 2\n", "with space.txt": "t\n", "weights.bin": BINARY_V2,
                 "notes/new.txt": "untracked\n"})
    git(repo, "add", "staged.py")
    (repo / "gone.py").unlink()

    info, patch = gitinfo.collect(str(repo))
    assert info["status"] == "ok" and info["dirty"] is True and info["dirty_outside"] is False
    assert info["commit"] == head and info["patch"] == "git.patch" and info["patch_bytes"] == len(patch)
    assert info["untracked"] == ["notes/"]
    assert b"GIT binary patch" in patch and b"notes/new.txt" not in patch
    replay = apply_on_checkout(tmp_path, repo, head, patch)
    assert tree(replay) == tree(repo, skip=("notes/new.txt",))


def test_only_untracked_is_dirty_without_patch(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "x\n"})
    (repo / "data.csv").write_text("1,2\n")
    info, patch = gitinfo.collect(str(repo))
    assert (info["dirty"], info["untracked"], info["patch"], patch) == (True, ["data.csv"], None, None)


def test_source_subdirectory(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"proj/train.py": "a = 1\n", "proj/lib/m.py": "m\n", "other/x.py": "x\n",
                                      "proj-2/y.py": "y\n"})
    head = git(repo, "rev-parse", "HEAD")
    write(repo, {"other/x.py": "x2\n", "proj-2/y.py": "y2\n", "top.txt": "untracked outside\n"})

    info, patch = gitinfo.collect(str(repo / "proj"))
    assert (info["dirty"], info["dirty_outside"], info["path"], patch) == (False, True, "proj", None)

    write(repo, {"proj/lib/m.py": "m2\n", "proj/lib/new.py": "n\n"})
    info, patch = gitinfo.collect(str(repo / "proj" / "lib"))
    assert (info["dirty"], info["dirty_outside"], info["path"]) == (True, True, "proj/lib")
    assert info["root"] == str(repo.resolve()) and info["untracked"] == ["new.py"]
    assert b"proj/lib/m.py" in patch and b"x.py" not in patch and b"y.py" not in patch
    replay = apply_on_checkout(tmp_path, repo, head, patch)
    assert (replay / "proj/lib/m.py").read_text() == "m2\n" and (replay / "other/x.py").read_text() == "x\n"

    # a source directory that is itself untracked: all of it is new, listed as "./"
    write(repo, {"fresh/dir/run.py": "r\n"})
    info, patch = gitinfo.collect(str(repo / "fresh" / "dir"))
    assert (info["dirty"], info["untracked"], info["path"], patch) == (True, ["./"], "fresh/dir", None)


def test_untracked_list_is_capped(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "x\n"})
    for index in range(gitinfo.MAX_UNTRACKED + 5):
        (repo / f"u{index:05d}.txt").write_bytes(b"")
    info, _ = gitinfo.collect(str(repo))
    assert len(info["untracked"]) == gitinfo.MAX_UNTRACKED and info["untracked_truncated"] is True


def test_detached_head_and_remotes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "x\n"})
    git(repo, "remote", "add", "first", "git@example.com:team/first.git")
    info, _ = gitinfo.collect(str(repo))
    assert info["remote"] == "git@example.com:team/first.git"  # no origin: the first remote

    git(repo, "remote", "add", "origin", "https://user:s3cret@example.com/team/proj.git")
    git(repo, "remote", "add", "up", "https://ghp_token@example.com/up/proj.git")
    info, _ = gitinfo.collect(str(repo))
    assert info["remote"] == "https://example.com/team/proj.git"

    git(repo, "config", "branch.main.remote", "up")
    git(repo, "config", "branch.main.merge", "refs/heads/main")
    info, _ = gitinfo.collect(str(repo))
    assert info["remote"] == "https://example.com/up/proj.git" and info["upstream"] == "up/main"

    git(repo, "checkout", "-q", "--detach")
    info, _ = gitinfo.collect(str(repo))
    assert info["branch"] is None and info["commit"] == git(repo, "rev-parse", "HEAD")
    assert info["remote"] == "https://example.com/team/proj.git"


@pytest.mark.parametrize("url, expected", [
    ("https://user:pw@host.org:8443/a/b.git", "https://host.org:8443/a/b.git"),
    ("HTTP://token@host/a@b", "HTTP://host/a@b"),
    ("ssh://git:pw@host/repo.git", "ssh://git@host/repo.git"),
    ("ssh://git@host/repo.git", "ssh://git@host/repo.git"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ("/srv/git/repo.git", "/srv/git/repo.git"),
])
def test_strip_credentials(url: str, expected: str) -> None:
    assert gitinfo.strip_credentials(url) == expected


def test_repo_without_commits(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "a = 1\n", "w.bin": BINARY_V1}, commit=False)
    write(repo, {"train.py": "a = 2\n", "later.txt": "untracked\n"})  # staged, then changed again
    info, patch = gitinfo.collect(str(repo))
    assert (info["commit"], info["branch"], info["dirty"], info["untracked"]) == (None, "main", True, ["later.txt"])
    replay = apply_on_checkout(tmp_path, repo, None, patch)
    assert tree(replay) == tree(repo, skip=("later.txt",))


def test_patch_over_limit(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "a = 1\n"})
    (repo / "train.py").write_text("a = 2\n" * 100)
    info, patch = gitinfo.collect(str(repo), max_patch_bytes=100)
    assert patch is None and info["patch"] is None and info["patch_truncated"] is True
    assert info["patch_bytes"] > 600 and info["dirty"] is True


def test_not_a_work_tree(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert gitinfo.collect(str(tmp_path / "plain")) == ({"status": "none"}, None)
    repo = make_repo(tmp_path / "r", {"train.py": "x\n"})
    assert gitinfo.collect(str(repo / ".git")) == ({"status": "none"}, None)


def test_no_git_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "x\n"})
    unknown = ({"status": "unknown", "reason": "git not found"}, None)
    assert gitinfo.collect(str(repo), git=str(tmp_path / "no" / "git")) == unknown
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert gitinfo.collect(str(repo)) == unknown


def test_git_failing_or_hanging(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "x\n"})
    failing = tmp_path / "failing-git"
    failing.write_text("#!/bin/sh\necho 'hint: noise' >&2\necho 'fatal: index file corrupt' >&2\nexit 128\n")
    hanging = tmp_path / "hanging-git"
    token = f"hanging-git-{os.urandom(4).hex()}"  # carried by the shell's children (how they are found)
    hanging.write_text(f"#!/bin/sh\nexport TFLAUNCH_RUN_ID={token}\nsleep 600 </dev/null >/dev/null 2>&1 &\nsleep 30\n")
    for script in (failing, hanging):
        script.chmod(0o755)
    assert gitinfo.collect(str(repo), git=str(failing)) == (
        {"status": "unknown", "reason": "git rev-parse failed: fatal: index file corrupt"}, None)
    try:
        assert gitinfo.collect(str(repo), git=str(hanging), timeout=0.3) == (
            {"status": "unknown", "reason": "git rev-parse timed out"}, None)
        # the shell's children were killed with it: the sleep holding git's stdout (else collect would only
        # return when it ends) and the one in the background (else alive for 600 s)
        wait_no_processes(token, 20)
    finally:
        for pid in pids_with_token(token):
            os.kill(pid, signal.SIGKILL)


def test_read_only_and_other_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "r", {"train.py": "x\n", "clean.py": "c\n"})
    (repo / "train.py").write_text("y\n")
    os.utime(repo / "clean.py", (5000, 5000))  # stale stat data: a plain `git status` would rewrite the index
    index = repo / ".git" / "index"
    before = index.stat()
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")  # git's own knob for "owned by another user"
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))  # inherited from a hook: must not matter
    info, patch = gitinfo.collect(str(repo))
    assert info["status"] == "ok" and info["dirty"] is True and b"+y" in patch
    after = index.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert not (repo / ".git" / "index.lock").exists()
