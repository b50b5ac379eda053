"""Planning is pure: spec + run context -> processes with argv, cwd and the environment added."""
from tflaunch.spec.hosts import Host
from tflaunch.plan.processes import RunContext, plan
from tflaunch.spec import Estimator

CTX = RunContext(run_id="20261123-000000-000-00000000", experiment="e", run_dir="/nowhere/runs/r",
                 work_dir="/nowhere/runs/r/work", home="/nowhere")


def test_single_process_plan():
    spec = Estimator("/nowhere/src", entry_script="train.py", script_params={"--lr": 0.1},
                     environment_variables={"A.B": "x\ny", "CUDA_VISIBLE_DEVICES": "0"}, python="/usr/bin/python3").job_spec()
    (p,) = plan(spec, CTX)
    assert p.argv == ["/usr/bin/python3", "train.py", "--lr", "0.1"]
    assert p.cwd == CTX.work_dir and (p.rank, p.local_rank, p.world_size, p.host) == (0, 0, 1, "localhost")
    assert p.env["TFLAUNCH_RUN_ID"] == CTX.run_id and p.env["TFLAUNCH_RUN_DIR"] == CTX.run_dir
    assert p.env["TFLAUNCH_HOME"] == "/nowhere" and p.env["PYTHONUNBUFFERED"] == "1"
    assert (p.env["TFLAUNCH_RANK"], p.env["TFLAUNCH_LOCAL_RANK"], p.env["TFLAUNCH_WORLD_SIZE"]) == ("0", "0", "1")
    assert p.env["A.B"] == "x\ny"
    assert p.env["CUDA_VISIBLE_DEVICES"] == "0"   # the user's explicit value wins
    assert p.stdout == "tflaunch_logs/rank-0.stdout"


def test_gpu_visibility():
    cpu = Estimator("/s", entry_script="t.py").job_spec()
    gpu = Estimator("/s", entry_script="t.py", use_gpu=True).job_spec()
    assert plan(cpu, CTX)[0].env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan(gpu, CTX, gpus={"localhost": ["0", "1"]})[0].env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert plan(gpu, CTX)[0].env["CUDA_VISIBLE_DEVICES"] == "GPUS"  # not known yet (--dry-run, remote host)


def test_ranks_are_host_major():
    spec = Estimator("/s", entry_script="t.py").job_spec()
    spec.node_count, spec.process_count_per_node = 3, 4
    procs = plan(spec, CTX, [Host("a", 4), Host("b", 4), Host("c", 4)])
    assert [p.host for p in procs] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert [(p.rank, p.local_rank) for p in procs][:6] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0), (5, 1)]
    assert {p.world_size for p in procs} == {12}


def test_plan_is_deterministic():
    spec = Estimator("/s", entry_script="t.py", script_params={"--a": 1}).job_spec()
    assert [p.to_dict() for p in plan(spec, CTX)] == [p.to_dict() for p in plan(spec, CTX)]
