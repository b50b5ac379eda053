"""tflaunch's start-up hook in a job's Python processes (only in runs with ``--hang-timeout``): the hang
watchdog's stack dump, then the ``sitecustomize`` this one shadows.

Imported by Python's :mod:`site` as ``sitecustomize`` because this directory is on the process's
``PYTHONPATH`` (see :mod:`tflaunch.remote.stacks`). :func:`register` has :mod:`faulthandler` write every
thread's Python stack to stderr when the process receives the signal named by ``TFLAUNCH_STACKS_SIGNAL``
(SIGURG). ``chain=False``: the disposition it replaces is the default one (SIGURG is ignored), and
faulthandler's chaining would drop ``SA_RESTART``, so that a system call in a C library (NCCL, gRPC, a data
reader) could fail with EINTR. :func:`chain` then runs the next ``sitecustomize`` on ``sys.path`` (Debian's
in the standard library directory, a virtualenv's in its site-packages) as ``sitecustomize``, as Python would
have without this one; directories like this one (another copy of tflaunch) are skipped, so it never recurses.

Standard library only, nothing of tflaunch imported: it runs before the script and must cost nothing.
"""
import os
import sys

SIGNAL_VAR = "TFLAUNCH_STACKS_SIGNAL"
_HERE = os.path.join("tflaunch", "remote", "stacks")


def register(env=None):
    """Register the stack dump for the signal named in ``TFLAUNCH_STACKS_SIGNAL``; return whether it was."""
    name = (os.environ if env is None else env).get(SIGNAL_VAR, "")
    if not name:
        return False
    try:
        import _signal as signals  # the module's constants without the enums of `signal`
    except ImportError:
        import signal as signals
    signum = int(name) if name.isdigit() else getattr(signals, name, None)
    stream = sys.stderr
    if not isinstance(signum, int) or stream is None:
        return False
    import faulthandler
    try:
        faulthandler.register(signum, file=stream, all_threads=True, chain=False)
    except (AttributeError, OSError, RuntimeError, ValueError):  # no usable stderr, a signal it refuses
        return False
    return True


def _is_hook_dir(entry):
    return os.path.normpath(entry or ".").endswith(_HERE)


def chain():
    """Run the ``sitecustomize`` this one shadows (the next one on ``sys.path``), if there is one."""
    from importlib.machinery import PathFinder
    spec = PathFinder.find_spec("sitecustomize", [p for p in sys.path if not _is_hook_dir(p)])
    if spec is None or spec.loader is None:
        return
    import importlib.util
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # what `import sitecustomize` gives from now on
    spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    register()
    chain()
