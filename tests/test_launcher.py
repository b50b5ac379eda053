"""Launchers (tflaunch.launch.launcher): the table, the choice (the scheduler's, else the distribution's),
and a launcher added by one registration line driving a real run through the interface's methods."""
from __future__ import annotations

import json
import sys

from tflaunch import Estimator, MpiConfiguration, TensorflowConfiguration
from tflaunch.launch import launcher as launcher_mod
from tflaunch.launch.agents import AgentLauncher
from tflaunch.launch.launcher import LAUNCHERS, Launcher, launcher_for
from tflaunch.launch.session import Session
from tflaunch.schedule import scheduler_for
from tflaunch.spec import JobSpec
from tflaunch.submit import SubmitOptions, create_run, prepare
from tflaunch.supervise import Supervisor


def _record(project, home, **kwargs):
    src = project(**{"t.py": "import os; print('rank', os.environ['TFLAUNCH_RANK'])"})
    estimator = Estimator(str(src), entry_script="t.py", python=sys.executable, **kwargs)
    return create_run(prepare(estimator, SubmitOptions(home=str(home))))


def _session(record, target=None):
    spec = JobSpec.from_dict(record.definition()["spec"])
    if target is not None:
        spec.compute_target = target
    return Session(record, spec, scheduler_for(record, spec.compute_target), experiment="default", grace=1,
                   work_dir=record.work_dir, stream=False, stdout=sys.stdout, stderr=sys.stderr)


def test_every_launcher_in_the_table_is_a_launcher():
    import importlib

    for name, where in LAUNCHERS.items():
        module, _, cls = where.partition(":")
        assert issubclass(getattr(importlib.import_module(module), cls), Launcher), name


def test_the_distribution_chooses_outside_an_allocation(project, home):
    assert type(launcher_for(_session(_record(project, home)))).__name__ == "AgentLauncher"
    ps = _record(project, home, distributed_training=TensorflowConfiguration(1, 1))
    assert type(launcher_for(_session(ps))).__name__ == "AgentLauncher"
    mpi = _record(project, home, distributed_training=MpiConfiguration())
    assert type(launcher_for(_session(mpi))).__name__ == "MpirunLauncher"


def test_the_scheduler_chooses_inside_an_allocation(project, home):
    record = _record(project, home)
    allocation = {"kind": "ssh", "source": "SLURM_JOB_NODELIST", "hosts": [["n1", 1]], "launcher": "srun"}
    chosen = launcher_for(_session(record, allocation))
    assert type(chosen).__name__ == "SrunStepLauncher" and chosen.ranks_stop_together
    over_ssh = dict(allocation, launcher="ssh")
    assert type(launcher_for(_session(record, over_ssh))).__name__ == "AgentLauncher"


class RecordingLauncher(AgentLauncher):
    """The agents launcher, saying which of the interface's methods the supervisor called."""

    calls: list[str] = []

    def begin(self):
        self.calls.append("begin")

    def connect(self, log_file, prestarted):
        self.calls.append("connect")
        super().connect(log_file, prestarted)

    def follow(self):
        self.calls.append("follow")

    def start(self, preview):
        self.calls.append(f"start {len(preview)}")
        super().start(preview)

    def on_event(self, run, event):
        if event.get("event") == "exited" and "exited" not in self.calls:
            self.calls.append("exited")
        return super().on_event(run, event)

    def watched(self):
        if "watched" not in self.calls:
            self.calls.append("watched")
        return super().watched()

    def finish(self):
        self.calls.append("finish")

    def close(self):
        self.calls.append("close")


def test_a_new_launcher_is_one_registration_line(project, home, monkeypatch):
    from dataclasses import replace

    from tflaunch.plan import distributions

    monkeypatch.setitem(LAUNCHERS, "recording", "test_launcher:RecordingLauncher")  # the registration line
    monkeypatch.setitem(distributions.DISTRIBUTIONS, "plain",
                        replace(distributions.DISTRIBUTIONS["plain"], launcher="recording"))
    RecordingLauncher.calls.clear()
    record = _record(project, home, process_count_per_node=2)
    sup = Supervisor(record)
    assert type(sup.launcher).__name__ == "RecordingLauncher" and launcher_mod.LAUNCHERS["recording"]
    final = sup.run()
    assert final["status"] == "Completed", final
    assert RecordingLauncher.calls == ["begin", "follow", "connect", "start 2", "watched", "exited", "finish",
                                       "close"]
    processes = json.loads((home / "runs" / record.id / "processes.json").read_text())
    assert [p["rank"] for p in processes] == [0, 1]
