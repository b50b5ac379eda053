"""A copy of the tflaunch package for the job's ``PYTHONPATH``, so a script can ``from tflaunch import Run``.

The job's Python is often not the one running tflaunch (a Horovod environment, a cluster module), and
adding tflaunch's own ``site-packages`` to it would bring every other package of that environment along.
So the package's sources are copied once per version into ``$TFLAUNCH_HOME/lib/<key>/tflaunch/`` (built
under a temporary name, then renamed: it appears complete), which holds nothing else. Processes get it as
``TFLAUNCH_PYTHONPATH``; the agent and the rank wrapper append it to ``PYTHONPATH`` on hosts where it
exists (every host that shares the home; the others get a copy with the job's files), and, for a run with a
hang timeout, its ``tflaunch/remote/stacks`` too (:mod:`tflaunch.remote.stacks`: a ``sitecustomize``). From
a zipapp (``tflaunch.pyz``) the archive itself is used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil

__all__ = ["library_path"]

log = logging.getLogger(__name__)


def _sources(package_dir: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), package_dir))
    return found


def library_path(home: str) -> str | None:
    """The directory (or zipapp) to put on the job's ``PYTHONPATH``; None if it cannot be made."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    parent = os.path.dirname(package_dir)
    if os.path.isfile(parent):  # running from a zipapp: it holds only tflaunch and its __main__
        return parent
    try:
        files = _sources(package_dir)
        digest = hashlib.sha256()
        for rel in files:
            st = os.stat(os.path.join(package_dir, rel))
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        root = os.path.join(home, "lib")
        final = os.path.join(root, digest.hexdigest()[:16])
        try:
            os.utime(final)  # its mtime: when a run last used it (`tflaunch gc` removes copies unused for long)
            return final
        except FileNotFoundError:
            pass  # not made yet, or removed meanwhile: made (again) below
        except OSError:
            if os.path.isdir(final):  # another user's copy, in a group's home
                return final
        staging = os.path.join(root, f".new-{os.urandom(4).hex()}")
        try:
            for rel in files:
                dest = os.path.join(staging, "tflaunch", rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(package_dir, rel), dest)
            try:
                os.rename(staging, final)
            except OSError:
                if not os.path.isdir(final):  # not another submitter's copy that got there first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final
    except OSError as exc:
        log.debug("no copy of tflaunch for the job's PYTHONPATH: %s", exc)
        return None
