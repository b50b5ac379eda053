"""Ignore rules for snapshots: a documented subset of gitignore.

In every directory of the source tree the first file present among ``.tflaunchignore``,
``.amlignore`` and ``.gitignore`` is read; its patterns apply to that directory and below.

Supported syntax: blank lines; ``#`` comments (``\\#`` for a literal ``#``); ``!`` negation (``\\!``
for a literal ``!``); trailing spaces are dropped; a trailing ``/`` matches directories only; a ``/``
at the start or in the middle anchors the pattern to the ignore file's directory, otherwise it matches
a name at any depth; ``*`` and ``?`` (never across ``/``), ``[abc]``, ``[a-z]``, ``[!a]``; ``**/`` at
the start, ``/**`` at the end and ``/**/`` in the middle. The last matching pattern wins and, as in
git, a file inside an excluded directory cannot be re-included. Not supported: POSIX classes such
as ``[[:digit:]]``, ``.git/info/exclude`` and git's global excludes file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Iterable

__all__ = ["IGNORE_FILES", "Rule", "parse_rules", "is_ignored"]

IGNORE_FILES = (".tflaunchignore", ".amlignore", ".gitignore")


@dataclass(frozen=True)
class Rule:
    """One pattern: ``base`` is the POSIX path (relative to the source root) of its ignore file's dir."""

    base: str
    pattern: str
    regex: "re.Pattern[str]"
    negated: bool
    dir_only: bool


def _translate(glob: str) -> str:
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                before_ok = i == 0 or glob[i - 1] == "/"
                after = glob[i + 2:i + 3]
                if before_ok and after == "/":
                    out.append("(?:.*/)?")
                    i += 3
                    continue
                if before_ok and i + 2 == n:
                    out.append(".*")
                    i += 2
                    continue
                out.append("[^/]*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _strip_trailing_spaces(line: str) -> str:
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        stripped += " "
    return stripped


def parse_rules(text: str, base: str = "") -> list[Rule]:
    """Parse the content of one ignore file living in directory ``base`` (POSIX, relative)."""
    rules: list[Rule] = []
    for raw in text.splitlines():
        line = _strip_trailing_spaces(raw.rstrip("\r"))
        if not line or line.startswith("#"):
            continue
        negated = False
        if line.startswith("!"):
            negated, line = True, line[1:]
        elif line.startswith(("\\#", "\\!")):
            line = line[1:]
        dir_only = line.endswith("/") and not line.endswith("\\/")
        if dir_only:
            line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        body = _translate(line)
        regex = re.compile(("^" if anchored else "^(?:.*/)?") + body + "$", re.DOTALL)
        rules.append(Rule(base=base, pattern=raw, regex=regex, negated=negated, dir_only=dir_only))
    return rules


def is_ignored(rel_path: str, is_dir: bool, rules: Iterable[Rule]) -> bool:
    """Whether ``rel_path`` (POSIX, relative to the source root) is excluded by ``rules``.

    ``rules`` are in order of precedence (outer directories first, then file order); the last
    pattern that matches decides.
    """
    ignored = False
    for rule in rules:
        if rule.dir_only and not is_dir:
            continue
        if rule.base:
            prefix = rule.base + "/"
            if not rel_path.startswith(prefix):
                continue
            sub = rel_path[len(prefix):]
        else:
            sub = rel_path
        if rule.regex.match(sub):
            ignored = not rule.negated
    return ignored
