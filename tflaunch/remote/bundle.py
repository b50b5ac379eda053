"""Shipping a program made of several modules as ONE source string: what the agent and the environment
builder are on a host (``python -I -S -c SOURCE``, or the agent's BOOTSTRAP reading it from its stdin),
where nothing of tflaunch is installed.

:func:`shipped_source` joins the parts in order, drops each part's imports of the others (the lines
marked ``# joined when shipped``: in the joined program their names are already defined) and puts the
last part's docstring (the program's ``__doc__``) and a ``from __future__`` import, which must come
first, once at the top. The parts are ordinary modules here
(tested and imported one by one); each may use only the standard library and the parts before it.
"""
from __future__ import annotations

import importlib

__all__ = ["shipped_source", "JOINED"]

JOINED = "# joined when shipped"
_FUTURE = "from __future__ import annotations"
_CACHE: dict[tuple[str, ...], str] = {}


def shipped_source(parts: tuple[str, ...]) -> str:
    """The source of the modules ``parts`` (dotted names, in order) as one program."""
    found = _CACHE.get(parts)
    if found is not None:
        return found
    future = False
    chunks = []
    for name in parts:
        module = importlib.import_module(name)
        source = module.__loader__.get_source(module.__name__)  # type: ignore[union-attr]
        if not source:
            raise RuntimeError(f"the source of {name} is not available: reinstall tflaunch")
        kept = []
        for line in source.splitlines(keepends=True):
            if line.rstrip().endswith(JOINED):
                continue
            if line.strip() == _FUTURE:
                future = True
                continue
            kept.append(line)
        chunks.append(f"# ---- {name}\n" + "".join(kept).rstrip() + "\n")
    import ast

    doc = ast.get_docstring(ast.parse(source), clean=False)  # the main module's (the last part): __doc__
    joined = (f"{doc!r}\n" if doc else "") + (_FUTURE + "\n" if future else "") + "\n\n".join(chunks)
    _CACHE[parts] = joined
    return joined
