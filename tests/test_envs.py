"""Job environments (tflaunch.envs, tflaunch.remote.envbuild): real builds with the real pip and uv, offline,
from wheelhouses made in the tests (tests/infra/wheels.py), real concurrent processes, real SIGKILLs,
a real full disk (a small tmpfs, as root)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, _skip_or_fail
from tests.infra.wheels import make_wheel
from tflaunch.remote import envbuild as _envbuild
from tflaunch import envs
from tflaunch.envs import (EnvRequest, IndexOptions, builder_command, ensure_environment, find_environment,
                           is_built, list_environments, parse_builder_output, parse_requirements,
                           read_requirements_file, remove_environment, request_environment)
from tflaunch.errors import EnvBuildError, EnvBusyError, EnvNotFoundError, SpecError

BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def house(tmp_path_factory) -> Path:
    """A wheelhouse: tfl-x 1.0 and 2.0, tfl-y 1.0 (needs tfl-x>=1), tfl-z 1.0, tfl-tool (a console script)."""
    house = tmp_path_factory.mktemp("house")
    make_wheel(house, "tfl-x", "1.0")
    make_wheel(house, "tfl-x", "2.0")
    make_wheel(house, "tfl-y", "1.0", requires=["tfl-x>=1"])
    make_wheel(house, "tfl-z", "1.0")
    make_wheel(house, "tfl-tool", "1.0", scripts={"tfl-tool": "tfl_tool:main"})
    return house


@pytest.fixture(scope="module")
def parent(tmp_path_factory, house) -> Path:
    """A virtualenv with tfl-x 1.0 installed (the job's interpreter, itself a venv, as usual)."""
    venv = tmp_path_factory.mktemp("parent") / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--isolated", "--no-index", "--find-links", str(house), "tfl-x==1.0"],
                   check=True, env={**env, "PIP_CONFIG_FILE": os.devnull})
    return venv


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "envs"


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="session")
def uv_bin() -> str:
    found = envs.find_uv()
    if not found:
        _skip_or_fail("uv is not installed (pip install uv; `make test` installs it with the dev extra)")
    return found


def offline(house: Path) -> IndexOptions:
    return IndexOptions(find_links=[str(house)], no_index=True)


def request(parent: Path, house: Path, home: Path, *packages: str, **kwargs) -> EnvRequest:
    req = request_environment(str(parent / "bin" / "python"), pip_packages=packages, index=offline(house),
                              home=str(home), **kwargs)
    assert req is not None
    return req


def run_in(python: str, code: str) -> str:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# -- requirements and index options --------------------------------------------------------------------------
def test_requirements_are_normalized_deduplicated_and_sorted():
    assert parse_requirements(["Foo_Bar [X, a] >= 1.0 , <2", "keras", "Keras", "numpy<2 ; python_version<'3.12'"]) == [
        "foo-bar[a,x]<2,>=1.0", "keras", 'numpy<2; python_version < "3.12"']
    assert parse_requirements(["tensorflow-cpu==2.15.*", "a.b_c~=1.0"]) == ["a-b-c~=1.0", "tensorflow-cpu==2.15.*"]


@pytest.mark.parametrize("bad", ["numpy>>2", "foo bar", "numpy==", "[x]", "pkg; python_version <", ""])
def test_unparsable_requirement_is_a_one_line_spec_error(bad):
    with pytest.raises(SpecError) as info:
        parse_requirements([bad])
    message = str(info.value)
    assert "\n" not in message and message.startswith("pip_packages:") and repr(bad) in message


@pytest.mark.parametrize("vcs", ["git+https://github.com/org/pkg.git", "pkg @ git+https://github.com/org/pkg.git",
                                 "pkg @ https://example.com/pkg-1.0-py3-none-any.whl", "hg+https://x/y"])
def test_vcs_and_url_requirements_are_refused(vcs):
    with pytest.raises(SpecError) as info:
        parse_requirements([vcs])
    message = str(info.value)
    assert "\n" not in message and "VCS or URL" in message and "wheel" in message and "--find-links" in message


def test_local_wheel_requirement_and_its_content_in_the_key(parent, house, home, tmp_path):
    wheel = make_wheel(tmp_path / "local", "tfl-local", "1.0")
    req = request(parent, house, home, str(wheel))
    assert req.requirements == [f"tfl-local @ file://{wheel}"]
    assert req.local_files == {str(wheel): hashlib.sha256(wheel.read_bytes()).hexdigest()}
    key = req.key
    make_wheel(tmp_path / "local", "tfl-local", "1.0", module_source="VALUE = 2\n")  # same name, new content
    assert request(parent, house, home, str(wheel)).key != key
    with pytest.raises(SpecError, match="no such file"):
        parse_requirements([str(tmp_path / "nowhere-1.0-py3-none-any.whl")])


def test_requirements_file(tmp_path):
    (tmp_path / "more.txt").write_text("tfl-z==1.0  # pinned\n")
    req = tmp_path / "requirements.txt"
    req.write_text("# the job's packages\n\nKeras>=3 \\\n  ,<4\n-r more.txt\nnumpy<2 ; python_version < '3.13'\n")
    assert read_requirements_file(str(req)) == ["keras<4,>=3", 'numpy<2; python_version < "3.13"', "tfl-z==1.0"]
    for line, hint in [("--find-links /x", "use --find-links DIR"), ("-i https://x/simple", "use --index-url URL"),
                       ("--extra-index-url https://x", "--index-url"), ("--no-index", "use --no-index"),
                       ("-e ./src", "wheel"), ("keras --hash=sha256:abc", "--hash"), ("--pre", "not supported")]:
        req.write_text(f"keras\n{line}\n")
        with pytest.raises(SpecError) as info:
            read_requirements_file(str(req))
        assert "\n" not in str(info.value) and "line 2" in str(info.value) and hint in str(info.value), str(info.value)
    req.write_text("-r requirements.txt\n")
    with pytest.raises(SpecError, match="includes itself"):
        read_requirements_file(str(req))


def test_index_options(tmp_path):
    cfg = IndexOptions.from_mapping({"find_links": "wheels", "no_index": True}, base_dir=str(tmp_path))
    assert cfg == IndexOptions([str(tmp_path / "wheels")], None, True)
    assert IndexOptions.from_mapping({"find_links": ["/a", "https://h/w/"], "index_url": "https://i/simple"}).to_dict() \
        == {"find_links": ["/a", "https://h/w/"], "index_url": "https://i/simple", "no_index": False}
    explicit = IndexOptions(find_links=["/b"])
    assert cfg.overridden_by(explicit) == IndexOptions(["/b"], None, True)
    assert cfg.overridden_by(IndexOptions(index_url="https://i/simple")) == IndexOptions(cfg.find_links, "https://i/simple", False)
    assert IndexOptions.layered({"no_index": True, "find_links": ["/h"]}, {}, {"no_index": False}) == IndexOptions(["/h"])
    with pytest.raises(SpecError, match="find_links"):
        IndexOptions.from_mapping({"find_links": 3})


# -- keys ------------------------------------------------------------------------------------------------------
def test_key_is_stable_and_sensitive(parent, house, home, tmp_path):
    python = str(parent / "bin" / "python")
    one = request(parent, house, home, "tfl-y", "tfl-x")
    assert request(parent, house, home, "tfl-x", "TFL_Y").key == one.key  # order, spelling
    assert EnvRequest.from_dict(json.loads(json.dumps(one.to_dict()))).key == one.key
    others = [
        request(parent, house, home, "tfl-y"),
        request(parent, house, home, "tfl-y", "tfl-x==1.0"),
        request(parent, house, home, "tfl-y", "tfl-x", inherit=False),
        request_environment(python, pip_packages=["tfl-x", "tfl-y"], index=IndexOptions([str(tmp_path)], None, True),
                            home=str(home)),
        request_environment(python, pip_packages=["tfl-x", "tfl-y"], index=IndexOptions([str(house)]), home=str(home)),
        request_environment(VENV_PYTHON, pip_packages=["tfl-x", "tfl-y"], index=offline(house), home=str(home)),
    ]
    keys = {r.key for r in others}
    assert len(keys) == len(others) and one.key not in keys
    # where the wheelhouse is on the building host does not change the key
    argv = builder_command(sys.executable, one, str(tmp_path / "r"), find_links_here=["/elsewhere"])
    assert argv[:4] == [sys.executable, "-I", "-S", "-c"] and json.loads(argv[5])["key"] == one.key
    assert request_environment(python, home=str(home)) is None  # nothing asked


# -- build, reuse, uv vs pip, inheritance ------------------------------------------------------------------------
def test_build_then_reuse_without_a_subprocess(parent, house, home, root):
    req = request(parent, house, home, "tfl-z")
    first = ensure_environment(req, str(root), builder="pip")
    assert first.built and first.builder == "pip" and first.freeze == ["tfl-z==1.0"]
    assert first.path == str(root / req.short_key) and Path(first.python).exists()
    assert run_in(first.python, "import tfl_z, tfl_x; print(tfl_z.__version__, tfl_x.__version__)") == "1.0 1.0"
    record = json.loads((root / req.short_key / "env.json").read_text())
    assert record["key"] == req.key and record["request"] == req.to_dict() and record["freeze"] == ["tfl-z==1.0"]
    assert (root / req.short_key / "freeze.txt").read_text() == "tfl-z==1.0\n"
    # reuse: no builder process at all (a builder interpreter that does not exist would fail)
    again = ensure_environment(req, str(root), python="/nonexistent/python")
    assert not again.built and again.python == first.python and again.freeze == first.freeze
    assert not [n for n in os.listdir(root) if n.startswith((".build-", ".trash-"))]


def builders(request) -> str:
    if request.param == "uv":
        request.getfixturevalue("uv_bin")
    return request.param


@pytest.fixture(params=["pip", "uv"])
def builder(request) -> str:
    """Each builder in turn (the uv case fails under TFLAUNCH_TEST_REQUIRE_HOSTS=1 when uv is missing)."""
    return builders(request)


def test_parent_packages_are_seen_and_not_reinstalled(builder, parent, house, home, tmp_path):
    """The parent venv has tfl-x 1.0; the env asks for tfl-x and tfl-y (which needs tfl-x): neither pip nor
    uv installs tfl-x into the env (uv is told what the parent has)."""
    req = request(parent, house, home, "tfl-x", "tfl-y")
    result = ensure_environment(req, str(tmp_path / builder), builder=builder)
    assert result.builder == builder and result.freeze == ["tfl-y==1.0"]
    site = Path(json.loads((Path(result.path) / "env.json").read_text())["site_packages"][0])
    assert sorted(p.name for p in site.iterdir()) == ["_tflaunch_parent.pth", "tfl_y", "tfl_y-1.0.dist-info"]
    assert run_in(result.python, "import tfl_x, tfl_y; print(tfl_x.__file__)").startswith(str(parent))


def test_uv_and_pip_give_the_same_key_freeze_and_packages(parent, house, home, tmp_path, uv_bin):
    req = request(parent, house, home, "tfl-x>=2", "tfl-y", "tfl-tool")  # the parent's tfl-x 1.0 is too old
    by_pip = ensure_environment(req, str(tmp_path / "pip"), builder="pip")
    by_uv = ensure_environment(req, str(tmp_path / "uv"), builder="uv")
    assert by_pip.key == by_uv.key == req.key
    assert (by_pip.builder, by_uv.builder) == ("pip", "uv")
    assert by_pip.freeze == by_uv.freeze == ["tfl-tool==1.0", "tfl-x==2.0", "tfl-y==1.0"]
    for result in (by_pip, by_uv):
        assert run_in(result.python, "import tfl_x, tfl_y; print(tfl_x.__version__)") == "2.0"  # its own first
        # the console script was written in the staging dir and works at the final path
        tool = subprocess.run([str(Path(result.path) / "bin" / "tfl-tool")], capture_output=True, text=True)
        assert tool.returncode == 0 and tool.stdout.strip() == "tfl-tool 1.0", tool.stderr
        assert ".build-" not in (Path(result.path) / "bin" / "activate").read_text()


def test_no_inherit_does_not_see_the_parent(parent, house, home, root):
    req = request(parent, house, home, "tfl-y", inherit=False)
    assert not req.inherit and req.parent_site == []
    result = ensure_environment(req, str(root), builder="pip")
    assert result.freeze == ["tfl-x==2.0", "tfl-y==1.0"]
    assert run_in(result.python, "import tfl_x; print(tfl_x.__file__)").startswith(result.path)


def test_ambient_pip_and_uv_configuration_is_ignored(builder, parent, house, home, root, tmp_path, monkeypatch):
    """PIP_FIND_LINKS, UV_FIND_LINKS, PIP_CONFIG_FILE and a pip.conf in the env's own prefix all point at a
    wheelhouse holding tfl-ambient; a --no-index build from `house` must not see it (this machine also sets
    PIP_FIND_LINKS=/opt/wheels and an extra index in /etc/pip.conf)."""
    ambient = tmp_path / "ambient"
    make_wheel(ambient, "tfl-ambient", "1.0")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {ambient}\nextra-index-url = file://{ambient}\n")
    for name, value in {"PIP_FIND_LINKS": str(ambient), "UV_FIND_LINKS": str(ambient), "PIP_CONFIG_FILE": str(conf),
                        "UV_INDEX_URL": f"file://{ambient}", "PIP_NO_INDEX": "0", "UV_CONFIG_FILE": str(conf)}.items():
        monkeypatch.setenv(name, value)
    req = request(parent, house, home, "tfl-ambient")
    with pytest.raises(EnvBuildError, match=f"^no wheel for 'tfl-ambient' in --no-index wheelhouse {house}"):
        ensure_environment(req, str(root), builder=builder)


def test_roots():
    assert envs.home_envs_root("/h") == "/h/envs"
    assert envs.node_envs_root("/scratch") == f"/scratch/tflaunch-{os.getuid()}/envs"


def test_builder_runs_with_a_bare_python_and_a_wheelhouse_seen_elsewhere(parent, house, home, tmp_path):
    """What a host without tflaunch does: the builder's source on the command line of a bare Python, with the
    wheelhouse at another path there (find_links_here); same key, env.json says what was used."""
    copy = tmp_path / "shipped-house"
    shutil.copytree(house, copy)
    req = request(parent, house, home, "tfl-z")
    argv = builder_command(BASE_PYTHON, req, str(tmp_path / "node"), builder="pip", find_links_here=[str(copy)])
    out = subprocess.run(argv, capture_output=True, cwd="/", env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                         timeout=120)
    result = parse_builder_output(out.stdout)
    assert out.returncode == 0 and result.built and result.key == req.key
    record = json.loads((Path(result.path) / "env.json").read_text())
    assert record["find_links_used"] == [str(copy)] and record["request"]["index"]["find_links"] == [str(house)]


def test_parse_builder_output():
    with pytest.raises(EnvBuildError, match="^no wheel for 'x'"):
        parse_builder_output(b"log\n" + _envbuild.ERROR_MARK.encode() + b'{"message": "no wheel for \'x\'"}\n')
    with pytest.raises(EnvBuildError, match="without a result; its last words: boom"):
        parse_builder_output(b"boom\n")
    ok = {"key": "k", "path": "/p", "python": "/p/bin/python", "built": True, "builder": "uv", "seconds": 1.5,
          "freeze": ["a==1"], "horovod": None}
    assert parse_builder_output(("x\n" + _envbuild.RESULT_MARK + json.dumps(ok) + "\n").encode()).to_dict() == ok


# -- concurrency, kills, locks ---------------------------------------------------------------------------------
_CALLER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from tflaunch.envs import EnvRequest, ensure_environment
req = EnvRequest.from_dict(json.loads(sys.argv[2]))
with open(sys.argv[4], "wb") as log:
    result = ensure_environment(req, sys.argv[3], log=log, builder="pip")
print(json.dumps(result.to_dict()))
'''


def test_four_concurrent_processes_build_once(parent, house, home, tmp_path):
    big = tmp_path / "bighouse"
    shutil.copytree(house, big)
    make_wheel(big, "tfl-big", "1.0", payload_mb=40)  # installing it takes a moment: the others must wait
    req = request(parent, big, home, "tfl-big", "tfl-z")
    root = tmp_path / "envs"
    procs = [subprocess.Popen([sys.executable, "-c", _CALLER, str(REPO), json.dumps(req.to_dict()), str(root),
                               str(tmp_path / f"log{i}")], stdout=subprocess.PIPE, text=True) for i in range(4)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    logs = [(tmp_path / f"log{i}").read_text() for i in range(4)]
    assert sum(r["built"] for r in results) == 1
    assert sum("$ " in log and "pip install" in log for log in logs) == 1  # pip ran once
    assert len({(r["path"], r["python"], tuple(r["freeze"])) for r in results}) == 1
    assert results[0]["freeze"] == ["tfl-big==1.0", "tfl-z==1.0"]
    assert sorted(os.listdir(root / ".locks" / req.short_key)) == ["00000001"]


def test_sigkill_mid_build_leaves_nothing_in_use_and_the_next_call_rebuilds(parent, house, home, tmp_path):
    big = tmp_path / "bighouse"
    shutil.copytree(house, big)
    make_wheel(big, "tfl-big", "1.0", payload_mb=300)
    req = request(parent, big, home, "tfl-big")
    root = tmp_path / "envs"
    argv = builder_command(sys.executable, req, str(root), builder="pip")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    mid = None
    while mid is None and time.monotonic() < deadline:  # pip is unpacking the 300 MB wheel into the staging dir
        for staging in root.glob(f".build-{req.short_key}-*"):
            if list(staging.glob("lib/python*/site-packages/tfl_big")):
                mid = staging
        time.sleep(0.01)
    assert mid is not None, "the build never got under way"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / req.short_key).exists() and not is_built(str(root), req.key)
    assert [e["status"] for e in list_environments(str(root))] == ["broken"]  # the interrupted build shows
    result = ensure_environment(req, str(root), builder="pip")  # the dead builder's lock is taken over at once
    assert result.built and result.freeze == ["tfl-big==1.0"]
    assert run_in(result.python, "import tfl_big, os; print(os.path.getsize(tfl_big.__path__[0] + '/payload.bin'))") \
        == str(300 * 1024 * 1024)
    assert not list(root.glob(".build-*")) and sorted(os.listdir(root / ".locks" / req.short_key)) == ["00000002"]


def test_sigkill_of_the_caller_lets_the_builder_finish(parent, house, home, tmp_path):
    """The launcher (ensure_environment's process) dies mid-build: its builder subprocess goes on, and the next
    caller waits for it and gets its environment (built=False), complete."""
    big = tmp_path / "bighouse"
    shutil.copytree(house, big)
    make_wheel(big, "tfl-big", "1.0", payload_mb=150)
    req = request(parent, big, home, "tfl-big", "tfl-z")
    root = tmp_path / "envs"
    caller = subprocess.Popen([sys.executable, "-c", _CALLER, str(REPO), json.dumps(req.to_dict()), str(root),
                               str(tmp_path / "log")], stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(root.glob(f".build-{req.short_key}-*/tflaunch-requirements.txt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    caller.kill()  # the caller only, not its builder
    caller.wait()
    assert not is_built(str(root), req.key)
    result = ensure_environment(req, str(root), builder="pip")
    assert not result.built and result.freeze == ["tfl-big==1.0", "tfl-z==1.0"]
    assert run_in(result.python, "import tfl_big, tfl_z; print('ok')") == "ok"


def _lock_record(pid: int, **extra) -> dict:
    return {**_envbuild.local_identity(), "pid": pid, "pid_start": _envbuild.process_start_time(pid),
            "state": "held", "heartbeat": time.time(), "started": _envbuild.now_iso(), **extra}


def _hold(root: Path, short: str, record: dict, gen: int = 1) -> Path:
    path = root / ".locks" / short / ("%08d" % gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_stale_lock_of_a_dead_pid_is_taken_over(parent, house, home, root, monkeypatch):
    req = request(parent, house, home, "tfl-z", "tfl-x")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _hold(root, req.short_key, _lock_record(dead.pid, pid_start="1"))
    # a heartbeat timeout that never passes: only seeing that the owner's pid is gone lets the builder in
    monkeypatch.setenv("TFLAUNCH_ENV_LOCK_TIMEOUT", "100000")
    result = ensure_environment(req, str(root), builder="pip")
    assert result.built


def test_lock_of_a_live_process_makes_others_wait(parent, house, home, root):
    req = request(parent, house, home, "tfl-z", "tfl-y")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = _hold(root, req.short_key, _lock_record(holder.pid, heartbeat=time.time() - 3600))  # old beat: same host
        done: list = []
        waiter = threading.Thread(target=lambda: done.append(ensure_environment(req, str(root), builder="pip")))
        waiter.start()
        time.sleep(2.5)
        assert waiter.is_alive() and not done and not is_built(str(root), req.key)
        assert [e["status"] for e in list_environments(str(root))] == ["building"]
        with pytest.raises(EnvBusyError, match=f"being built by pid {holder.pid}"):
            remove_environment(str(root), req.short_key[:6])
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "state": "released"}))
        waiter.join(timeout=120)
        assert done and done[0].built
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_another_machine_is_stale_only_without_heartbeat(parent, house, home, root):
    req = request(parent, house, home, "tfl-x==2.0")
    other = {"host": "node-elsewhere", "boot_id": "b", "pidns": "pid:[1]", "pid": 4242, "pid_start": "7",
             "state": "held", "started": _envbuild.now_iso()}
    lock = _hold(root, req.short_key, {**other, "heartbeat": time.time() + 3600})  # alive (it beats)
    with pytest.raises(EnvBuildError) as info:
        ensure_environment(req, str(root), builder="pip", timeout=1.5)
    assert "timed out" in str(info.value) and "pid 4242 on node-elsewhere" in str(info.value)
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 3600}))
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    assert ensure_environment(req, str(root), builder="pip").built


_GRAB = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from tflaunch.remote.envbuild import Lock
lock = Lock(sys.argv[2], sys.argv[3])
while time.time() < float(sys.argv[4]):
    pass
print(lock.try_acquire())
time.sleep(1)
'''


def test_two_waiters_never_both_take_over_a_stale_lock(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    short = "ab" * 10
    _hold(tmp_path, short, _lock_record(dead.pid, pid_start="1"))
    at = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", _GRAB, str(REPO), str(tmp_path), short, str(at)],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    answers = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(answers) == ["False"] * 5 + ["True"]


# -- failures ----------------------------------------------------------------------------------------------------
def test_missing_package_with_no_index_names_it(builder, parent, house, home, root):
    req = request(parent, house, home, "tfl-x", "tfl-missing")
    with pytest.raises(EnvBuildError) as info:
        ensure_environment(req, str(root), builder=builder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"no wheel for 'tfl-missing' in --no-index wheelhouse {house}")
    assert not is_built(str(root), req.key) and not list(root.glob(".build-*"))
    assert list_environments(str(root)) == []


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        _skip_or_fail("mounting a small tmpfs needs root")
    path = tmp_path / "small"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]).returncode != 0:
        _skip_or_fail("cannot mount a tmpfs here")
    yield path
    subprocess.run(["umount", "-l", str(path)])


def test_disk_full_during_a_build(builder, parent, house, home, tmp_path, small_disk):
    big = tmp_path / "bighouse"
    shutil.copytree(house, big)
    make_wheel(big, "tfl-big", "1.0", payload_mb=8)  # does not fit in 4 MB
    req = request(parent, big, home, "tfl-big")
    root = small_disk / "envs"
    with pytest.raises(EnvBuildError) as info:
        ensure_environment(req, str(root), builder=builder)
    assert str(info.value) == f"No space left on device while building environment {req.short_key} in {root}"
    assert not is_built(str(root), req.key) and not list(root.glob(".build-*"))
    assert list_environments(str(root)) == []  # the lock is released, nothing half-built is listed
    small = request(parent, house, home, "tfl-z")  # the same root still works for what fits
    assert ensure_environment(small, str(root), builder=builder).built


def test_framework_version_the_interpreter_has_adds_nothing(home, house):
    if not Path(VENV_PYTHON).exists():
        pytest.skip(".venv is not built (make test builds it)")
    assert request_environment(VENV_PYTHON, framework_version="2.21", home=str(home)) is None
    req = request_environment(VENV_PYTHON, framework_version="2.21", pip_packages=["tfl-z"], index=offline(house),
                              home=str(home))
    assert req.framework is None and req.inherit and req.requirements == ["tfl-z"]


def test_framework_version_not_available_for_this_python_from_the_wheelhouse(parent, home, tmp_path):
    house = tmp_path / "tfhouse"
    for version in ("2.15.1", "2.16.2", "2.21.0"):
        make_wheel(house, "tensorflow-cpu", version)
    with pytest.raises(SpecError) as info:
        request_environment(str(parent / "bin" / "python"), framework_version="1.13", index=offline(house),
                            home=str(home))
    message = str(info.value)
    assert "\n" not in message and "TensorFlow 1.13" in message and str(parent / "bin" / "python") in message
    assert "Python 3." in message and str(house) in message and "this Python (tensorflow, tensorflow-cpu): 2.15, 2.16, 2.21" in message


def test_framework_version_not_available_from_the_table_when_no_index_answers(parent, home):
    index = IndexOptions(index_url="http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(SpecError) as info:
        request_environment(str(parent / "bin" / "python"), framework_version="1.13", index=index, home=str(home))
    message = str(info.value)
    assert "TensorFlow 1.13 has no release" in message and "3.5, 3.6, 3.7" in message and "2.15" in message


def test_framework_version_1_13_refused_with_what_the_index_has(home):
    """The real index (PyPI) is asked what it has for this Python."""
    python = BASE_PYTHON
    try:
        import urllib.request
        urllib.request.urlopen("https://pypi.org/simple/", timeout=10).close()
    except OSError as exc:
        pytest.skip(f"PyPI is not reachable: {exc}")
    with pytest.raises(SpecError) as info:
        request_environment(python, framework_version="1.13", home=str(home))
    message = str(info.value)
    assert "TensorFlow 1.13 (tensorflow)" in message and "https://pypi.org/simple" in message
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]}" in message and "2.15" in message


def test_framework_environment_from_a_wheelhouse_and_no_index_question_once_built(parent, home, tmp_path):
    """framework_version='2.15' where the interpreter has no TensorFlow: tensorflow-cpu==2.15.* and TF 2.15's
    pins, without the parent's packages. (Stand-in wheels under TensorFlow's names: the real 2.15 environment is
    test_horovod_environment_reuses_the_cached_wheel.) Once built, the wheelhouse is not asked again."""
    house = tmp_path / "tfhouse"
    for name, version in [("tensorflow-cpu", "2.15.1"), ("numpy", "1.26.4"), ("protobuf", "4.25.3"),
                          ("ml-dtypes", "0.3.2"), ("numpy", "2.1.0"), ("tfl-z", "1.0")]:
        make_wheel(house, name, version)
    req = request_environment(str(parent / "bin" / "python"), framework_version="2.15", pip_packages=["tfl-z"],
                              index=offline(house), home=str(home))
    assert req.framework["requirements"] == ["tensorflow-cpu==2.15.*", "numpy<2", "protobuf<5", "ml-dtypes~=0.3.1"]
    assert not req.inherit and req.parent_site == []
    root = tmp_path / "envs"
    result = ensure_environment(req, str(root), builder="pip")
    assert result.freeze == ["ml-dtypes==0.3.2", "numpy==1.26.4", "protobuf==4.25.3", "tensorflow-cpu==2.15.1",
                             "tfl-z==1.0"]
    for wheel in house.glob("tensorflow_cpu-*"):
        wheel.unlink()  # asking the wheelhouse now would fail
    again = request_environment(str(parent / "bin" / "python"), framework_version="2.15", pip_packages=["tfl-z"],
                                index=offline(house), home=str(home), root=str(root))
    assert again.key == req.key
    with pytest.raises(SpecError, match="not available"):
        request_environment(str(parent / "bin" / "python"), framework_version="2.15", index=offline(house),
                            home=str(home), root=str(root))


def test_conda_packages_without_conda_is_a_spec_error(parent, home, tmp_path):
    with pytest.raises(SpecError) as info:
        request_environment(str(parent / "bin" / "python"), conda_packages=["numpy=1.26"], home=str(home),
                            env={"PATH": str(tmp_path)})
    message = str(info.value)
    assert "\n" not in message and "conda_packages" in message and "pip_packages" in message


_STAND_IN_CONDA = """#!/bin/sh
# stand-in conda: `create -y -p PREFIX python=X.Y PKG...` makes PREFIX a venv of the base Python
echo "$@" >> "$(dirname "$0")/calls.log"
[ "$1" = create ] || exit 2
shift
while [ $# -gt 0 ]; do
    case $1 in -p) prefix=$2; shift 2 ;; *) shift ;; esac
done
exec {python} -m venv --without-pip "$prefix"
"""


def test_conda_packages_with_a_stand_in_conda(parent, house, home, tmp_path, monkeypatch):
    """A mock only for what cannot exist here: conda, mamba and micromamba are not installable on this machine
    (not on PyPI, not in Debian 12, conda-forge unreachable). The stand-in `conda` makes the prefix with venv;
    tflaunch's side (key, lock, in-place build, pip packages with the prefix's Python, env.json) is real."""
    bindir = tmp_path / "condabin"
    bindir.mkdir()
    (bindir / "conda").write_text(_STAND_IN_CONDA.format(python=BASE_PYTHON))
    (bindir / "conda").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    req = request_environment(str(parent / "bin" / "python"), conda_packages=["numpy=1.26"], pip_packages=["tfl-z"],
                              index=offline(house), home=str(home))
    assert req.kind == "conda" and req.conda_tool == str(bindir / "conda") and not req.inherit
    root = tmp_path / "envs"
    result = ensure_environment(req, str(root), builder="pip")
    assert result.builder == "conda" and result.freeze == ["tfl-z==1.0"] and result.path == str(root / req.short_key)
    assert json.loads((root / req.short_key / "env.json").read_text())["tools"] == "conda + pip"
    version = ".".join(req.python_version.split(".")[:2])
    assert (bindir / "calls.log").read_text().split() == ["create", "-y", "-p", result.path, f"python={version}",
                                                          "numpy=1.26", "--offline"]
    assert run_in(result.python, "import tfl_z; print(tfl_z.__version__)") == "1.0"
    assert not ensure_environment(req, str(root)).built


# -- list, show, remove ------------------------------------------------------------------------------------------
def test_list_find_and_remove(parent, house, home, root):
    a = ensure_environment(request(parent, house, home, "tfl-z"), str(root), builder="pip")
    b = ensure_environment(request(parent, house, home, "tfl-x==2.0"), str(root), builder="pip")
    entries = {e["key"]: e for e in list_environments(str(root))}
    assert set(entries) == {a.key, b.key} and {e["status"] for e in entries.values()} == {"ready"}
    assert entries[a.key]["packages"] == ["tfl-z"] and entries[a.key]["size"] > 0 and entries[a.key]["last_used"]
    assert find_environment(str(root), a.key[:8])["path"] == a.path
    assert find_environment(str(root), a.key)["key"] == a.key
    other = next(c for c in "0123456789abcdef" if not a.key.startswith(c) and not b.key.startswith(c))
    with pytest.raises(EnvNotFoundError, match=f"no environment '{other}'"):
        find_environment(str(root), other)
    with pytest.raises(EnvNotFoundError, match="invalid environment key"):
        find_environment(str(root), "../x")
    removed = remove_environment(str(root), a.key[:10])
    assert removed["key"] == a.key and not Path(a.path).exists()
    assert [e["key"] for e in list_environments(str(root))] == [b.key]
    os.unlink(Path(b.path) / "env.json")  # broken: never used, listed as broken, removable
    assert [e["status"] for e in list_environments(str(root))] == ["broken"]
    req_b = request(parent, house, home, "tfl-x==2.0")
    assert not is_built(str(root), req_b.key)
    remove_environment(str(root), b.key[:6])
    assert list_environments(str(root)) == []


# -- Horovod -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_horovod_environment_reuses_the_cached_wheel(tmp_path, home):
    """framework_version='2.15' + horovod with the Open MPI 5 of build/mpi/openmpi: TensorFlow 2.15.1 from PyPI,
    Horovod from the wheel `make horovod` put in the cache through the same recipe (no compile here)."""
    mpirun = REPO / "build" / "mpi" / "openmpi" / "bin" / "mpirun"
    if not mpirun.exists():
        _skip_or_fail("build/mpi/openmpi is not built (make mpi-envs)")
    from tflaunch.plan.mpirun import detect

    install = detect(str(mpirun))
    mpi = {"flavour": install.flavour, "version": install.version, "bin": str(mpirun.parent)}
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    cache = _envbuild.horovod_cache_dir("0.28.1", "2.15.1", tag, mpi)
    if not _envbuild.cached_wheel(cache, "0.28.1"):
        _skip_or_fail(f"no cached Horovod wheel in {cache} (make horovod builds it)")
    req = request_environment(BASE_PYTHON, framework_version="2.15", pip_packages=["horovod"], mpi=mpi,
                              home=str(home))
    assert req.horovod == {"version": "0.28.1", "requirement": "horovod==0.28.1", "mpi": mpi}
    assert req.framework["requirements"][0] == "tensorflow-cpu==2.15.*"
    log = tmp_path / "build.log"
    with open(log, "wb") as fh:
        result = ensure_environment(req, str(tmp_path / "envs"), log=fh)
    text = log.read_text()
    assert result.built and result.horovod["compiled"] is False and "reusing the cached wheel" in text
    assert "pip wheel" not in text
    assert "horovod==0.28.1" in result.freeze and "tensorflow-cpu==2.15.1" in result.freeze
    env = {**os.environ, "PATH": f"{mpirun.parent}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2",
           "OMPI_MCA_btl": "self,sm,tcp"}
    out = subprocess.run([result.python, "-c", "import horovod.tensorflow.keras as hvd; hvd.init(); print(hvd.size())"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "1", out.stderr[-2000:]
