"""`tflaunch models ...` and `Run.register_model` on real runs (the registry itself: test_models.py)."""
from __future__ import annotations

import json

from tflaunch import Experiment, Model, Run
from tflaunch.history.store import Store


def test_register_in_the_script_from_the_api_and_from_the_cli(project, cli, home, tmp_path):
    src = project(**{"train.py": """
        import os
        from tflaunch import Run
        os.makedirs("outputs/model/variables")
        open("outputs/model/saved_model.pb", "wb").write(b"graph")
        open("outputs/model/variables/v.data", "wb").write(b"weights" * 100)
        run = Run.get_context()
        m = run.register_model("tf-dnn-mnist", "outputs/model", tags={"stage": "script"}, description="in job")
        print("registered", m.name, m.version)
    """})
    result = cli("run", "--source-dir", str(src), "train.py", check=True)
    assert "registered tf-dnn-mnist 1" in result.stdout
    run_id = Store(home).list_runs()[0]["id"]

    run = Run(Experiment("default", home=home), run_id)
    second = run.register_model("tf-dnn-mnist", "outputs/model", properties={"acc": 0.9})
    assert second.version == 2 and second.run_id == run_id

    out = cli("models", "register", run_id, "outputs/model", "--name", "tf-dnn-mnist", "--tag", "k=v", check=True)
    assert "registered tf-dnn-mnist:3 (2 files)" in out.stdout
    listed = json.loads(cli("models", "list", "--json", check=True).stdout)
    assert [(m["name"], m["version"]) for m in listed] == [("tf-dnn-mnist", v) for v in (1, 2, 3)]
    assert listed[0]["source_run"] == {"id": run_id, "experiment": "default", "path": "outputs/model"}
    assert listed[0]["tags"] == {"stage": "script"} and listed[2]["tags"] == {"k": "v"}
    assert "tf-dnn-mnist  3" in cli("models", "list", "--latest", check=True).stdout
    shown = json.loads(cli("models", "show", "tf-dnn-mnist:1", "--json", check=True).stdout)
    assert shown["description"] == "in job" and {f["path"] for f in shown["files"]} == {
        "model/saved_model.pb", "model/variables/v.data"}
    assert "model:       tf-dnn-mnist:3" in cli("models", "show", "tf-dnn-mnist", check=True).stdout
    target = cli("models", "download", "tf-dnn-mnist:2", str(tmp_path / "dl"), check=True).stdout.strip()
    assert open(f"{target}/variables/v.data", "rb").read() == b"weights" * 100
    assert Model("tf-dnn-mnist", home=home).version == 3

    for args, message in [
        (("models", "show", "nope"), "no model 'nope'"),
        (("models", "show", "tf-dnn-mnist:9"), "has no version 9"),
        (("models", "show", "tf-dnn-mnist:x"), "version"),
        (("models", "register", run_id, "../../x", "--name", "m"), "'..'"),
        (("models", "register", run_id, "outputs/missing", "--name", "m"), "runs files"),
        (("models", "register", run_id, "outputs/model", "--name", "bad name"), "name"),
        (("models", "download", "tf-dnn-mnist:2", str(tmp_path / "dl")), "exist"),
    ]:
        bad = cli(*args)
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and message in bad.stderr, (args, bad.stderr)
    assert len(json.loads(cli("models", "list", "--json", check=True).stdout)) == 3
