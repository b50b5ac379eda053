"""Restarts (--max-restarts) with real TensorFlow jobs, through ``python -m tflaunch run`` on this machine:
a process is SIGKILLed mid-training by the test (by the pid in events.jsonl), and what TensorFlow
does about it must fit what tflaunch starts again.

- ps job (chief + 2 workers + 1 ps, examples/tf_distributed/train_ps_fault_tolerant.py), a worker
  killed: tflaunch starts that worker alone again (same TF_CONFIG task, same port); ClusterCoordinator
  runs its steps on the other worker meanwhile and, once the worker answers again, re-creates its
  dataset there and sends it steps. Nothing else restarts.
- the same job, the ps killed: its variables are gone, TensorFlow needs the coordinator restarted;
  tflaunch restarts the ps and the chief together, the chief resumes from its checkpoint.
- multiworker job (MultiWorkerMirroredStrategy, examples/tf_distributed/train_mwms.py), a worker
  killed: the all-reduce group cannot lose a member, the whole job starts again (attempt 2).

After each, no process with the run's TFLAUNCH_RUN_ID is left.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, cli_env, last_run_when, wait_no_processes

EXAMPLE = REPO / "examples" / "tf_distributed"
SEPARATOR = "===== tflaunch: attempt 2 ("
JOB_TIMEOUT = 240.0  # a stuck job fails the test instead of hanging the suite

pytestmark = [pytest.mark.slow,  # find_spec: TensorFlow itself is imported only by the job's processes
              pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")]


class Job:
    """``python -m tflaunch run --source-dir examples/tf_distributed ARGS`` in the background, and what a
    test needs to watch it: the record, each rank's log, the pid of a rank's current process."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.env = cli_env(home, TF_CPP_MIN_LOG_LEVEL="2")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(EXAMPLE), *args],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace", start_new_session=True)
        self.stopped: list[int] = []  # pids this test SIGSTOPped (continued at the latest in close())
        self.id = last_run_when(home, timeout=60)
        self.record = home / "runs" / self.id
        self.wait(lambda: (self.record / "processes.json").exists(), "processes.json")
        self.ranks = {(row["role"], row["index"]): row["rank"]
                      for row in json.loads((self.record / "processes.json").read_text())}

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"tflaunch ended ({self.proc.returncode}) before {what}\n{out[-3000:]}\n"
                                     f"{err[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s")
            time.sleep(0.05)

    def log(self, rank: int, stream: str = "stderr") -> str:
        path = self.record / "tflaunch_logs" / f"rank-{rank}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, kind: str | None = None) -> list[dict]:
        events = [json.loads(line) for line in (self.record / "events.jsonl").read_text().splitlines() if line]
        return [e for e in events if kind is None or e["event"] == kind]

    def pid(self, rank: int) -> int:
        """The pid of rank's newest process (its last process_started)."""
        pids = [e["pid"] for e in self.events("process_started") if e["index"] == rank]
        assert pids, f"rank {rank} has not started"
        return pids[-1]

    def starts(self) -> dict[int, int]:
        """rank -> how many times it was started."""
        counts: dict[int, int] = {}
        for e in self.events("process_started"):
            counts[e["index"]] = counts.get(e["index"], 0) + 1
        return counts

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(rank)
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.append(pid)
        return pid

    def resume(self) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stopped.clear()

    def finish(self) -> tuple[str, str, dict]:
        """Wait for tflaunch to end; (stdout, stderr, the run object of ``runs show --json``)."""
        try:
            out, err = self.proc.communicate(timeout=max(1.0, JOB_TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.close()
            out, err = self.proc.communicate()
            raise AssertionError(f"the job did not end within {JOB_TIMEOUT} s\n{out[-3000:]}\n{err[-3000:]}")
        show = subprocess.run([sys.executable, "-m", "tflaunch", "runs", "show", self.id, "--json"], env=self.env,
                              capture_output=True, text=True, check=True)
        return out, err, json.loads(show.stdout)

    def close(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # tflaunch cancels the run and stops its processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def job(home):
    jobs: list[Job] = []

    def start(*args: str) -> Job:
        jobs.append(Job(home, *args))
        return jobs[-1]
    yield start
    for j in jobs:
        j.close()


def _failure(out: str, err: str, run: dict) -> str:
    return f"{run.get('status')} {run.get('error')}\n{out[-4000:]}\n{err[-4000:]}"


def _restarts(job: Job) -> list[dict]:
    return job.events("restart")


PS_JOB = ("--backend", "ps", "--workers", "2", "--ps", "1", "--chief", "--max-restarts", "3")
EPOCHS = 6
PS_ARGS = ("train_ps_fault_tolerant.py", "--", "--epochs", str(EPOCHS), "--steps-per-epoch", "20", "--log-every", "5")


def test_ps_job_worker_killed_restarts_that_worker_alone(job):
    j = job(*PS_JOB, "--restart-delay", "0", *PS_ARGS)
    chief, ps = j.ranks[("chief", 0)], j.ranks[("ps", 0)]
    w0, w1 = j.ranks[("worker", 0)], j.ranks[("worker", 1)]
    j.wait(lambda: "worker 1 ran steps" in j.log(w1), "a step on worker 1")  # mid-training
    steps_w0 = j.log(w0).count("ran steps")
    j.kill(w1)
    # TensorFlow goes on without it: worker 0 runs the steps (those worker 1 had taken are put back)
    j.wait(lambda: j.log(w0).count("ran steps") > steps_w0 + 1, "worker 0 training on alone")
    # Hold the coordinator (SIGSTOP) until worker 1 is back: its TF start-up (seconds) is longer than
    # this small job's training, and a real job would still be training then.
    j.kill(chief, signal.SIGSTOP)
    try:
        j.wait(lambda: "(attempt 2)" in j.log(w1, "stdout"), "worker 1 serving again")
    finally:
        j.resume()
    out, err, run = j.finish()
    assert run["status"] == "Completed" and run["exit_code"] == 0, _failure(out, err, run)

    restarts = _restarts(j)
    assert [(r["attempt"], r["ranks"], r["role"], r["task_index"], r["returncode"]) for r in restarts] == \
        [(2, [w1], "worker", 1, -9)]
    assert run["attempt"] == 2 and [r["ranks"] for r in run["restarts"]] == [[w1]]
    assert j.starts() == {chief: 1, w0: 1, w1: 2, ps: 1}  # the others never restarted

    # worker 1 came back with the same TF_CONFIG task and port, after the separator line in its log
    before, sep, after = j.log(w1, "stdout").partition(SEPARATOR)
    assert sep, j.log(w1, "stdout")
    port = json.loads((j.record / "processes.json").read_text())[w1]["port"]
    assert f"worker 1 serving grpc://localhost:{port} (attempt 1)" in before
    assert f"worker 1 serving grpc://localhost:{port} (attempt 2)" in after
    # ... and the coordinator took it back: it re-created the dataset there (local step 1 again) and sent it steps
    assert "worker 1 ran steps: 1 here" in j.log(w1).partition(SEPARATOR)[2], j.log(w1)[-3000:]
    chief_out = j.log(chief, "stdout")
    assert chief_out.count("chief starting at step 0") == 1 and "resumed" not in chief_out
    assert f"epoch {EPOCHS} loss" in chief_out and SEPARATOR not in chief_out
    metrics = json.loads((j.record / "outputs" / "metrics.json").read_text())
    assert metrics["attempt"] == 1 and len(metrics["loss"]) == EPOCHS  # the chief's first and only attempt
    wait_no_processes(j.id)


def test_ps_job_ps_killed_restarts_ps_and_chief_from_checkpoint(job):
    # the default delay (1 s): the chief's own exit (it sees the ps gone) and the ps's make one restart
    j = job(*PS_JOB, *PS_ARGS)
    chief, ps = j.ranks[("chief", 0)], j.ranks[("ps", 0)]
    w0, w1 = j.ranks[("worker", 0)], j.ranks[("worker", 1)]
    j.wait(lambda: "chief saved" in j.log(chief, "stdout"), "a checkpoint")
    j.kill(ps)
    out, err, run = j.finish()
    assert run["status"] == "Completed" and run["exit_code"] == 0, _failure(out, err, run)

    restarts = _restarts(j)
    assert [(r["attempt"], r["ranks"]) for r in restarts] == [(2, sorted([chief, ps]))], restarts
    assert restarts[0]["role"] == "ps" and restarts[0]["returncode"] == -9
    assert run["attempt"] == 2
    assert j.starts() == {chief: 2, w0: 1, w1: 1, ps: 2}

    first, sep, second = j.log(chief, "stdout").partition(SEPARATOR)
    assert sep and "chief starting at step 0" in first and f"epoch {EPOCHS} loss" not in first
    resumed = [line for line in second.splitlines() if line.startswith("chief resumed from step ")]
    assert resumed and int(resumed[0].split()[4]) > 0, second
    assert f"epoch {EPOCHS} loss" in second and "test accuracy" in second
    assert "(attempt 2)" in j.log(ps, "stdout").partition(SEPARATOR)[2]
    metrics = json.loads((j.record / "outputs" / "metrics.json").read_text())
    assert metrics["attempt"] == 2 and metrics["resumed_from_step"] > 0 and len(metrics["loss"]) < EPOCHS
    # the workers served both coordinators: steps of the second attempt ran on them
    assert "worker 0 ran steps" in j.log(w0) and "worker 1 ran steps" in j.log(w1)
    wait_no_processes(j.id)


def test_multiworker_job_worker_killed_restarts_the_whole_group(job):
    # --grace 3: a MultiWorkerMirroredStrategy process survives SIGTERM (TensorFlow's coordination service
    # catches it), so worker 0 of attempt 1 ends by the SIGKILL after the grace
    j = job("--backend", "multiworker", "--nodes", "1", "--procs-per-node", "2", "--max-restarts", "2",
            "--restart-delay", "0", "--grace", "3", "train_mwms.py", "--", "--epochs", "3", "--steps-per-epoch", "40")
    w0, w1 = j.ranks[("worker", 0)], j.ranks[("worker", 1)]
    j.wait(lambda: "worker 1 epoch 1 loss" in j.log(w1, "stdout"), "an epoch on worker 1")
    j.kill(w1)
    out, err, run = j.finish()
    assert run["status"] == "Completed" and run["exit_code"] == 0, _failure(out, err, run)

    restarts = _restarts(j)
    assert [(r["attempt"], r["ranks"]) for r in restarts] == [(2, None)], restarts
    assert restarts[0]["rank"] == w1 and restarts[0]["returncode"] == -9
    assert run["attempt"] == 2 and [r["ranks"] for r in run["restarts"]] == [None]
    assert j.starts() == {w0: 2, w1: 2}
    for rank, index in ((w0, 0), (w1, 1)):
        first, sep, second = j.log(rank, "stdout").partition(SEPARATOR)
        assert sep, j.log(rank, "stdout")
        assert "2 worker(s)" in second and f"worker {index} epoch 3 loss" in second  # trained again, in full
        assert f"worker {index} epoch 3 loss" not in first
    metrics = json.loads((j.record / "outputs" / "metrics.json").read_text())
    assert metrics["workers"] == 2 and len(metrics["loss"]) == 3
    wait_no_processes(j.id)
