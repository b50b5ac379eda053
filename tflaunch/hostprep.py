"""Making every host ready before any process of a run starts: data mounts checked, ``--setup`` lines,
the job's environment, the preflight version check, data downloads.

Each phase runs on every host at once, through the host's agent (``exec``: a helper process whose output
comes back over the connection into ``tflaunch_logs/<phase>-<node>.log``, and to the console when the
run is attached), and is waited for on every host before the next one starts; the first phase that fails
on a host fails the run with its reason, naming the host:

1. ``data``: every host has each mounted input (the agent says so in its hello);
2. ``setup``: the ``--setup`` lines, in one shell (bash when the host has it, else sh); the environment the
   shell leaves is what the host's processes start from (``module load cuda`` takes effect);
3. ``environment``: the job's environment (:mod:`tflaunch.envs`): built once under the home, which every
   host that sees it shares (concurrent builders wait for the one that builds), and built in node-local
   scratch on a host that does not see the home, from the same request (wheelhouses it cannot see are
   sent to it first);
4. ``preflight``: with several hosts, TensorFlow (and Keras, Horovod, mpi4py) must be the same on all of
   them (``--no-preflight`` skips it);
5. ``data`` again: downloads are copied on each host into node-local scratch, from its own view of the
   path when it has one, else streamed from the launcher; the agents remove them when the run ends.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time

from . import data, tail
from .store import LOG_DIR

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .launch.hostrun import HostRun
    from .supervise import Supervisor

__all__ = ["HostPrep", "PrepFailure", "setup_script", "ENV_LOG"]

log = logging.getLogger(__name__)

ENV_LOG = f"{LOG_DIR}/environment.log"  # the launcher's own view of the environment (reuse or build)
HOME_PROBE = ".tflaunch-home-probe"
TAIL_LINES = 15


class PrepFailure(Exception):
    """A host could not be made ready: the run ends Failed with ``reason``."""

    def __init__(self, reason: str, message: str, tail_text: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.tail = tail_text


def setup_script(lines: list[str]) -> str:
    """The ``--setup`` lines as one shell script: each line must succeed (the first that does not ends the
    script with its status, naming it); at the end the environment is written to ``$TFLAUNCH_ENV_OUT`` by
    the agent's Python (``$TFLAUNCH_SETUP_PYTHON``), for the processes to start from."""
    parts = ['trap \'__tflaunch_rc=$?; [ "$__tflaunch_rc" -eq 0 ] || echo "tflaunch: --setup line $__tflaunch_line '
             'exited with status $__tflaunch_rc" >&2\' EXIT']  # also when a line itself calls exit
    for i, line in enumerate(lines, 1):
        parts.append(f"__tflaunch_line={i}")
        parts.append(line)
        parts.append('__tflaunch_rc=$?; [ "$__tflaunch_rc" -eq 0 ] || exit "$__tflaunch_rc"')
    parts.append("trap - EXIT")
    parts.append('exec "$TFLAUNCH_SETUP_PYTHON" -I -S -c "import json,os,sys; '
                 'json.dump(dict(os.environ), open(sys.argv[1], \'w\'))" "$TFLAUNCH_ENV_OUT"')
    return "\n".join(parts) + "\n"


_SETUP_FAILED = re.compile(r"^tflaunch: --setup line (\d+) exited with status (\d+)$")

# bash when the host has it (what `module` and most `source env.sh` files expect), else sh
_SHELL = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$TFLAUNCH_SETUP"; else exec sh -c "$TFLAUNCH_SETUP"; fi'


class HostPrep:
    """The preparation phases of one :class:`~tflaunch.supervise.Supervisor`'s hosts."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.spec = sup.spec
        self.env_request: Any = None
        if self.spec.environment:
            from .envs import EnvRequest
            self.env_request = EnvRequest.from_dict(self.spec.environment)
        self.home_result: Any = None  # the environment under the home, when already known here
        self.pythons: dict[str, str] = {}
        self.data_paths: dict[str, dict[str, str]] = {}
        self.results: dict[str, Any] = {}  # host -> EnvResult
        self.status_fields: dict[str, Any] = {}  # for the run object: environment, inputs (written with Running)
        self.builder = (self.spec.packages or {}).get("builder") or "auto"
        self._probe: dict[str, str] | None = None
        self._shipped: set[str] = set()  # hosts that were sent the wheelhouses
        self._logs: dict[tuple[str, str], Any] = {}
        self._followed: set[str] = set()  # log files already shown on the console
        self._partial: dict[tuple[str, str], bytes] = {}  # an environment log's unfinished line
        self._markers: dict[str, list[bytes]] = {}  # host -> the builder's result line

    # -- what the agents are told at setup ------------------------------------------------------------
    @property
    def needed(self) -> bool:
        """Whether the hosts need the slow path (their agents' help) before the processes start."""
        if self.spec.setup_commands or self.spec.inputs:
            return True
        return self.env_request is not None and self.home_result is None

    def home_envs_root(self) -> str:
        from .envs import home_envs_root
        return home_envs_root(self.sup.record.store.home)

    def reuse_home_environment(self) -> Any:
        """The environment under the home if it is built already (cheap: nothing is started); else None."""
        if self.env_request is None:
            return None
        from . import envs

        root = self.home_envs_root()
        if not envs.is_built(root, self.env_request.key):
            return None
        with open(self.sup.record.path(ENV_LOG), "ab") as fh:
            self.home_result = envs.ensure_environment(self.env_request, root, log=fh)
        return self.home_result

    def setup_fields(self, run: HostRun) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.env_request is not None and not run.conn.local:
            if self._probe is None:
                root = self.home_envs_root()
                os.makedirs(root, exist_ok=True)
                path = os.path.join(root, f"{HOME_PROBE}-{self.sup.record.id}")
                content = f"{self.sup.record.id} {os.urandom(8).hex()}"
                with open(path, "w") as fh:
                    fh.write(content)
                self._probe = {"path": path, "content": content}
            fields["home_probe"] = self._probe
        paths = sorted({p for item in self.spec.inputs for p in item["paths"]} | set(self._local_links()))
        if paths:
            fields["paths"] = paths
        if self.sup.target.get("keep_remote"):
            fields["keep"] = True
        if self.spec.preflight and len({h.name for h in self.sup.hosts}) > 1:
            from .doctor import report_request
            fields["report"] = report_request(self.spec.python)
        return fields

    def forget_probe(self) -> None:
        if self._probe is not None:
            try:
                os.unlink(self._probe["path"])
            except OSError:
                pass
            self._probe = None

    # -- the phases -------------------------------------------------------------------------------------
    def run(self, runs: list[HostRun]) -> bool:
        """Every phase on ``runs``; False if the run was stopped meanwhile. Raises PrepFailure."""
        self.forget_probe()
        self._check_mounts(runs)
        for phase in (self._setup, self._environment, self._preflight, self._downloads):
            if not phase(runs) or self.sup.stop_reason:
                return False
        return True

    def _check_mounts(self, runs: list[HostRun]) -> None:
        for item in self.spec.inputs:
            if item["mode"] != data.MOUNT:
                continue
            path = item["paths"][0]
            lacking = [run.name for run in runs if not (run.hello.get("paths") or {}).get(path)]
            if lacking:
                raise PrepFailure("data", f"input {item['name']!r}: {path} does not exist on host"
                                          f"{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}")

    def _exec_all(self, phase: str, commands: dict[str, dict[str, Any]], runs: list[HostRun], what: str) -> bool:
        """Run one helper process per host (``commands``: host -> exec command) and wait for them all."""
        for run in runs:
            cmd = commands.get(run.name)
            if cmd is None:
                continue
            run.execs.pop(cmd["id"], None)
            self._follow(phase, run)
            run.conn.send({"cmd": "exec", **cmd})
        ids = {run.name: commands[run.name]["id"] for run in runs if run.name in commands}
        return self.sup._wait(lambda: all(i in r.execs for r in runs for i in [ids.get(r.name)] if i), None, what)

    def _log_path(self, phase: str, run: HostRun) -> str:
        return f"{LOG_DIR}/{phase}-{run.node}.log"

    def _follow(self, phase: str, run: HostRun) -> None:
        path = self.sup.record.path(self._log_path(phase, run))
        if path in self._followed:
            return
        self._followed.add(path)
        open(path, "ab").close()
        if self.sup.stream:
            self.sup._followers.append(tail.Follower(path, self.sup.stderr, prefix=f"[{phase} {run.name}] "))

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """Handle an ``exec_output``/``exec_done`` event; True if it was one."""
        kind = event.get("event")
        if kind == "exec_output":
            self._write(run, str(event.get("id", "")).split(":")[0], event.get("data") or b"")
            return True
        if kind == "exec_done":
            phase = str(event["id"]).split(":")[0]
            self._write(run, phase, b"", final=True)
            run.execs[str(event["id"])] = event
            return True
        return False

    def _write(self, run: HostRun, phase: str, chunk: bytes, final: bool = False) -> None:
        """Into the phase's log, but for the builder's result line (kept apart: it is no one's reading)."""
        key = (run.name, phase)
        fh = self._logs.get(key)
        if fh is None:
            fh = self._logs[key] = open(self.sup.record.path(self._log_path(phase, run)), "ab", buffering=0)
        if phase != "environment":
            fh.write(chunk)
            return
        text = self._partial.pop(key, b"") + chunk
        lines = text.split(b"\n")
        rest = lines.pop()
        if final and rest:
            lines.append(rest)
        elif rest:
            self._partial[key] = rest
        for line in lines:
            if line.startswith(b"TFLAUNCH_ENV_"):
                self._markers.setdefault(run.name, []).append(line)
            else:
                fh.write(line + b"\n")

    def close(self) -> None:
        for fh in self._logs.values():
            fh.close()
        self._logs.clear()
        self.forget_probe()

    def _tail(self, phase: str, run: HostRun) -> str:
        data_ = tail.tail_bytes(self.sup.record.path(self._log_path(phase, run)), 8000)
        lines = data_.decode("utf-8", "replace").replace("\r", "\n").splitlines()
        return "\n".join(lines[-TAIL_LINES:])

    def _failed(self, phase: str, runs: list[HostRun], exec_id: str) -> list[HostRun]:
        return [run for run in runs if exec_id in run.execs and run.execs[exec_id].get("returncode") != 0]

    def _setup(self, runs: list[HostRun]) -> bool:
        lines = self.spec.setup_commands
        if not lines:
            return True
        script = setup_script(lines)
        commands = {run.name: {"id": "setup", "argv": ["/bin/sh", "-c", _SHELL], "capture_env": True,
                               "cwd": run.work_dir or self.sup.work_dir,
                               "env": {"TFLAUNCH_SETUP": script,
                                       "TFLAUNCH_SETUP_PYTHON": run.hello.get("executable") or self.spec.python}}
                    for run in runs}
        started = time.monotonic()
        if not self._exec_all("setup", commands, runs, "to run the --setup lines"):
            return False
        self.sup.record.event("setup", seconds=round(time.monotonic() - started, 3),
                              hosts=[run.name for run in runs])
        failed = self._failed("setup", runs, "setup")
        if failed:
            run = failed[0]
            done = run.execs["setup"]
            text = self._tail("setup", run)
            found = next((m for m in map(_SETUP_FAILED.match, reversed(text.splitlines())) if m), None)
            if found and 0 < int(found.group(1)) <= len(lines):
                why = f"--setup line {found.group(1)} exited with status {found.group(2)}: {lines[int(found.group(1)) - 1]}"
            else:
                why = done.get("error") or f"exited with status {done['returncode']}"
            others = f" (also on {', '.join(r.name for r in failed[1:])})" if len(failed) > 1 else ""
            raise PrepFailure("setup", f"--setup failed on host {run.name}{others}: {why}", text)
        return True

    def _environment(self, runs: list[HostRun]) -> bool:
        """Build (or reuse) the job's environment: the one under the home is built from this machine (the
        one most likely to reach the package index; its hosts may not), every host that sees the home uses
        it, and each host that does not builds its own copy at the same time."""
        request = self.env_request
        if request is None:
            return True
        from . import envs
        from .errors import TflaunchError

        sharing = [run for run in runs if run.conn.local or run.hello.get("home_shared")]
        builders: list[tuple[HostRun, str, list[str] | None]] = []  # (agent, root, wheelhouses there)
        here = None
        if sharing and self.home_result is None:
            here, made = self._launcher_agent(runs)
            if here is None:
                return False
            builders.append((here, self.home_envs_root(), None))
        for run in runs:
            if run not in sharing:
                builders.append((run, envs.node_envs_root(self.sup.target.get("remote_scratch")),
                                 self._ship_wheelhouses(run)))
        started = time.monotonic()
        try:
            commands = {}
            for run, root, links in builders:
                python = sys.executable if run is here else self.spec.python
                argv = envs.builder_command(python, request, root, find_links_here=links, builder=self.builder,
                                            uv=envs.find_uv() if run.conn.local else None)
                commands[run.name] = {"id": "environment", "argv": argv, "cwd": "/"}
            agents = [run for run, _, _ in builders]
            if agents and not self._exec_all("environment", commands, agents, "to build the job's environment"):
                return False
            for run in agents:
                output = b"\n".join(self._markers.get(run.name) or [b"(no result)"])
                try:
                    result = envs.parse_builder_output(output)
                except TflaunchError as exc:  # EnvBuildError: the builder's one line
                    where = "this machine" if run is here and run.launcher_only else f"host {run.name}"
                    raise PrepFailure("environment", f"building the job's environment on {where} failed: {exc}",
                                      self._tail("environment", run)) from None
                if run is here:
                    self.home_result = result
                else:
                    self.results[run.name] = result
        finally:
            if here is not None and here.launcher_only:
                here.conn.close()
                self.sup.runs.remove(here)
        for run in sharing:
            self.results[run.name] = self.home_result
        if builders:
            self.sup.record.event("environment", seconds=round(time.monotonic() - started, 3),
                                  built={("(this machine)" if r is here and r.launcher_only else r.name):
                                         (self.home_result if r is here else self.results[r.name]).built
                                         for r, _, _ in builders})
        for run in runs:
            self.pythons[run.name] = self.results[run.name].python
        return True

    def _launcher_agent(self, runs: list[HostRun]) -> tuple[HostRun | None, bool]:
        """An agent on this machine to build through: the run's own when this machine is one of its hosts,
        else one started for it (its builder dies with it if tflaunch is killed)."""
        local = next((run for run in runs if run.conn.local), None)
        if local is not None:
            return local, False
        from .launch import AgentConnection
        from .launch.local import spawn_agent
        from .launch.hostrun import ORPHAN_GRACE, HostRun

        sup = self.sup
        with open(sup.record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
            run = HostRun("(this machine)", len(sup.runs), AgentConnection(spawn_agent(agent_log), "localhost"))
        run.launcher_only = True
        sup.runs.append(run)
        run.conn.start({"token": sup.record.id, "agent_id": "environment", "grace": sup.grace,
                        "orphan_grace": ORPHAN_GRACE})
        if not sup._wait(lambda: bool(run.hello), time.monotonic() + 60, "to start"):
            run.conn.close()
            sup.runs.remove(run)
            return None, True
        return run, True

    def _local_links(self) -> list[str]:
        """The environment's wheelhouses that are directories (URLs are fetched by each host itself)."""
        if self.env_request is None:
            return []
        index = self.env_request.to_dict().get("index") or {}
        return [x for x in index.get("find_links") or [] if "://" not in x and not x.startswith("file:")]

    def wheelhouses(self, runs: list[HostRun]) -> list[tuple[str, str]]:
        """(name in the job's files, directory) of the wheelhouses that hosts getting a copy of the job's
        files cannot see themselves: they travel with the files (``.tflaunch-wheels/N``)."""
        links = self._local_links()
        lacking = [run for run in runs if any(not (run.hello.get("paths") or {}).get(d) for d in links)]
        self._shipped = {run.name for run in lacking}
        return [(f".tflaunch-wheels/{i}", d) for i, d in enumerate(links) if os.path.isdir(d)] if lacking else []

    def _ship_wheelhouses(self, run: HostRun) -> list[str] | None:
        """The wheelhouses as a host that could not see them has them (sent with the job's files)."""
        if run.name not in self._shipped or not run.work_dir:
            return None
        return [os.path.join(run.work_dir, ".tflaunch-wheels", str(i)) for i in range(len(self._local_links()))]

    def _preflight(self, runs: list[HostRun]) -> bool:
        if not self.spec.preflight or len(runs) < 2:
            return True
        from .doctor import differences

        reports = {}
        for run in runs:
            report = dict(run.hello.get("report") or {})  # the job's interpreter, as the agent found it
            if run.name in self.results:  # with the environment's own packages over it
                packages = dict(report.get("packages") or {})
                packages.update(_packages_in(self.results[run.name].freeze))
                report["packages"] = packages
            if report.get("packages") is not None:
                reports[run.name] = report
        if len(reports) < 2:
            return True
        problems = differences(reports, ("tensorflow",))
        if problems:
            raise PrepFailure("preflight", "; ".join(problems) +
                              " (install the same TensorFlow everywhere, or --no-preflight to start anyway)")
        return True

    def _downloads(self, runs: list[HostRun]) -> bool:
        downloads = [item for item in self.spec.inputs if item["mode"] == data.DOWNLOAD]
        for run in runs:
            self.data_paths[run.name] = {}
        for item in downloads:
            commands = {}
            streamed = []
            for run in runs:
                dest = data.download_dest(item, run.hello.get("scratch") or "/tmp", run.work_dir or self.sup.work_dir)
                self.data_paths[run.name][item["name"]] = dest
                visible = all((run.hello.get("paths") or {}).get(p) for p in item["paths"])
                if visible:
                    commands[run.name] = {"id": f"data:{item['name']}", "owns": dest, "cwd": "/",
                                          "argv": [run.hello.get("executable") or self.spec.python, "-I", "-S", "-c",
                                                   data.COPY_PROGRAM, *item["paths"], dest]}
                else:
                    streamed.append((run, dest))
            if streamed:
                self._stream(item, streamed)
            started = time.monotonic()
            if commands and not self._exec_all("data", commands, [r for r in runs if r.name in commands],
                                               f"to copy input {item['name']!r}"):
                return False
            failed = self._failed("data", runs, f"data:{item['name']}")
            if failed:
                raise PrepFailure("data", f"input {item['name']!r}: copying {item['paths'][0]} on host "
                                          f"{failed[0].name} failed", self._tail("data", failed[0]))
            self.sup.record.event("data_downloaded", name=item["name"], seconds=round(time.monotonic() - started, 3),
                                  hosts={r.name: self.data_paths[r.name][item["name"]] for r in runs})
        return True

    def _stream(self, item: dict[str, Any], targets: list[tuple[HostRun, str]]) -> None:
        """Send ``item`` as a tar stream to hosts that cannot see it (unpacked into ``dest``, owned there)."""
        import threading

        missing = [p for p in item["paths"] if not os.path.exists(p)]
        if missing:
            names = ", ".join(run.name for run, _ in targets)
            raise PrepFailure("data", f"input {item['name']!r}: {missing[0]} does not exist on host {names} nor "
                                      "on this machine (to be sent from here)")
        path = self.sup.record.path(f".data-{item['name']}.tar")
        try:
            data.write_tar(item, path)

            def send(run: HostRun, dest: str) -> None:
                run.unpacked = False
                with open(path, "rb") as fh:
                    while True:
                        chunk = fh.read(1 << 20)
                        if not chunk or not run.conn.send({"cmd": "data"}, chunk):
                            break
                run.conn.send({"cmd": "unpack", "dest": dest, "owned": True})

            threads = [threading.Thread(target=send, args=target, daemon=True) for target in targets]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        runs = [run for run, _ in targets]
        self.sup._wait(lambda: all(run.unpacked for run in runs), None, f"to unpack input {item['name']!r}")
        log.info("sent input %r to %s (it cannot see %s)", item["name"], ", ".join(r.name for r in runs),
                 item["paths"][0])

    # -- what MPI ranks are told (tflaunch.rank.apply_host) --------------------------------------------
    def host_info(self, run: HostRun) -> dict[str, Any]:
        """What this host's ranks need beyond their working directory: their interpreter, data paths."""
        info: dict[str, Any] = {}
        python = self.pythons.get(run.name) or (self.home_result.python if self.home_result else None)
        if python:
            info["python"] = python
        if self.spec.inputs:
            info["data"] = data.host_paths(self.spec.inputs, self.data_paths.get(run.name))
        return info

    def step_info(self) -> dict[str, Any]:
        """An srun step's share of the preparation, done by the rank wrapper on every node (there are no
        agents there): the environment is built here first (under the home, which every node sees)."""
        from .errors import TflaunchError

        if any(item["mode"] == data.DOWNLOAD for item in self.spec.inputs):
            raise PrepFailure("data", "as_download() inside a Slurm allocation's srun step: use as_mount() (the "
                                      "nodes see the path), or --launcher ssh")
        info: dict[str, Any] = {}
        if self.env_request is not None:
            if self.home_result is None:
                from . import envs
                try:
                    with open(self.sup.record.path(ENV_LOG), "ab") as fh:
                        self.home_result = envs.ensure_environment(self.env_request, self.home_envs_root(), log=fh,
                                                                   builder=self.builder)
                except TflaunchError as exc:
                    raise PrepFailure("environment", f"building the job's environment failed: {exc}") from None
            info["python"] = self.home_result.python
            self.record_environment()
        if self.spec.setup_commands:
            info["setup_script"] = setup_script(self.spec.setup_commands)
        mounts = [item["paths"][0] for item in self.spec.inputs if item["mode"] == data.MOUNT]
        if mounts:
            info["check_paths"] = mounts
            info["data"] = data.host_paths(self.spec.inputs, None)
        return info

    # -- what the record keeps ---------------------------------------------------------------------------

    def record_environment(self) -> None:
        """``environment.json``: the environment of every host (key, path, builder, freeze); the status
        gets the key and whether it was built for this run."""
        results = dict(self.results)
        if not results and self.home_result is not None:
            results = {h.name: self.home_result for h in self.sup.hosts}
        if not results:
            return
        from . import fsio

        first = next(iter(results.values()))
        # not synced on its own: the status write that follows (Running, or the final one) is
        fsio.atomic_write_json(self.sup.record.path("environment.json"),
                               {"key": first.key, "hosts": {h: r.to_dict() for h, r in results.items()}}, fsync=False)
        self.status_fields["environment"] = {"key": first.key, "python": first.python,
                                             "built": any(r.built for r in results.values()),
                                             "builder": first.builder, "packages": len(first.freeze)}

    def record_inputs(self) -> None:
        """``inputs.json`` and the status's ``inputs``: each input's name, path, mode, files, bytes (and a
        content fingerprint for downloads), counted on this machine when it has the path."""
        if not self.spec.inputs:
            return
        from . import fsio

        rows = data.describe_inputs(self.spec.inputs)
        fsio.atomic_write_json(self.sup.record.path("inputs.json"), rows, fsync=False)
        self.status_fields["inputs"] = rows


def _packages_in(freeze: list[str]) -> dict[str, Any]:
    """The packages a doctor report compares, as an environment's ``pip freeze`` has them (only those
    it has: the others come from the interpreter it inherits from)."""
    versions: dict[str, tuple[str, str]] = {}
    for line in freeze:
        name, sep, version = line.partition("==")
        if sep:
            versions[name.strip().lower().replace("_", "-")] = (name.strip(), version.strip())
    found = {}
    for wanted, dists in (("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel")),
                          ("keras", ("keras",)), ("horovod", ("horovod",)), ("mpi4py", ("mpi4py",))):
        for dist in dists:
            if dist in versions:
                found[wanted] = {"version": versions[dist][1], "distribution": versions[dist][0]}
                break
    return found

