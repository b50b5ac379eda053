"""The sweep's driver: a background process that holds the parent run's lease and runs its trials.

Each trial is an ordinary run (``parent``, ``trial`` and ``hyperparameters`` in its record) made from
the sweep's spec and snapshot, started like ``run --detach`` (its own background supervisor, or its own
Slurm job), so trials outlive a driver that dies. The driver keeps at most ``max_concurrent_runs``
trials going, within the slots the compute target has free (:mod:`tflaunch.sweep.slots`); follows their
status and primary metric; asks the policy about each new interval and cancels the trials it stops
(recording the decision); and writes every change to ``sweep.json`` (:mod:`tflaunch.sweep.trials`)
before acting on it. ``tflaunch sweep resume`` starts a driver on the same record: trials still going
are adopted, trials whose launcher died are recorded ``Lost`` and replaced (same hyperparameters),
trials recorded but never created are started.

The sweep ends Completed when its trials are done (at least one Completed or stopped by the policy),
Failed when every trial failed (the driver stops after the first three failures when nothing has
succeeded: the script is likely broken), Canceled when canceled (its trials are canceled first).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import time

from ..errors import TflaunchError
from ..spec import JobSpec
from ..history.store import CANCELED, COMPLETED, FAILED, FINALIZING, RUNNING, TERMINAL, RunRecord, Store, now_iso
from . import trials as T
from .following import FAIL_FAST, TrialFollowing, curve
from .policy import policy_from_dict
from .sampling import sampling_from_dict
from .slots import Pool
from .starting import TrialStarting

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["SweepDriver", "main", "DRIVER_BOOT", "spawn_driver", "trial_shape", "curve", "FAIL_FAST"]

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at the trials while something happens
MAX_POLL = 0.5  # when nothing has for a while
DRIVER_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from tflaunch.sweep.driver import main; sys.exit(main(sys.argv[2:]))")
LOCK = ".sweep.lock"


def trial_shape(spec: JobSpec) -> tuple[int, int, int]:
    """(hosts a trial needs, slots it needs on each, GPUs it needs on a host) from the sweep's spec."""
    from ..spec.hosts import Host
    from ..plan.tfconfig import place

    tasks = place(spec, [Host(f"node{i}", 1 << 20) for i in range(spec.node_count)])
    per = [0] * spec.node_count
    for task in tasks:
        if task.role != "ps":
            per[task.node] += 1
    per_host = max(1, max(per))
    return spec.node_count, per_host, (spec.gpus_per_node or per_host) if spec.use_gpu else 0


def build_pool(spec: JobSpec, sweep: dict[str, Any]) -> Pool:
    target = spec.compute_target or {}
    nodes, per_host, gpu_need = trial_shape(spec)
    if target.get("kind") == "slurm":
        return Pool(None)
    hosts = sweep.get("hosts")
    if target.get("kind") == "local" or not hosts:
        slots = sweep.get("slots") or _cpus()
        gpus = None
        if spec.use_gpu:
            from ..remote.agent import find_gpus
            from ..plan.gpus import host_gpus
            gpus = host_gpus("localhost", find_gpus(), None)
        return Pool([["localhost", slots]], per_host=nodes * per_host, gpus=gpus, gpu_need=gpu_need)
    return Pool(hosts, per_host=per_host, nodes=nodes, exclusive=spec.use_gpu)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SweepDriver(TrialStarting, TrialFollowing):
    """Runs one sweep (a parent run record) to its end in this process. Starting trials is
    :class:`~tflaunch.sweep.starting.TrialStarting`'s part, following them (status, metric, the policy's
    decisions, their ends) :class:`~tflaunch.sweep.following.TrialFollowing`'s."""

    def __init__(self, record: RunRecord, *, resume: bool = False) -> None:
        self.record = record
        self.store = record.store
        definition = record.definition()
        self.spec = JobSpec.from_dict(definition["spec"])
        if definition.get("withheld_environment"):  # secret variables: the trials get them (the sweep keeps its
            self.spec.environment_variables.update(record.withheld_values())  # start file until it ends)
        self.sweep = definition["sweep"]
        self.config = self.sweep["config"]
        self.sampling = sampling_from_dict(self.config["hyperparameter_sampling"])
        self.policy = policy_from_dict(self.config["policy"])
        self.maximize = self.config["primary_metric_goal"] == "maximize"
        self.metric = self.config["primary_metric_name"]
        self.max_total = int(self.config["max_total_runs"])
        self.max_concurrent = int(self.config.get("max_concurrent_runs") or min(self.max_total, 100))
        self.resume = resume
        self.pool = build_pool(self.spec, self.sweep)
        from .slurm_array import array_allowed
        self.array = array_allowed(self.spec, self.config) and self.max_total > 1
        self.children: dict[int, RunRecord] = {}
        self.starting: dict[int, Any] = {}  # trial index -> its supervisor being started (supervise.Detached)
        self._changed = False
        self.curves: dict[int, list[Any]] = {}
        self.state: dict[str, Any] = {}
        self.exhausted = False
        self.stop_reason: str | None = None  # canceled | max_duration | fail_fast
        self.stop_detail = ""
        self._signals: list[int] = []
        self._lease_at = 0.0
        self._log = None

    # -- state ---------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        try:
            self.state = T.load(self.record.dir)
        except FileNotFoundError:
            self.state = {"format": T.FORMAT, "parent": self.record.id, "config": self.config, "trials": [],
                          "draws": 0, "elapsed": 0.0, "stop_reason": None}
        self.limit = float(self.config["max_duration_minutes"]) * 60.0
        self.began = time.monotonic() - float(self.state.get("elapsed") or 0.0)

    def _save(self, sync: bool = False) -> None:
        self.state["elapsed"] = round(time.monotonic() - self.began, 3)
        summary = self.state["summary"] = T.summary(self.state)
        T.save(self.record.dir, self.state, sync=sync)
        self._changed = True
        if summary != (self.record._status or {}).get("sweep"):  # `runs list` shows it with the sweep
            self.record.write_status(sweep=summary)

    def _say(self, text: str) -> None:
        log.info("%s", text)
        if self._log is not None:
            try:
                self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
                self._log.flush()
            except OSError:
                pass

    def _child(self, trial: dict[str, Any]) -> RunRecord:
        record = self.children.get(trial["index"])
        if record is None:
            record = self.children[trial["index"]] = RunRecord(self.store, trial["run_id"])
        return record

    def _active(self) -> list[dict[str, Any]]:
        return [t for t in self.state["trials"] if t["status"] not in T.ENDED]

    def _counted(self) -> int:
        return sum(1 for t in self.state["trials"] if t["status"] != T.LOST)

    # -- main ----------------------------------------------------------------------------------------
    def run(self, ready: Any = None) -> dict[str, Any]:
        saved = {s: signal.signal(s, lambda n, _f: self._signals.append(n))
                 for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        lock = open(self.record.path(LOCK), "a+")
        try:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise TflaunchError(f"sweep {self.record.id}: another driver is running it") from None
            self.record.write_lease()
            self._lease_at = time.monotonic()
            self._log = open(self.record.path(T.SWEEP_LOG), "a", encoding="utf-8")
            self._load_state()
            current = self.record.read_status(check_lease=False) or {}
            fields: dict[str, Any] = {"ended": None, "error": None}
            if not current.get("started"):
                fields["started"] = now_iso()
            self.record.write_status(RUNNING, **fields)
            if ready is not None:
                ready()
            if self.resume:
                self.record.event("resumed", pid=os.getpid())
                self._say(f"sweep {self.record.id} resumed")
                try:
                    os.unlink(self.store.index_path)  # the run index cached the sweep as ended
                except OSError:
                    pass
            else:
                self._say(f"sweep {self.record.id}: {self.sampling.kind} sampling, {self.max_total} trials, "
                          f"{self.max_concurrent} at a time, primary metric {self.metric} ({self.config['primary_metric_goal']})")
            try:
                self._reconcile()
                self._environment()
                self._loop()
            except BaseException as exc:  # never leave trials running unsupervised by a crashed driver
                if not isinstance(exc, TflaunchError):
                    log.exception("sweep %s: driver error", self.record.id)
                self._stop("internal", f"tflaunch internal error: {exc!r}" if not isinstance(exc, TflaunchError)
                           else str(exc))
                self._cancel_active(self.stop_detail)
                self._drain()
                if not isinstance(exc, Exception):
                    raise
            return self._finalize()
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)
            if self._log is not None:
                self._log.close()
            for starting in self.starting.values():
                starting.close()
            lock.close()

    def _environment(self) -> None:
        """Build the trials' environment once, here, before any trial starts (they reuse it)."""
        if not self.spec.environment or self.state["trials"]:
            return
        from ..submit import build_environment_here

        self._say("building the trials' environment")
        build_environment_here(self.record, self.spec)

    def _reconcile(self) -> None:
        """A resumed sweep: adopt the trials still going, account for the ones that ended meanwhile."""
        for trial in self.state["trials"]:
            if trial["status"] != T.LOST and trial["intervals"] and trial["status"] in TERMINAL:
                try:  # the others' curves, for the policy
                    self.curves[trial["index"]] = curve(self._child(trial).dir, self.metric)
                except (OSError, ValueError):
                    pass
        for trial in self._active():
            if trial["status"] == T.STARTING and not os.path.isdir(os.path.join(self.store.runs_dir, trial["run_id"])):
                shutil.rmtree(os.path.join(self.store.runs_dir, f".new-{trial['run_id']}"), ignore_errors=True)
                continue  # recorded, never created: _fill starts it
            status = self._child(trial).read_status() or {}
            if status.get("status") not in TERMINAL:
                self.pool.hold(trial.get("allocation"))
                trial["adopted"] = True
                self._say(f"trial {trial['index']} ({trial['run_id']}) adopted, {status.get('status')}")
                continue
            self.pool.hold(trial.get("allocation"))
            self._poll(trial)
        self._save()

    def _loop(self) -> None:
        delay = POLL
        while True:
            self._handle_signals()
            if self.stop_reason is None and self.record.cancel_requested():
                self._stop("canceled", str((self.record.cancel_requested() or {}).get("reason") or "canceled"))
            if self.stop_reason is None and time.monotonic() - self.began > self.limit:
                self._stop("max_duration", f"max_duration_minutes ({self.config['max_duration_minutes']}) reached")
            if self.stop_reason is not None:
                self._cancel_active(self.stop_detail)
                self._drain()
                return
            self._check_starting()
            for trial in self._active():
                if trial["status"] != T.STARTING:
                    self._poll(trial)
            self._fail_fast()
            if self.stop_reason is None:
                self._fill()
            if not self._active() and (self.exhausted or self._counted() >= self.max_total or self.stop_reason):
                if self.stop_reason is not None:
                    continue
                return
            self._heartbeat()
            # quick while things happen (a trial just started or ended), slower when all is quiet
            delay = POLL if self._changed or self.starting else min(delay * 1.5, MAX_POLL)
            self._changed = False
            time.sleep(delay)

    def _heartbeat(self) -> None:
        if time.monotonic() - self._lease_at >= 2.0:
            self.record.write_lease()
            self._lease_at = time.monotonic()
            changed = self._changed
            self._save()  # the elapsed time, for max_duration_minutes after a resume
            self._changed = changed  # not a change of the trials: the polling may stay slow

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            request = self.record.cancel_requested()
            self._stop("canceled", str(request.get("reason")) if request
                       else f"sweep driver received {signal.Signals(signum).name}")

    def _stop(self, reason: str, detail: str) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
            self.state["stop_reason"] = {"reason": reason, "message": detail}
            self._say(f"stopping the sweep: {detail}")

    # -- stopping ------------------------------------------------------------------------------------
    def _cancel_active(self, reason: str) -> None:
        from ..submit import cancel_run

        for trial in self._active():
            if trial["index"] not in self.children and trial["status"] == T.STARTING:
                self._end(trial, CANCELED, None)
                continue
            try:
                cancel_run(self._child(trial), f"sweep {self.record.id}: {reason}")
            except TflaunchError as exc:
                log.warning("trial %s: %s", trial["index"], exc)

    def _drain(self, timeout: float = 120.0) -> None:
        """Wait for the canceled trials to end (their supervisors stop them, SIGKILL after the grace)."""
        deadline = time.monotonic() + timeout
        while self._active() and time.monotonic() < deadline:
            self._check_starting()
            for trial in self._active():
                self._poll(trial)
            self._heartbeat()
            time.sleep(POLL)
        for trial in self._active():
            self._say(f"trial {trial['index']} ({trial['run_id']}) has not ended; its own launcher is stopping it")

    def _finalize(self) -> dict[str, Any]:
        self.record.release_reserve()  # a full disk: the final records still fit
        try:
            self._save()
        except OSError as exc:
            log.warning("sweep %s: cannot write its state: %s", self.record.id, exc)
        try:
            self.record.write_status(FINALIZING)
        except OSError as exc:
            log.warning("sweep %s: cannot record Finalizing: %s", self.record.id, exc)
        summary = T.summary(self.state)
        counts = summary["counts"]
        fields: dict[str, Any] = {"sweep": summary, "ended": now_iso()}
        good = counts.get(COMPLETED, 0) + sum(1 for t in self.state["trials"]
                                              if t["status"] == CANCELED and t["stopped"])
        if self.stop_reason == "canceled":
            status = CANCELED
            fields["cancel_reason"] = self.stop_detail
        elif self.stop_reason in ("fail_fast", "internal"):
            status = FAILED
            fields["error"] = {"reason": "internal" if self.stop_reason == "internal" else "trials_failed",
                               "message": self.stop_detail}
        elif good:
            status = COMPLETED
            if self.stop_reason == "max_duration":
                fields["stop_reason"] = self.stop_detail
        elif self.stop_reason == "max_duration":
            status = FAILED
            fields["error"] = {"reason": "timeout", "message": f"{self.stop_detail} before any trial completed"}
        else:
            status = FAILED
            fields["error"] = {"reason": "trials_failed",
                               "message": f"all {summary['trials']} trials failed (see `tflaunch sweep show "
                                          f"{self.record.id}`)"}
        best = summary["best"]
        self._say(f"sweep {self.record.id} {status}" + (f": best trial {best['index']} ({best['run_id']}), "
                                                         f"{self.metric} {best['value']:.6g}" if best else ""))
        final = self.record.write_status(status, **fields)
        self.record.drop_lease()
        return final


# ---------------------------------------------------------------------------------------------------
def spawn_driver(record: RunRecord, *, resume: bool = False) -> int:
    """Start the sweep's driver in the background; return its pid once it holds the sweep's lease."""
    from ..supervise import spawn_detached

    bayesian = record.definition()["sweep"]["config"]["hyperparameter_sampling"]["kind"] == "bayesian"
    return spawn_detached(record, boot=DRIVER_BOOT, args=("--resume",) if resume else (), site=bayesian)


def main(argv: list[str]) -> int:
    """Entry point of the background driver: ``--home H --ready-fd N [--resume] PARENT_ID``."""
    import argparse

    parser = argparse.ArgumentParser(prog="tflaunch-sweep-driver")
    parser.add_argument("--home", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sweep %(levelname)s %(message)s")

    def ready() -> None:
        try:
            os.write(args.ready_fd, b"ready\n")
        except OSError:  # whoever started it is gone: the sweep goes on
            pass
        os.close(args.ready_fd)

    try:
        record = Store(args.home).run(args.run_id)
        SweepDriver(record, resume=args.resume).run(ready)
    except TflaunchError as exc:
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("driver of sweep %s failed", args.run_id)
        return 1
    return 0

