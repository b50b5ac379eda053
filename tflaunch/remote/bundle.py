"""Shipping a program made of several modules as ONE source string: what the agent and the environment
builder are on a host (``python -I -S -c SOURCE``, or the agent's BOOTSTRAP reading it from its stdin),
where nothing of tflaunch is installed.

:func:`shipped_source` joins the parts in order (:data:`AGENT`, :data:`ENVBUILD`), drops each part's
imports of the others (the lines marked ``# joined when shipped``: in the joined program their names are
already defined) and puts the last part's docstring (the program's ``__doc__``) and a ``from __future__``
import, which must come first, once at the top. The parts are ordinary modules here (tested and imported
one by one); each may use only the standard library and the parts before it. Their sources are read,
not imported (the launcher does not run the agent's code to ship it).
"""
from __future__ import annotations

import importlib.util

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["shipped_source", "AGENT", "ENVBUILD", "JOINED"]

AGENT = ("tflaunch.remote.agent_host", "tflaunch.remote.agent_run", "tflaunch.remote.agent")
ENVBUILD = ("tflaunch.remote.envbuild_base", "tflaunch.remote.envbuild_packages", "tflaunch.remote.envbuild")
JOINED = "# joined when shipped"
_FUTURE = "from __future__ import annotations"
_CACHE: dict[tuple[str, ...], str] = {}


def _source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    loader: Any = spec.loader if spec is not None else None
    source = loader.get_source(name) if loader is not None else None
    if not source:
        raise RuntimeError(f"the source of {name} is not available: reinstall tflaunch")
    return source


def _docstring(source: str) -> tuple[str, str]:
    """(the module's leading docstring literal, the rest); the parts start with a triple-quoted one."""
    for quote in ('"""', "'''"):
        if source.startswith(quote):
            end = source.find(quote, 3)
            if end > 0:
                return source[:end + 3], source[end + 3:]
    return "", source


def shipped_source(parts: tuple[str, ...]) -> str:
    """The source of the modules ``parts`` (dotted names, in order) as one program."""
    found = _CACHE.get(parts)
    if found is not None:
        return found
    future = False
    doc = ""
    chunks = []
    for i, name in enumerate(parts):
        source = _source(name)
        if i == len(parts) - 1:
            doc, source = _docstring(source)
        kept = []
        for line in source.splitlines(keepends=True):
            if line.rstrip().endswith(JOINED):
                continue
            if line.strip() == _FUTURE:
                future = True
                continue
            kept.append(line)
        chunks.append(f"# ---- {name}\n" + "".join(kept).strip("\n") + "\n")
    joined = (doc + "\n" if doc else "") + (_FUTURE + "\n" if future else "") + "\n\n".join(chunks)
    _CACHE[parts] = joined
    return joined
