"""Workspace configuration (tflaunch.config): config.json found from the working directory upwards as the
reference's Workspace.from_config does, the home's own config.json, write_config, index option precedence."""
from __future__ import annotations

import json
import os

import pytest

from tflaunch import Experiment, SpecError, Workspace
from tflaunch.config import find_config, home_config, index_defaults, read_config


def test_from_config_searches_upwards_and_skips_foreign_config_files(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    deep = project / "src" / "model"
    deep.mkdir(parents=True)
    (project / "src" / "config.json").write_text('{"editor": {"tabs": 4}}')  # someone else's file
    (project / "config.json").write_text(json.dumps({"home": "runs-home", "default_datastore": "~/data",
                                                     "find_links": "wheels", "no_index": True}))
    monkeypatch.chdir(deep)
    ws = Workspace.from_config()
    assert ws.home == str(project / "runs-home")
    assert ws.config["find_links"] == [str(project / "wheels")] and ws.config["no_index"] is True
    assert ws.get_default_datastore().root == os.path.expanduser("~/data")
    exp = Experiment(workspace=ws, name="tf-mnist")
    assert exp.workspace is ws and exp.name == "tf-mnist"


def test_dot_tflaunch_and_azureml_locations_and_write_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = Workspace(home=tmp_path / "h").write_config()
    assert written == str(tmp_path / ".tflaunch" / "config.json")
    assert Workspace.from_config().home == str(tmp_path / "h")
    other = tmp_path / "other"
    (other / ".azureml").mkdir(parents=True)
    (other / ".azureml" / "config.json").write_text('{"subscription_id": "x", "workspace_name": "ws1"}')
    ws = Workspace.from_config(path=str(other))
    assert ws.name == "ws1"  # the reference's own file is accepted, its Azure keys ignored
    assert Workspace.from_config(path=str(tmp_path / ".tflaunch" / "config.json")).home == str(tmp_path / "h")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"home": 3}', "home must be a directory path"),
    ('{"find_links": [1]}', "find_links must be a directory or URL"),
    ('{"no_index": "yes"}', "no_index must be true or false"),
    ('{"datastores": {"a": 1}}', "datastores must map names to directories"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / ".tflaunch" / "config.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(SpecError) as info:
        Workspace.from_config(path=str(tmp_path))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_no_config_anywhere_says_how_to_make_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    if find_config(str(empty)) is not None:
        pytest.skip(f"a config.json above {empty} ({find_config(str(empty))})")
    with pytest.raises(SpecError, match=r"no config.json in .* write one with Workspace\(\).write_config\(\)"):
        Workspace.from_config(path=str(empty))
    with pytest.raises(SpecError, match="sign in"):
        Workspace.from_config(path=str(empty), auth=object())


def test_index_options_precedence_home_then_workspace(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"find_links": ["/site/wheels"], "no_index": True,
                                                  "home": "/ignored"}))
    assert home_config(str(home)) == {"find_links": ["/site/wheels"], "no_index": True,
                                      "path": str(home / "config.json")}
    assert index_defaults(str(home)) == {"find_links": ["/site/wheels"], "no_index": True}
    ws_file = tmp_path / "config.json"
    ws_file.write_text(json.dumps({"index_url": "https://pypi.example/simple", "no_index": False}))
    merged = index_defaults(str(home), read_config(str(ws_file)))
    assert merged == {"find_links": ["/site/wheels"], "index_url": "https://pypi.example/simple", "no_index": False}


def test_named_datastores_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"home": "h", "datastores": {"scratch": "/scratch/data"}}))
    ws = Workspace.from_config(path=str(tmp_path))
    from tflaunch.data import Datastore
    assert sorted(ws.datastores) == ["scratch", "workspacefilestore"]
    assert Datastore(ws, "scratch").root == "/scratch/data"
    with pytest.raises(SpecError, match="has no datastore 'nope'"):
        Datastore(ws, "nope")
