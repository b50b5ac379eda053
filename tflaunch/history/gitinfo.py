"""Git information of a run's source directory: commit, branch, remote, dirty flag and the uncommitted diff.

:func:`collect` asks git (a few read-only calls, never taking ``index.lock``) about the work tree that
holds the source directory and returns ``(info, patch)``: ``info`` is a JSON-ready dict for the run
record, ``patch`` what ``git diff HEAD --binary -- <source subtree>`` prints (``None`` when the subtree
has no tracked change). The patch applies with ``git apply`` at the top of a clean checkout of
``info["commit"]`` and gives back the tracked files as they were when the run was submitted; untracked
files are listed in ``info["untracked"]`` (relative to the source directory), not put in the patch, since
the snapshot holds them.

Nothing here raises: no git binary, a directory outside any work tree, a failing or slow git all give
an ``info`` whose ``status`` says so (``"unknown"`` with a one-line ``reason``, or ``"none"``).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Sequence

__all__ = ["collect", "strip_credentials", "PATCH_NAME", "MAX_UNTRACKED"]

log = logging.getLogger(__name__)

PATCH_NAME = "git.patch"
"""Name the run record gives the patch file (``info["patch"]``)."""

MAX_UNTRACKED = 1000
"""At most this many untracked paths are listed; more sets ``info["untracked_truncated"]``."""

# Variables that would make git look at another repository, index or object store than the one the
# source directory is in (set, e.g., when tflaunch runs from a git hook), or change the diff's format.
_DROP_ENV = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_PREFIX",
    "GIT_EXTERNAL_DIFF", "GIT_DIFF_OPTS", "GIT_PAGER", "GIT_GLOB_PATHSPECS", "GIT_NOGLOB_PATHSPECS",
    "GIT_ICASE_PATHSPECS",
)

_CREDENTIAL_SCHEMES = ("http", "https", "ftp", "ftps")


class _GitFailed(Exception):
    """A git call failed, timed out or could not start; the message is one line for ``reason``."""


def strip_credentials(url: str) -> str:
    """``url`` without credentials: the whole user part of http(s)/ftp(s) URLs (a token alone is a
    secret), the password of other ``scheme://user:password@host`` URLs; scp-like ``user@host:path``
    is left as it is (a login name, no secret)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or "/" in scheme:
        return url
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    if scheme.lower() in _CREDENTIAL_SCHEMES:
        return f"{scheme}://{host}{tail}"
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}@{host}{tail}" if user else f"{scheme}://{host}{tail}"


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _DROP_ENV}
    env.update(LC_ALL="C", LANGUAGE="C", GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0",
               GIT_LITERAL_PATHSPECS="1")
    return env


def _one_line(stderr: bytes) -> str:
    """The line of git's stderr worth recording: the first ``fatal:``/``error:`` line, else the last."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line[:300]
    return lines[-1][:300] if lines else ""


def _kill(proc: subprocess.Popen, fired: list[bool]) -> None:
    fired.append(True)
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)  # git's children (submodules, hooks) too
        else:  # pragma: no cover - not POSIX
            proc.kill()
    except OSError:
        pass


class _Git:
    """Runs one git binary on one directory with a shared deadline."""

    def __init__(self, git: str, deadline: float) -> None:
        self.git = git
        self.deadline = deadline
        self.env = _env()

    def run(self, directory: str, args: Sequence[str], *, ok_codes: Sequence[int] = (0,),
            limit: int | None = None) -> tuple[int, bytes | None, int, bytes]:
        """``(returncode, stdout, stdout size, stderr)``; stdout is None when it was over ``limit``
        bytes (its size is still counted). Raises :class:`_GitFailed` unless the code is in ok_codes."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _GitFailed(f"git {args[0]} timed out")
        argv = [self.git, "--no-pager", "-c", "safe.directory=*", "-C", directory, *args]
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=err, env=self.env, close_fds=True,
                                        start_new_session=True)
            except FileNotFoundError:
                raise _GitFailed("git not found") from None
            except OSError as exc:
                raise _GitFailed(f"cannot run {self.git}: {exc.strerror or exc}") from None
            fired: list[bool] = []
            timer = threading.Timer(remaining, _kill, (proc, fired))
            timer.daemon = True
            timer.start()
            chunks: list[bytes] | None = []
            size = 0
            try:
                assert proc.stdout is not None
                fd = proc.stdout.fileno()
                while True:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                    if chunks is not None:
                        if limit is not None and size > limit:
                            chunks = None  # keep counting, stop keeping
                        else:
                            chunks.append(chunk)
            finally:
                timer.cancel()
                proc.stdout.close()  # type: ignore[union-attr]
                code = proc.wait()
            err.seek(0)
            stderr = err.read(64 * 1024)
        if fired:
            raise _GitFailed(f"git {args[0]} timed out")
        if code not in ok_codes:
            detail = _one_line(stderr) or f"exit status {code}"
            raise _GitFailed(f"git {args[0]} failed: {detail}")
        return code, (b"".join(chunks) if chunks is not None else None), size, stderr


def _parse_status(data: bytes) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``git status --porcelain=v2 --branch -z`` → (branch headers, [(kind, path from root)])."""
    headers: dict[str, str] = {}
    entries: list[tuple[str, str]] = []
    tokens = data.split(b"\0")
    index = 0
    while index < len(tokens):
        token = os.fsdecode(tokens[index])
        index += 1
        if not token:
            continue
        kind = token[0]
        if kind == "#":
            key, _, value = token[2:].partition(" ")
            headers[key] = value
        elif kind == "1":
            entries.append(("tracked", token.split(" ", 8)[-1]))
        elif kind == "2":  # rename or copy: the original path follows as its own token
            entries.append(("tracked", token.split(" ", 9)[-1]))
            index += 1
        elif kind == "u":
            entries.append(("tracked", token.split(" ", 10)[-1]))
        elif kind == "?":
            entries.append(("untracked", token[2:]))
    return headers, entries


def _pick_remote(config: bytes, branch: str | None) -> str | None:
    """The URL of the branch's upstream remote, else ``origin``'s, else the first remote's."""
    urls: dict[str, str] = {}
    branch_remotes: dict[str, str] = {}
    for record in config.split(b"\0"):
        if not record:
            continue
        key, _, value = os.fsdecode(record).partition("\n")
        if key.startswith("remote.") and key.endswith(".url"):
            urls.setdefault(key[len("remote."):-len(".url")], value)
        elif key.startswith("branch.") and key.endswith(".remote"):
            branch_remotes[key[len("branch."):-len(".remote")]] = value
    if not urls:
        return None
    name = branch_remotes.get(branch) if branch else None
    if name not in urls:
        name = "origin" if "origin" in urls else next(iter(urls))
    return strip_credentials(urls[name])


def _in_subtree(path: str, prefix: str) -> bool:
    """Is ``path`` (from the root; directories end with ``/``) in the subtree ``prefix`` (``""`` or
    ``a/b/``), or an untracked directory that holds the subtree?"""
    return path.startswith(prefix) or (path.endswith("/") and prefix.startswith(path))


def collect(source_directory: str, *, timeout: float = 10.0, max_patch_bytes: int = 50 * 1024 * 1024,
            git: str | None = None) -> tuple[dict, bytes | None]:
    """Git state of ``source_directory``: ``(info, patch)``; never raises for git's sake.

    Inside a work tree ``info`` is ``{"status": "ok", "commit", "branch", "upstream", "remote",
    "dirty", "dirty_outside", "root", "path", "untracked", ["untracked_truncated"], "patch",
    "patch_bytes", ["patch_truncated"], ["patch_error"]}``; ``dirty`` is about the source subtree
    (tracked changes, staged or not, and untracked files not ignored), ``dirty_outside`` about the rest
    of the work tree. ``patch`` is ``git diff HEAD --binary`` limited to the subtree (against the empty
    tree in a repository without commits), paths from the work tree's top; None when there is no
    tracked change or it is over ``max_patch_bytes`` (then ``patch_truncated`` and the real
    ``patch_bytes``). A diff that fails leaves the rest of ``info`` and says why in ``patch_error``.
    Outside any work tree: ``({"status": "none"}, None)``; no git, or git failing or slower than
    ``timeout`` seconds in all: ``({"status": "unknown", "reason": "<one line>"}, None)``.
    """
    started = time.monotonic()
    binary = git if git is not None and os.sep in git else shutil.which(git or "git")
    if not binary:
        return {"status": "unknown", "reason": "git not found"}, None
    if not os.path.isdir(source_directory):
        return {"status": "unknown", "reason": f"{source_directory} is not a directory"}, None
    runner = _Git(binary, started + timeout)
    try:
        info, patch = _collect(runner, os.path.abspath(source_directory), max_patch_bytes)
    except _GitFailed as exc:
        log.debug("git information of %s unknown: %s", source_directory, exc)
        return {"status": "unknown", "reason": str(exc)}, None
    except Exception as exc:  # a collector must never fail a submission
        log.debug("git information of %s failed", source_directory, exc_info=True)
        return {"status": "unknown", "reason": f"unexpected {type(exc).__name__}: {exc}".splitlines()[0]}, None
    log.debug("git information of %s in %.3f s: %s", source_directory, time.monotonic() - started,
              {key: value for key, value in info.items() if key != "untracked"})
    return info, patch


def _collect(runner: _Git, source: str, max_patch_bytes: int) -> tuple[dict, bytes | None]:
    code, out, _, stderr = runner.run(
        source, ["rev-parse", "--is-inside-work-tree", "--show-toplevel", "--show-prefix"],
        ok_codes=(0, 128))
    lines = os.fsdecode(out or b"").split("\n")
    if code == 128 or lines[0] != "true":
        message = _one_line(stderr)
        if lines[0] == "false" or "not a git repository" in message or "must be run in a work tree" in message:
            return {"status": "none"}, None
        raise _GitFailed(f"git rev-parse failed: {message or 'exit status 128'}")
    if len(lines) < 3:
        raise _GitFailed("git rev-parse gave no work tree")
    root, prefix = lines[1], lines[2]  # prefix: "" or "a/b/"

    _, out, _, _ = runner.run(root, ["status", "--porcelain=v2", "--branch", "-z", "--no-renames",
                                     "--untracked-files=normal"])
    headers, entries = _parse_status(out or b"")
    oid = headers.get("branch.oid", "")
    commit = oid if oid and oid != "(initial)" else None
    head = headers.get("branch.head", "")
    branch = head if head and head != "(detached)" else None

    _, out, _, _ = runner.run(root, ["config", "-z", "--get-regexp", r"^(remote\..*\.url|branch\..*\.remote)$"],
                              ok_codes=(0, 1))
    remote = _pick_remote(out or b"", branch)

    inside = [(kind, path) for kind, path in entries if _in_subtree(path, prefix)]
    # relative to the source directory; "./" when the source directory itself is untracked
    untracked = [(path[len(prefix):] if path.startswith(prefix) else "") or "./"
                 for kind, path in inside if kind == "untracked"]
    info: dict = {
        "status": "ok",
        "commit": commit,
        "branch": branch,
        "upstream": headers.get("branch.upstream"),
        "remote": remote,
        "dirty": bool(inside),
        "dirty_outside": len(inside) < len(entries),
        "root": root,
        "path": prefix.rstrip("/") or ".",
        "untracked": untracked[:MAX_UNTRACKED],
    }
    if len(untracked) > MAX_UNTRACKED:
        info["untracked_truncated"] = True
    info.update(patch=None, patch_bytes=0)

    if not any(kind == "tracked" for kind, _ in inside):
        return info, None
    try:
        base = commit
        if base is None:  # no commit yet: every tracked file is new, diff against the empty tree
            _, out, _, _ = runner.run(root, ["hash-object", "-t", "tree", os.devnull])
            base = os.fsdecode(out or b"").strip()
        # plumbing diff-index, not `git diff`: the porcelain rewrites the index after stat-only changes
        # (whatever GIT_OPTIONAL_LOCKS says), and user config (noprefix, color, drivers) does not apply
        args = ["diff-index", "-p", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames",
                "--submodule=short", "--src-prefix=a/", "--dst-prefix=b/", base]
        if prefix:
            args += ["--", prefix]
        _, patch, size, _ = runner.run(root, args, limit=max_patch_bytes)
    except _GitFailed as exc:
        log.warning("no patch of the uncommitted changes in %s: %s", source, exc)
        info["patch_error"] = str(exc)
        return info, None
    info["patch_bytes"] = size
    if patch is None:
        info["patch_truncated"] = True
        return info, None
    if not patch:
        return info, None
    info["patch"] = PATCH_NAME
    return info, patch
