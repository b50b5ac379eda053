"""The hang watchdog's stack request, on the job's side (:mod:`tflaunch.supervise.watchdog`).

This directory is not imported as a package by tflaunch: it is a ``sys.path`` entry. When a run has a hang
timeout (``--hang-timeout``) its processes get ``TFLAUNCH_STACKS_SIGNAL`` (:data:`STACKS_VAR`, the signal's
name, :data:`STACKS_SIGNAL`), and the agent and the rank wrapper then append this directory of tflaunch's
copy (``TFLAUNCH_PYTHONPATH``, see :mod:`tflaunch.pythonpath`; :data:`STACKS_DIR` below it) to their
``PYTHONPATH`` after the copy itself. Python's :mod:`site` imports its ``sitecustomize`` at start-up: that
registers :mod:`faulthandler` for the signal (every thread's stack to stderr: the rank's log) and runs the
``sitecustomize`` it shadows. Runs without a hang timeout get neither the variable nor the directory.

Why SIGURG: its default action is to be ignored, so a process that did not register the dump (not Python,
``python -I``, a host without tflaunch's copy, the MPI daemons and rank wrappers an MPI host's agent sees)
is not harmed if it receives it, and nothing in a training job uses it: NCCL and Horovod do not, mpirun
forwards SIGUSR1/SIGUSR2 (tflaunch uses SIGUSR2 for Slurm checkpoints), Slurm's ``--signal`` defaults to
SIGUSR1, TensorFlow's failure handlers take SIGSEGV/SIGABRT/..., Python takes SIGINT. (Go programs use it
for preemption and ignore extra ones. SIGPWR, SIGXCPU and the real-time signals kill by default, and
Boehm's GC uses SIGPWR; SIGWINCH is taken by readline and curses.)
"""
import os

__all__ = ["STACKS_VAR", "STACKS_SIGNAL", "STACKS_DIR"]

STACKS_VAR = "TFLAUNCH_STACKS_SIGNAL"  # (the same literal in agent_host.py, rank.py and sitecustomize.py)
STACKS_SIGNAL = "SIGURG"
STACKS_DIR = os.path.join("tflaunch", "remote", "stacks")  # below the copy on the job's PYTHONPATH
