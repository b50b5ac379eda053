"""The supervisor in a background process: :class:`Detached` / :func:`spawn_detached` (``run --detach``,
:meth:`tflaunch.Experiment.submit`, a sweep's trials), and the entry point a Slurm job's batch script
runs (:func:`in_job_command`, :func:`detached_main`)."""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time

from ..errors import TflaunchError
from ..history.store import FAILED, LOG_DIR, RunRecord, Store, now_iso

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["Detached", "spawn_detached", "in_job_command", "detached_main"]

log = logging.getLogger(__name__)

# named in the batch scripts of queued Slurm jobs: keep ``tflaunch.supervise.detached_main``
_DETACHED_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                  "from tflaunch.supervise import detached_main; sys.exit(detached_main(sys.argv[2:]))")


def _package_root() -> str:
    """The directory (or zipapp) that holds the ``tflaunch`` package."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Detached:
    """A background supervisor being started for ``record``: ready once it holds the run's lease.

    ``env``: variables set for it (and so for its local agent); ``boot``/``args``/``site``: another
    background process that takes ``--home H --ready-fd N [ARGS] RUN_ID`` (a sweep's driver; ``site``:
    with the interpreter's site-packages). :meth:`poll` (without blocking) and :meth:`wait` say when it is
    ready; if it does not get that far, the run is recorded Failed (``launch_failed``) and TflaunchError
    raised. Several can be started at once (a sweep's trials) and polled together.
    """

    def __init__(self, record: RunRecord, *, env: dict[str, str] | None = None, boot: str = _DETACHED_BOOT,
                 args: Sequence[str] = (), site: bool = False) -> None:
        self.record = record
        self.log_path = record.path(LOG_DIR, "launcher.log")
        self.got = b""
        self.fd = -1
        self.proc: subprocess.Popen | None = None
        self.started = time.monotonic()
        record.hand_over_withheld()  # the secret variables' values, in an owner-only file until the processes start
        ready_r, ready_w = os.pipe()
        try:
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", *(() if site else ("-S",)), "-c", boot, _package_root(), "--home",
                     record.store.home, "--ready-fd", str(ready_w), *args, record.id],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
                    pass_fds=(ready_w,), close_fds=True, env=None if env is None else {**os.environ, **env})
        except OSError as exc:
            os.close(ready_r)
            self._fail(str(exc))
        finally:
            os.close(ready_w)
        self.fd = ready_r
        os.set_blocking(ready_r, False)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def _fail(self, error: str) -> None:
        self.close()
        message = f"the background supervisor for run {self.record.id} did not start ({error}); see {self.log_path}"
        self.record.write_status(FAILED, ended=now_iso(), error={"reason": "launch_failed", "message": message})
        raise TflaunchError(message)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def poll(self) -> bool:
        """True once it holds the lease ("ready\n" on the pipe), False while starting; TflaunchError if it
        exited first."""
        if self.fd < 0:
            return True
        while b"\n" not in self.got:
            try:
                chunk = os.read(self.fd, 64)
            except BlockingIOError:
                return False
            if not chunk:
                break
            self.got += chunk
        if self.got.startswith(b"ready"):
            self.close()
            return True
        self._fail(f"exit status {self.proc.poll() if self.proc is not None else None}")
        return False

    def wait(self, timeout: float = 60.0) -> int:
        """Block until ready (its pid) or ``timeout`` seconds after the start (TflaunchError)."""
        while not self.poll():
            left = self.started + timeout - time.monotonic()
            if left <= 0:
                self._fail(f"exit status {self.proc.poll() if self.proc is not None else None}")
            select.select([self.fd], [], [], left)
        return self.pid


def spawn_detached(record: RunRecord, timeout: float = 60.0, **kwargs: Any) -> int:
    """Start a background supervisor for ``record`` (see :class:`Detached` for ``kwargs``); return its pid
    once it holds the lease. If it does not get that far, the run is recorded Failed (``launch_failed``)
    and TflaunchError raised."""
    return Detached(record, **kwargs).wait(timeout)


def in_job_command(home: str, run_id: str) -> list[str]:
    """What a batch script runs for a run submitted with ``--slurm``: this tflaunch, as the job's
    supervisor (the same interpreter and package path: a cluster's login and compute nodes share them)."""
    return [sys.executable, "-I", "-S", "-c", _DETACHED_BOOT, _package_root(), "--home", home, "--slurm", run_id]


def _wait_for_submitter(record: RunRecord, timeout: float = 60.0) -> None:
    """A job can start before ``sbatch`` has returned to the submitter: let it record Queued first."""
    from ..history.store import PREPARING

    deadline = time.monotonic() + timeout
    while (record.read_status(check_lease=False) or {}).get("status") == PREPARING and time.monotonic() < deadline:
        time.sleep(0.05)


def detached_main(argv: list[str]) -> int:
    """Entry point of the background supervisor (``--home H --ready-fd N RUN_ID``), and of a Slurm
    job's (``--home H --slurm RUN_ID``: its exit status is the run's, so Slurm's job state agrees; 0 when
    the run goes on in the job's next allocation, see :mod:`tflaunch.supervise.requeue`, or has ended
    already: a job started again after its run ended does nothing)."""
    import argparse

    parser = argparse.ArgumentParser(prog="tflaunch-supervisor")
    parser.add_argument("--home", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ready-fd", type=int)
    group.add_argument("--slurm", action="store_true")
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    from ..progress import PlainStages
    for handler in logging.getLogger().handlers:
        handler.addFilter(PlainStages())  # a stage's first and last lines (tflaunch.progress)
    try:
        record = Store(args.home).run(args.run_id)
    except TflaunchError as exc:
        log.error("%s", exc)
        return 1
    if args.slurm:
        from ..history.store import QUEUED, TERMINAL, exit_code_for
        from .supervisor import Supervisor

        for sig in (signal.SIGUSR1, signal.SIGUSR2):  # a --signal meant for the tasks must not kill us
            signal.signal(sig, lambda *_: None)
        _wait_for_submitter(record)
        current = (record.read_status(check_lease=False) or {}).get("status")
        if current in TERMINAL:  # a job started again (requeued) after its run had ended: nothing to do
            log.warning("run %s has ended already (%s); Slurm job %s (restart %s) does nothing", record.id, current,
                        os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT"))
            return 0
        log.info("run %s starts in Slurm job %s on %s%s", record.id, os.environ.get("SLURM_JOB_ID"),
                 os.environ.get("SLURM_JOB_NODELIST"),
                 f" (requeued {os.environ['SLURM_RESTART_COUNT']} time(s))" if os.environ.get("SLURM_RESTART_COUNT")
                 else "")
        try:
            final = Supervisor(record, stream=False).run()
        except Exception:
            log.exception("supervisor for run %s failed", args.run_id)
            return 1
        log.info("run %s %s", record.id, final.get("status"))
        return 0 if final.get("status") == QUEUED else exit_code_for(final)  # Queued: requeued, goes on

    def ready() -> None:
        try:
            os.write(args.ready_fd, b"ready\n")
        except OSError:  # the submitter is gone (a sweep's driver killed meanwhile): the run goes on
            pass
        os.close(args.ready_fd)

    from .supervisor import Supervisor

    try:
        Supervisor(record, stream=False, on_lease=ready).run()
    except Exception:
        log.exception("supervisor for run %s failed", args.run_id)
        return 1
    return 0
