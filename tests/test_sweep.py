"""Sweeps end to end (tflaunch.sweep.driver / .submit / .run, cli_sweep): real trials, real processes.

GPUs are simulated (CUDA_VISIBLE_DEVICES given to the driver: no GPU here); everything else is real:
each trial is a run with its own background supervisor, ssh hosts are sshd in network namespaces."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tflaunch import Estimator, Experiment, SSHTarget
from tflaunch.errors import SpecError
from tflaunch.history.store import parse_iso
from tflaunch.sweep import (BanditPolicy, BayesianParameterSampling, GridParameterSampling, HyperDriveConfig,
                            MedianStoppingPolicy, PrimaryMetricGoal, RandomParameterSampling,
                            TruncationSelectionPolicy, choice, uniform)

from conftest import cli_env, pids_with_token

TRAIN = """
    import argparse, json, os, socket, sys, time
    from tflaunch import Run
    p = argparse.ArgumentParser()
    p.add_argument("--x", type=float, default=0.0)
    p.add_argument("--intervals", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.05)
    p.add_argument("--slow-below", type=float, default=None)  # trials with x below this log slowly
    p.add_argument("--fail", type=int, default=0)
    p.add_argument("--curve", default=None)  # "0.1,0.2,0.3": these values, one per interval
    p.add_argument("--linger-below", type=float, default=None)  # a curve below this waits 20 s at its end
    a = p.parse_args()
    run = Run.get_context()
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/seen.json", "w") as fh:
        json.dump({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "host": socket.gethostname(),
                   "hyperparameters": os.environ.get("TFLAUNCH_HYPERPARAMETERS"),
                   "parent": os.environ.get("TFLAUNCH_PARENT_RUN_ID")}, fh)
    if a.fail:
        sys.exit(3)
    values = [float(v) for v in a.curve.split(",")] if a.curve else [a.x] * a.intervals
    for value in values:
        run.log("score", value)
        time.sleep(a.sleep * (4 if a.slow_below is not None and a.x < a.slow_below else 1))
    if a.linger_below is not None and max(values) < a.linger_below:
        time.sleep(20)  # to be judged (and stopped) however late the driver looks
    print("trained", a.x)
"""


@pytest.fixture
def src(project):
    return project(**{"train.py": TRAIN})


def config(src, sampling, *, target=None, script_params=None, **kwargs):
    est = Estimator(str(src), entry_script="train.py", script_params=script_params or {},
                    compute_target=target, **kwargs.pop("estimator", {}))
    kwargs.setdefault("primary_metric_name", "score")
    kwargs.setdefault("primary_metric_goal", PrimaryMetricGoal.MAXIMIZE)
    kwargs.setdefault("max_total_runs", 20)
    return HyperDriveConfig(estimator=est, hyperparameter_sampling=sampling, **kwargs)


def trials_of(home, sweep_id):
    path = Path(home) / "runs" / sweep_id / "sweep.json"
    return json.loads(path.read_text())["trials"] if path.exists() else []  # written once the driver runs


def status_of(home, run_id):
    return json.loads((Path(home) / "runs" / run_id / "status.json").read_text())


def max_overlap(runs, key=lambda r: None):
    """The most runs (with the same key) between their recorded start and end at any moment."""
    events = []
    for r in runs:
        events += [(parse_iso(r["started"]), 1, key(r)), (parse_iso(r["ended"]), -1, key(r))]
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same millisecond
    live, top = {}, 0
    for _, delta, k in events:
        live[k] = live.get(k, 0) + delta
        top = max(top, live[k])
    return top


def no_processes(run_ids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(pids_with_token(r) for r in run_ids):
        assert time.monotonic() < deadline, "processes left behind"
        time.sleep(0.1)


def test_grid_of_six_runs_exactly_six_never_more_than_two_at_once(src, home):
    cfg = config(src, GridParameterSampling({"--x": choice(1, 2, 3), "--intervals": choice(2, 3)}),
                 script_params={"--sleep": 0.2}, max_concurrent_runs=2, slots=4)
    sweep = Experiment("tune", home=home).submit(cfg)
    details = sweep.wait_for_completion(timeout=120)
    assert details["status"] == "Completed" and details["kind"] == "sweep"
    children = sweep.get_children()
    assert len(children) == 6
    runs = [c.get_details() for c in children]
    assert all(r["status"] == "Completed" and r["parent"] == sweep.id for r in runs)
    combos = sorted((r["hyperparameters"]["--x"], r["hyperparameters"]["--intervals"]) for r in runs)
    assert combos == [(x, n) for x in (1, 2, 3) for n in (2, 3)]
    assert max_overlap(runs) <= 2
    # the trials see their hyperparameters as arguments and in the environment
    seen = json.loads((Path(runs[0]["run_dir"]) / "outputs" / "seen.json").read_text())
    assert json.loads(seen["hyperparameters"]) == runs[0]["hyperparameters"] and seen["parent"] == sweep.id
    assert "--x" in runs[0]["arguments"]
    best = sweep.get_best_run_by_primary_metric()
    assert best.get_details()["hyperparameters"]["--x"] == 3
    ranked = sweep.get_children_sorted_by_primary_metric()
    assert [json.loads(r["hyperparameters"])["--x"] for r in ranked][:2] == [3, 3]
    assert set(sweep.get_metrics()) == {c.id for c in children}
    assert details["sweep"]["best"]["value"] == 3 and details["sweep"]["counts"] == {"Completed": 6}
    page = Path(sweep.get_portal_url()[len("file://"):]).read_text()
    assert all(c.id in page for c in children) and "hyperparameter --x" in page


def test_bandit_stops_the_trial_far_behind_and_records_why(src, home, cli):
    cfg = config(src, GridParameterSampling({"--x": choice(0.9, 0.1)}),
                 script_params={"--intervals": 30, "--sleep": 0.05, "--slow-below": 0.5},
                 policy=BanditPolicy(evaluation_interval=1, slack_factor=0.1, delay_evaluation=2),
                 max_concurrent_runs=2, slots=2)
    sweep = Experiment("tune", home=home).submit(cfg)
    assert sweep.wait_for_completion(timeout=120)["status"] == "Completed"
    trials = {t["hyperparameters"]["--x"]: t for t in sweep.get_trials()}
    good, bad = trials[0.9], trials[0.1]
    assert good["status"] == "Completed" and good["stopped"] is None and good["intervals"] == 30
    assert bad["status"] == "Canceled" and bad["intervals"] < 30
    decision = bad["stopped"]
    assert decision["policy"] == "BanditPolicy" and decision["interval"] >= 2
    assert decision["value"] == pytest.approx(0.1) and decision["best"] == pytest.approx(0.9)
    assert decision["threshold"] == pytest.approx(0.9 / 1.1) and decision["best_run_id"] == good["run_id"]
    shown = json.loads(cli("runs", "show", bad["run_id"], "--json", check=True).stdout)
    assert shown["status"] == "Canceled" and "stopped by BanditPolicy" in shown["cancel_reason"]
    assert shown["early_termination"]["threshold"] == pytest.approx(0.9 / 1.1)
    events = [json.loads(line) for line in (Path(shown["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "early_terminated" and e["policy"] == "BanditPolicy" for e in events)
    no_processes([good["run_id"], bad["run_id"]])
    table = cli("sweep", "show", sweep.id, check=True).stdout
    assert "stopped by BanditPolicy at interval" in table and "best:" in table


CURVES = {"a": "0.9,0.9,0.9,0.9", "b": "0.5,0.7,0.95,0.95", "c": "0.1,0.2,0.3,0.4", "d": "0.6,0.8,0.96,0.97"}


@pytest.mark.parametrize("policy", [MedianStoppingPolicy(delay_evaluation=3), TruncationSelectionPolicy(34)])
def test_median_and_truncation_stop_the_expected_trial_of_crafted_curves(src, home, policy):
    """One trial at a time (so each is judged against the earlier ones' whole curves, at its own interval):
    median at interval 3 (running averages .9 .717 .2 -> median .717) and truncation at interval 1 (the
    worst 34% of 3 trials: one) stop trial c only; b, behind a, and d, behind a at first, survive both."""
    cfg = config(src, GridParameterSampling({"--curve": choice(*CURVES.values())}), policy=policy,
                 script_params={"--sleep": 0.1, "--linger-below": 0.5}, max_concurrent_runs=1)
    sweep = Experiment("tune", home=home).submit(cfg)
    assert sweep.wait_for_completion(timeout=120)["status"] == "Completed"
    by_curve = {name: t for name, curve in CURVES.items() for t in sweep.get_trials()
                if t["hyperparameters"]["--curve"] == curve}
    assert {name: t["status"] for name, t in by_curve.items()} == {"a": "Completed", "b": "Completed",
                                                                    "c": "Canceled", "d": "Completed"}
    decision = by_curve["c"]["stopped"]
    assert decision["policy"] == policy.name
    if isinstance(policy, MedianStoppingPolicy):
        assert decision["interval"] == 3 and decision["median"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
        assert decision["value"] == pytest.approx(0.3)
    else:
        assert decision["interval"] == 1 and (decision["rank"], decision["trials"]) == (3, 3)


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_driver_sigkill_then_resume_accounts_for_every_trial_once(src, home, cli, cli_popen):
    result = cli("sweep", "-d", "--param=--x=choice(1, 2, 3, 4, 5, 6)", "--sampling", "grid",
                 "--primary-metric", "score", "--goal", "maximize", "--max-total-runs", "6",
                 "--max-concurrent-runs", "2", "--slots", "2", "--source-dir", str(src), "train.py", "--",
                 "--intervals", "20", "--sleep", "0.25", check=True)
    sweep_id = result.stdout.strip()
    record = Path(home) / "runs" / sweep_id
    # two trials running, a third not yet started: kill the driver, and one trial's own supervisor
    def two_running():
        trials = trials_of(home, sweep_id)
        running = [t for t in trials if t["status"] == "Running" and status_of(home, t["run_id"]).get("started")]
        return running if len(trials) == 2 and len(running) == 2 else None

    running = _wait(two_running, what="two running trials")
    driver = json.loads((record / "lease.json").read_text())["pid"]
    os.kill(driver, signal.SIGKILL)
    victim, survivor = running
    os.kill(json.loads((Path(home) / "runs" / victim["run_id"] / "lease.json").read_text())["pid"], signal.SIGKILL)
    parent = _wait(lambda: (json.loads(cli("runs", "show", sweep_id, "--json").stdout) or None), what="the sweep")
    _wait(lambda: json.loads(cli("runs", "show", sweep_id, "--json").stdout)["status"] == "Failed",
          what="the sweep recorded Failed (driver lost)")
    parent = json.loads(cli("runs", "show", sweep_id, "--json").stdout)
    assert parent["error"]["reason"] == "launcher_lost"
    resumed = cli("sweep", "resume", sweep_id, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "adopted" in resumed.stdout and "to be replaced" in resumed.stdout
    trials = trials_of(home, sweep_id)
    counted = [t for t in trials if t["status"] != "Lost"]
    assert sorted(t["hyperparameters"]["--x"] for t in counted) == [1, 2, 3, 4, 5, 6]  # each once
    assert all(t["status"] == "Completed" for t in counted)
    lost = [t for t in trials if t["status"] == "Lost"]
    assert [t["run_id"] for t in lost] == [victim["run_id"]]
    replacement = trials[lost[0]["replaced_by"]]
    assert replacement["hyperparameters"] == victim["hyperparameters"] and replacement["replaces"] == lost[0]["index"]
    assert [t for t in trials if t["run_id"] == survivor["run_id"]][0]["adopted"] is True
    final = json.loads(cli("runs", "show", sweep_id, "--json").stdout)
    assert final["status"] == "Completed" and final["error"] is None
    children = json.loads(cli("runs", "list", "--parent", sweep_id, "--json").stdout)
    assert len(children) == 7 and {c["id"] for c in children} == {t["run_id"] for t in trials}
    events = [json.loads(line)["event"] for line in (record / "events.jsonl").read_text().splitlines()]
    assert "resumed" in events
    no_processes([t["run_id"] for t in trials])
    again = cli("sweep", "resume", sweep_id)
    assert again.returncode != 0 and "ended Completed" in again.stderr


def test_sweep_over_two_ssh_hosts_with_one_slot_each(netns_hosts, src, home):
    target = SSHTarget(hosts=["h1:1", "h2:1"], ssh_config=netns_hosts.config)
    cfg = config(src, GridParameterSampling({"--x": choice(1, 2, 3, 4)}), target=target,
                 script_params={"--intervals": 4, "--sleep": 0.2}, max_concurrent_runs=4)
    sweep = Experiment("tune", home=home).submit(cfg)
    assert sweep.wait_for_completion(timeout=180)["status"] == "Completed"
    runs = [c.get_details() for c in sweep.get_children()]
    assert len(runs) == 4 and all(r["status"] == "Completed" for r in runs)
    hosts = []
    for r in runs:
        spec = json.loads((Path(r["run_dir"]) / "run.json").read_text())["spec"]
        assert len(spec["compute_target"]["hosts"]) == 1
        hosts.append(spec["compute_target"]["hosts"][0][0])
        seen = json.loads((Path(r["run_dir"]) / "outputs" / "seen.json").read_text())
        assert seen["host"] == hosts[-1]
        r["on"] = hosts[-1]
    assert set(hosts) == {"h1", "h2"}
    assert max_overlap(runs, key=lambda r: r["on"]) == 1  # never two trials on one host
    assert max_overlap(runs) <= 2


def test_local_gpus_are_shared_out_between_trials(src, home, cli):
    """Four (simulated) GPUs, two per trial: at most two trials at once, each with its own pair."""
    env = cli_env(home, CUDA_VISIBLE_DEVICES="0,1,2,3")
    result = cli("sweep", "--param=--x=choice(1, 2, 3, 4)", "--sampling", "grid", "--primary-metric", "score",
                 "--goal", "maximize", "--max-total-runs", "4", "--slots", "8", "--gpu", "--gpus-per-node", "2",
                 "--source-dir", str(src), "train.py", "--", "--intervals", "4", "--sleep", "0.2", env=env,
                 timeout=180)
    assert result.returncode == 0, result.stderr
    sweep_id = [line for line in result.stderr.splitlines() if "sweep " in line][0].split()[2]
    runs = [json.loads(cli("runs", "show", t["run_id"], "--json").stdout) for t in trials_of(home, sweep_id)]
    for r in runs:
        r["gpus"] = json.loads((Path(r["run_dir"]) / "outputs" / "seen.json").read_text())["cuda"]
    assert {r["gpus"] for r in runs} <= {"0,1", "2,3"}
    assert max_overlap(runs) <= 2 and max_overlap(runs, key=lambda r: r["gpus"]) == 1


def test_failed_trials_are_recorded_and_fail_the_sweep_only_when_all_fail(src, home):
    exp = Experiment("tune", home=home)
    mixed = exp.submit(config(src, GridParameterSampling({"--fail": choice(0, 1, 0)}), max_concurrent_runs=1))
    assert mixed.wait_for_completion(timeout=120)["status"] == "Completed"
    assert sorted(t["status"] for t in mixed.get_trials()) == ["Completed", "Completed", "Failed"]
    failed = [t for t in mixed.get_trials() if t["status"] == "Failed"][0]
    assert failed["error"]["reason"] == "exit_code"
    broken = exp.submit(config(src, RandomParameterSampling({"--x": uniform(0, 1)}, seed=1),
                               script_params={"--fail": 1}, max_total_runs=10, max_concurrent_runs=1))
    details = broken.wait_for_completion(timeout=120, raise_on_error=False)
    assert details["status"] == "Failed" and details["error"]["reason"] == "trials_failed"
    assert len(broken.get_trials()) == 3  # it stops after the first three failures
    assert broken.get_best_run_by_primary_metric() is None


def test_cancel_a_sweep_cancels_its_running_trials(src, home, cli):
    sweep_id = cli("sweep", "-d", "--param", "x=uniform(0, 1)", "--primary-metric", "score", "--goal", "maximize",
                   "--max-total-runs", "10", "--max-concurrent-runs", "2", "--slots", "2", "--source-dir", str(src),
                   "train.py", "--", "--intervals", "100", "--sleep", "0.1", check=True).stdout.strip()
    _wait(lambda: sum(t["status"] == "Running" for t in trials_of(home, sweep_id)) == 2, what="two trials running")
    result = cli("sweep", "cancel", sweep_id, "--wait", timeout=60)
    assert result.returncode == 0 and "Canceled" in result.stdout
    trials = trials_of(home, sweep_id)
    assert len(trials) == 2 and all(t["status"] == "Canceled" for t in trials)
    assert all(status_of(home, t["run_id"])["status"] == "Canceled" for t in trials)
    assert "canceled with `tflaunch sweep cancel`" in status_of(home, sweep_id)["cancel_reason"]
    no_processes([t["run_id"] for t in trials] + [sweep_id])


def test_ctrl_c_on_an_attached_sweep_cancels_it_and_its_trials(src, home, cli_popen):
    proc = cli_popen("sweep", "--param", "x=uniform(0, 1)", "--primary-metric", "score", "--goal", "maximize",
                     "--max-total-runs", "4", "--max-concurrent-runs", "2", "--slots", "2", "--source-dir", str(src),
                     "train.py", "--", "--intervals", "100", "--sleep", "0.1")
    sweep_id = _wait(lambda: next((p.name for p in (Path(home) / "runs").glob("2*")
                                   if status_of(home, p.name).get("kind") == "sweep"), None)
                     if (Path(home) / "runs").is_dir() else None, what="the sweep")
    _wait(lambda: sum(t["status"] == "Running" for t in trials_of(home, sweep_id)) == 2, what="two trials running")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "canceling sweep" in err.decode() and "Canceled" in err.decode()
    assert status_of(home, sweep_id)["status"] == "Canceled"
    trials = trials_of(home, sweep_id)
    assert all(status_of(home, t["run_id"])["status"] == "Canceled" for t in trials)
    no_processes([t["run_id"] for t in trials])


def test_max_duration_cancels_what_runs(src, home):
    cfg = config(src, RandomParameterSampling({"--x": uniform(0, 1)}, seed=2), max_duration_minutes=0.05,
                 script_params={"--intervals": 200, "--sleep": 0.1}, max_concurrent_runs=2, slots=2)
    sweep = Experiment("tune", home=home).submit(cfg)
    details = sweep.wait_for_completion(timeout=120, raise_on_error=False)
    assert details["status"] == "Failed" and details["error"]["reason"] == "timeout"
    assert all(t["status"] == "Canceled" for t in sweep.get_trials())
    assert all("max_duration_minutes (0.05) reached" in c.get_details()["cancel_reason"] for c in sweep.get_children())


def test_bayesian_sweep_with_optuna_end_to_end(src, home):
    pytest.importorskip("optuna")
    cfg = config(src, BayesianParameterSampling({"--x": uniform(0, 1), "--intervals": choice(1, 2)}, seed=4),
                 max_total_runs=4, max_concurrent_runs=2, slots=2)
    sweep = Experiment("tune", home=home).submit(cfg)
    assert sweep.wait_for_completion(timeout=180)["status"] == "Completed"
    trials = sweep.get_trials()
    assert len(trials) == 4 and all(t["status"] == "Completed" for t in trials)
    assert all(set(t["sampler_values"]) == {"--x", "--intervals"} for t in trials)
    assert sweep.get_best_run_by_primary_metric().id == max(trials, key=lambda t: t["best"])["run_id"]


def test_sweep_from_a_config_file_then_show_list_and_report(src, home, cli, tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({
        "experiment": "tune-file",
        "estimator": {"source_directory": "proj", "entry_script": "train.py", "script_params": {"--intervals": 2}},
        "hyperparameter_sampling": {"kind": "random", "seed": 5,
                                    "parameter_space": {"--x": "uniform(0, 10)", "--sleep": "choice(0.01, 0.02)"}},
        "primary_metric_name": "score", "primary_metric_goal": "minimize",
        "policy": {"kind": "median", "delay_evaluation": 5},
        "max_total_runs": 3, "max_concurrent_runs": 2, "slots": 2}))
    result = cli("sweep", "--config", str(tmp_path / "sweep.json"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "trial 2" in result.stdout and "Completed: best trial" in result.stdout
    listed = json.loads(cli("runs", "list", "--experiment", "tune-file", "--json", check=True).stdout)
    sweep = [r for r in listed if r.get("kind") == "sweep"][0]
    assert len([r for r in listed if r.get("parent") == sweep["id"]]) == 3
    state = json.loads(cli("sweep", "show", sweep["id"], "--json", check=True).stdout)
    assert state["config"]["primary_metric_goal"] == "minimize" and state["config"]["policy"]["kind"] == \
        "MedianStoppingPolicy"
    best = min((t for t in state["trials"]), key=lambda t: t["best"])
    assert state["summary"]["best"]["run_id"] == best["run_id"]
    table = cli("runs", "list", "--experiment", "tune-file", check=True).stdout
    assert "sweep (3 trials)" in table and f"{sweep['id'][-8:]}#0" in table
    report = cli("runs", "report", sweep["id"], "--output", str(tmp_path / "r.html"), check=True)
    html = Path(report.stdout.strip()).read_text()
    assert "hyperparameter --x" in html and "best score" in html and best["run_id"] in html


def test_dry_run_shows_the_first_trials_and_writes_nothing(src, home, cli):
    result = cli("sweep", "--dry-run", "--json", "--param", "lr=choice(0.1, 0.01)", "--param", "b=choice(16, 32)",
                 "--sampling", "grid", "--primary-metric", "acc", "--goal", "maximize", "--max-total-runs", "10",
                 "--source-dir", str(src), "train.py", "--", "--intervals", "1", check=True)
    plan = json.loads(result.stdout)
    assert plan["space_size"] == 4 and len(plan["first_trials"]) == 4
    assert plan["first_trials"][1]["arguments"] == ["--intervals", "1", "--lr", "0.1", "--b", "32"]
    assert not (Path(home) / "runs").exists() or not list((Path(home) / "runs").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--param", "x=uniform(0, 1)", "--goal", "maximize", "--max-total-runs", "2"], "primary_metric_name must be"),
    (["--param", "x=uniform(0, 1)", "--primary-metric", "a", "--goal", "maximize", "--max-total-runs", "0"],
     "max_total_runs: must be an integer 1-1000"),
    (["--param", "x=uniform(0, 1)", "--primary-metric", "a", "--goal", "maximize", "--max-total-runs", "2",
      "--max-concurrent-runs", "101"], "max_concurrent_runs: must be an integer 1-100"),
    (["--param", "x=beta(0, 1)", "--primary-metric", "a", "--goal", "maximize", "--max-total-runs", "2"],
     "unknown parameter expression 'beta'"),
    (["--param", "x", "--primary-metric", "a", "--goal", "maximize", "--max-total-runs", "2"], "expected NAME=EXPR"),
    (["--param", "x=uniform(0, 1)", "--sampling", "bayesian", "--policy", "bandit", "--slack-factor", "0.1",
      "--primary-metric", "a", "--goal", "maximize", "--max-total-runs", "2"], "does not support early termination"),
    (["--param", "x=uniform(0, 1)", "--slack-factor", "0.1", "--primary-metric", "a", "--goal", "maximize",
      "--max-total-runs", "2"], "--slack-factor goes with --policy"),
    (["--param", "x=uniform(0, 1)", "--sampling", "grid", "--primary-metric", "a", "--goal", "maximize",
      "--max-total-runs", "2"], "grid sampling takes choice"),
])
def test_bad_sweeps_are_one_line_errors(src, cli, args, message):
    result = cli("sweep", *args, "--source-dir", str(src), "train.py")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_errors_for_what_is_not_a_sweep(src, home, cli, tmp_path):
    run_id = cli("run", "-d", "--source-dir", str(src), "train.py", check=True).stdout.strip()
    for action in ("show", "cancel", "resume"):
        result = cli("sweep", action, run_id)
        assert result.returncode == 2 and "is not a sweep" in result.stderr
    (tmp_path / "bad.json").write_text('{"estimator": {}, "colour": 1}')
    result = cli("sweep", "--config", str(tmp_path / "bad.json"))
    assert result.returncode == 2 and "unknown key 'colour'" in result.stderr
    result = cli("sweep", "--config", str(tmp_path / "bad.json"), "--hosts", "a,b")
    assert result.returncode == 2 and "--hosts cannot be added to it" in result.stderr


def test_the_references_arguments_tflaunch_cannot_honour_are_one_line_errors(src):
    est = Estimator(str(src), entry_script="train.py")
    sampling = RandomParameterSampling({"--x": uniform(0, 1)})
    base = dict(estimator=est, hyperparameter_sampling=sampling, primary_metric_name="score",
                primary_metric_goal=PrimaryMetricGoal.MAXIMIZE, max_total_runs=2)
    for name in ("run_config", "pipeline", "resume_from", "resume_child_runs", "custom_run_id"):
        with pytest.raises(SpecError, match=f"HyperDriveConfig\\({name}=...\\)"):
            HyperDriveConfig(**base, **{name: object()})
    with pytest.raises(SpecError, match="primary_metric_goal"):
        HyperDriveConfig(**{**base, "primary_metric_goal": "up"})
    with pytest.raises(SpecError, match="estimator=Estimator"):
        HyperDriveConfig(**{**base, "estimator": None})
