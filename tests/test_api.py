"""The Python API as a user of the Azure ML SDK v1 would write it."""
from __future__ import annotations

import io
import time

import pytest

from tflaunch import Estimator, Experiment, Run, RunFailedError, SpecError, TensorFlow, Workspace


def test_submit_wait_download(project, home, tmp_path):
    src = project(**{"train.py": """
        import os, sys
        print("argv", sys.argv[1:])
        open("outputs/model.keras", "w").write("model")
        print("to stderr", file=sys.stderr)
    """})
    est = Estimator(source_directory=str(src), entry_script="train.py",
                    script_params={"--batch-size": 50, "--learning-rate": 0.01, "--verbose": ""})
    exp = Experiment("tf-mnist", home=home)
    run = exp.submit(est, tags={"team": "a"})
    assert isinstance(run, Run) and run.get_status() in ("Preparing", "Running", "Finalizing", "Completed")
    out, err = io.StringIO(), io.StringIO()
    details = run.wait_for_completion(show_output=True, stdout=out, stderr=err)
    assert details["status"] == "Completed" and details["tags"] == {"team": "a"}
    assert "argv ['--batch-size', '50', '--learning-rate', '0.01', '--verbose']" in out.getvalue()
    assert "to stderr" in err.getvalue()
    assert "outputs/model.keras" in run.get_file_names()
    target = run.download_file("outputs/model.keras", str(tmp_path / "model.keras"))
    assert open(target).read() == "model"
    assert run.download_files("outputs", tmp_path / "dl") == [str(tmp_path / "dl" / "outputs" / "model.keras")]
    same = Run(Experiment(Workspace(home), "tf-mnist"), run.id)
    assert same.get_details()["id"] == run.id
    assert [r.id for r in exp.get_runs()] == [run.id]


def test_failed_run_raises_on_error(project, home):
    src = project(**{"train.py": "import sys; print('boom', file=sys.stderr); sys.exit(2)"})
    run = Experiment("e", home=home).submit(Estimator(str(src), entry_script="train.py"))
    with pytest.raises(RunFailedError, match="exited with code 2") as info:
        run.wait_for_completion()
    assert "boom" in info.value.details["error"]["stderr_tail"]
    assert run.wait_for_completion(raise_on_error=False)["exit_code"] == 2


def test_cancel_and_timeout(project, home):
    src = project(**{"train.py": "import time; time.sleep(60)"})
    run = Experiment("e", home=home).submit(Estimator(str(src), entry_script="train.py"))
    with pytest.raises(TimeoutError):
        run.wait_for_completion(timeout=0.5)
    deadline = time.monotonic() + 10
    while run.get_status() != "Running" and time.monotonic() < deadline:
        time.sleep(0.05)
    run.cancel()
    assert run.wait_for_completion()["status"] == "Canceled"


def test_submit_validates_before_recording(project, home):
    src = project(**{"train.py": ""})
    exp = Experiment("e", home=home)
    with pytest.raises(SpecError, match="submit\\(\\) needs an Estimator"):
        exp.submit({"entry_script": "train.py"})
    with pytest.raises(Exception, match="entry_script: 'nope.py' not found"):
        exp.submit(Estimator(str(src), entry_script="nope.py"))
    assert list(exp.get_runs()) == []


def test_tensorflow_estimator_runs_with_the_installed_tensorflow(project, home):
    pytest.importorskip("tensorflow")
    src = project(**{"train.py": "import tensorflow as tf; print('tf', tf.__version__, int(tf.reduce_sum([1, 2])))"})
    out = io.StringIO()
    run = Experiment("tf", home=home).submit(TensorFlow(str(src), entry_script="train.py", framework_version="2"))
    details = run.wait_for_completion(show_output=True, stdout=out, stderr=io.StringIO())
    assert details["framework"]["tensorflow"]["version"].startswith("2.") and " 3\n" in out.getvalue()


def test_ssh_target_from_python(ssh_loopback, project, tmp_path):
    from tflaunch import Estimator, Experiment, SSHTarget, Workspace
    src = project(**{"train.py": "import os\nprint('rank', os.environ['TFLAUNCH_RANK'], 'of', "
                                 "os.environ['TFLAUNCH_WORLD_SIZE'])\n"})
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# two aliases of one sshd\nloop1 slots=2\nloop2 slots=2")
    target = SSHTarget.from_hostfile(hostfile, ssh_config=ssh_loopback.config)
    estimator = Estimator(src, entry_script="train.py", compute_target=target, node_count=2,
                          process_count_per_node=2)
    run = Experiment(Workspace(str(tmp_path / "home")), "ssh").submit(estimator)
    details = run.wait_for_completion(timeout=60)
    assert details["status"] == "Completed"
    names = [n for n in run.get_file_names() if n.startswith("tflaunch_logs/rank-")]
    assert len([n for n in names if n.endswith(".stdout")]) == 4
