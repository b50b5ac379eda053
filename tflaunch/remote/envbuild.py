"""The job-environment builder: builds (or reuses, or waits for) one environment under a root directory.

Self-contained on purpose: standard library only, nothing of tflaunch is imported, so the launcher can
ship its source to a host that has only the job's Python (``python -I -S -c SOURCE JSON``, see
:func:`tflaunch.envs.builder_command`): this module and its parts :mod:`tflaunch.remote.envbuild_base`
(keys, utilities, the log, the lock) and :mod:`tflaunch.remote.envbuild_packages` (what is installed, pip
and uv, Horovod), joined into one program (:data:`tflaunch.remote.bundle.ENVBUILD`). Its stdout and stderr are the build log; the last stdout line is
``TFLAUNCH_ENV_RESULT <json>`` or ``TFLAUNCH_ENV_ERROR <json {"message"}>`` (then the exit status is 1).

Layout under the root (``<home>/envs`` or a node-local ``/tmp/tflaunch-<uid>/envs``)::

    <short>/                   the environment (a virtualenv, or a conda prefix), <short> = key[:20]
        env.json               the request, the full key, builder, times, freeze (written last: complete)
        freeze.txt             name==version of every distribution in the env's own site-packages
        build.log              what the tools printed
        .last-used             its mtime says when a run last resolved the environment
    .build-<short>-<rand>/     a venv being built aside; renamed to <short> when complete
    .trash-<short>-<rand>/     an environment being removed
    .locks/<short>/<gen>       build lock generations (see :class:`Lock`)
    .tools/pip-<version>/      the interpreter's bundled pip, unpacked (the pip builder runs it), when
                               the user's cache (~/.cache/tflaunch/tools) is not writable

A virtualenv is built aside and renamed into place, so a reader never sees a half-built one, whatever
kills the builder (the paths the tools wrote, shebangs and activate scripts, are rewritten to the final
place first). A conda prefix is not relocatable (conda rewrites prefixes inside binaries at install
time), so it is built at its final path and counts as built only once its env.json exists; a
directory without one is removed by the next builder.

Run by hand (from a checkout): ``python -m tflaunch.remote.envbuild horovod-wheel --python PY --mpirun MPIRUN``
prints the path of the cached Horovod wheel for that Python's TensorFlow and that MPI, building it first
when the cache has none (tests/infra/horovod_env.sh uses this).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

from .envbuild_base import BuildError, DEFAULT_HEARTBEAT, DEFAULT_LOCK_TIMEOUT, DiskFull  # joined when shipped
from .envbuild_base import ERROR_MARK, FORMAT, Lock, Log, MissingPackage, PARENT_PTH  # joined when shipped
from .envbuild_base import RESULT_MARK, SHORT, TF_DISTRIBUTIONS, atomic_write, is_disk_full  # joined when shipped
from .envbuild_base import key_index, local_identity, now_iso, process_start_time, read_json  # joined when shipped
from .envbuild_base import remove_tree, request_key, run_tool, tree_size, which  # joined when shipped
from .envbuild_packages import cached_wheel, freeze, horovod_cache_dir, horovod_wheel  # joined when shipped
from .envbuild_packages import pip_install, pip_runner, query_python, remove_shadows  # joined when shipped
from .envbuild_packages import tool_env, tools_dir, uv_install, write_shadows  # joined when shipped

__all__ = ["build_main", "main", "env_ready", "touch",  # and, for the launcher, from the parts:
           "DEFAULT_LOCK_TIMEOUT", "ERROR_MARK", "FORMAT", "Lock", "RESULT_MARK", "SHORT", "TF_DISTRIBUTIONS",
           "local_identity", "now_iso", "process_start_time", "read_json", "request_key", "cached_wheel",
           "horovod_cache_dir"]


# -- the build -----------------------------------------------------------------------------------------------
def env_ready(root: str, key: str) -> dict | None:
    """env.json of the complete environment with this key, or None."""
    path = os.path.join(root, key[:SHORT])
    try:
        record = read_json(os.path.join(path, "env.json"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if not os.path.exists(record.get("python") or ""):
        return None
    return record


def touch(path: str) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            open(path, "ab").close()
        except OSError:
            pass
    except OSError:
        pass


def result_of(record: dict, built: bool, seconds: float) -> dict:
    return {"key": record["key"], "path": record["path"], "python": record["python"], "built": built,
            "builder": record.get("builder"), "seconds": round(seconds, 3), "freeze": record.get("freeze", []),
            "horovod": record.get("horovod")}


def relocate(staging: str, final: str, log: Log) -> None:
    """Rewrite the staging path to the final one where the tools wrote it: bin/ (script shebangs,
    activate scripts) and pyvenv.cfg. Everything else a venv holds uses relative paths."""
    old, new = staging.encode(), final.encode()
    candidates = [os.path.join(staging, "pyvenv.cfg")]
    bindir = os.path.join(staging, "bin")
    try:
        candidates += [os.path.join(bindir, n) for n in os.listdir(bindir)]
    except OSError:
        pass
    count = 0
    for path in candidates:
        try:
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 1 << 20:
                continue
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if old not in data or b"\0" in data[:4096]:
            continue
        mode = os.stat(path).st_mode
        atomic_write(path, data.replace(old, new))
        os.chmod(path, mode & 0o7777)
        count += 1
    log.line(f"relocated {count} files from {staging} to {final}")


class Builder:
    def __init__(self, config: dict, log: Log) -> None:
        self.config = config
        self.request = config["request"]
        self.root = os.path.abspath(config["root"])
        self.key = request_key(self.request)
        self.short = self.key[:SHORT]
        self.final = os.path.join(self.root, self.short)
        self.log = log
        self.index = key_index(self.request.get("index"))
        here = config.get("find_links_here")
        self.find_links = list(here) if here is not None else list(self.index["find_links"])
        self.lock = Lock(self.root, self.short,
                         float(config.get("lock_timeout") or os.environ.get("TFLAUNCH_ENV_LOCK_TIMEOUT")
                               or DEFAULT_LOCK_TIMEOUT),
                         float(config.get("heartbeat") or DEFAULT_HEARTBEAT))
        self.staging: str | None = None

    # the whole protocol: reuse, or wait, or build
    def run(self) -> dict:
        start = time.time()
        if config_key := self.config.get("key"):
            if config_key != self.key:
                raise BuildError(f"the request's key {config_key[:SHORT]} is not what this builder computes "
                                 f"({self.short}): tflaunch versions differ between launcher and builder")
        deadline = None if self.config.get("timeout") is None else start + float(self.config["timeout"])
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull("no space left") from None
            raise BuildError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        delay, said = 0.1, 0.0
        while True:
            record = env_ready(self.root, self.key)
            if record is not None:
                touch(os.path.join(self.final, ".last-used"))
                self.log.line(f"environment {self.short} is ready: {self.final}")
                return result_of(record, False, time.time() - start)
            if self.lock.try_acquire():
                break
            holder = self.lock.holder() or {}
            now = time.time()
            if now - said >= 30 or not said:
                said = now
                self.log.line(f"waiting for the build of {self.short} by pid {holder.get('pid')} on "
                              f"{holder.get('host')} (since {holder.get('started')})")
            if deadline is not None and now > deadline:
                raise BuildError(f"timed out after {self.config['timeout']} s waiting for the build of environment "
                                 f"{self.short} by pid {holder.get('pid')} on {holder.get('host')}")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        try:
            record = env_ready(self.root, self.key)  # built while we took the lock
            if record is not None:
                return result_of(record, False, time.time() - start)
            record = self.build()
            return result_of(record, True, time.time() - start)
        finally:
            self.lock.release()

    def _clear_leftovers(self) -> None:
        """Under the lock: what killed builders of this key left (staging dirs, an incomplete final)."""
        for name in os.listdir(self.root):
            if name.startswith((f".build-{self.short}-", ".trash-")):
                self.log.line(f"removing {name}, left by an interrupted build")
                remove_tree(os.path.join(self.root, name))
        if os.path.lexists(self.final):
            trash = os.path.join(self.root, f".trash-{self.short}-{os.urandom(4).hex()}")
            self.log.line(f"removing the incomplete {self.final}")
            os.rename(self.final, trash)
            remove_tree(trash)

    def build(self) -> dict:
        self._clear_leftovers()
        kind = self.request.get("kind", "venv")
        if kind == "conda":
            return self.build_conda()
        staging = os.path.join(self.root, f".build-{self.short}-{os.urandom(4).hex()}")
        self.staging = staging
        self.lock.record["staging"] = staging
        start = time.time()
        env = tool_env()
        python = self.request["python"]
        self.log.line(f"building environment {self.short} with {python} in {staging}")
        run_tool([python, "-m", "venv", "--without-pip", "--prompt", f"tflaunch-{self.short}", staging], self.log,
                 env=env, what="python -m venv")
        self.log.attach(os.path.join(staging, "build.log"))
        env_python = os.path.join(staging, "bin", "python")
        info = query_python(env_python, env)
        site_dirs = sorted({info["purelib"], info["platlib"]}, key=lambda p: p != info["purelib"])
        self.install(env_python, info, site_dirs, staging)
        record = self.finish(staging, self.final, env_python, info, site_dirs, start)
        relocate(staging, self.final, self.log)
        self.log.close()
        try:
            os.rename(staging, self.final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and env_ready(self.root, self.key):
                self.log.line("another builder finished first; using its environment")
                remove_tree(staging)
                return env_ready(self.root, self.key) or record
            raise
        self.staging = None
        return record

    def parent_pth(self, site: str) -> None:
        parents = list(self.request.get("parent_site") or [])
        if self.request.get("inherit") and parents:
            with open(os.path.join(site, PARENT_PTH), "w") as fh:
                fh.write("".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
            self.log.line(f"the environment sees the packages of {', '.join(parents)}")

    def requirements(self) -> list:
        reqs = list(self.request.get("requirements") or [])
        framework = self.request.get("framework") or {}
        reqs += [r for r in framework.get("requirements") or [] if r not in reqs]
        return reqs

    def choose_builder(self) -> tuple:
        wanted = self.config.get("builder") or "auto"
        uv = self.config.get("uv")
        if uv and not os.path.exists(uv):
            uv = None
        uv = uv or which("uv")
        if wanted == "uv" and not uv:
            raise BuildError("the uv builder was asked for but uv is not installed here (pip install uv, or put uv "
                             "on PATH), or use --builder pip")
        if wanted == "pip" or not uv:
            return "pip", None
        return "uv", uv

    def install(self, env_python: str, info: dict, site_dirs: list, staging: str, requirements: list | None = None,
                inherit: bool = True) -> None:
        if inherit:
            self.parent_pth(site_dirs[0])
        reqs = self.requirements() if requirements is None else requirements
        name, uv = self.choose_builder()
        self.builder_name = name
        req_file = os.path.join(staging, "tflaunch-requirements.txt")
        with open(req_file, "w") as fh:
            fh.write("".join(r + "\n" for r in reqs))
        if reqs:
            self.log.line(f"installing with {name}: {', '.join(reqs)}")
            self.installer(name, uv, env_python, info, site_dirs, ["-r", req_file])
        horovod = self.request.get("horovod")
        self.horovod_result = None
        if horovod:
            found = horovod_wheel(env_python, horovod["version"], horovod.get("mpi") or {}, self.log,
                                  index=self.index, find_links=self.find_links)
            self.horovod_result = found
            self.log.line(f"installing {found['wheel']} with {name}")
            # the other requirements again: Horovod's dependencies cannot move their pins
            self.installer(name, uv, env_python, info, site_dirs, [found["wheel"], "-r", req_file])
        os.unlink(req_file)

    def installer(self, name: str, uv: str | None, env_python: str, info: dict, site_dirs: list, args: list) -> None:
        """Install ``args`` with uv (told what the parent environment has) or pip."""
        if name == "uv":
            shadows = bool(self.request.get("inherit") and self.request.get("parent_site"))
            try:
                if shadows:
                    write_shadows(env_python, site_dirs, self.log)
                uv_install(str(uv), env_python, args, self.log, self.index, self.find_links)
            finally:
                if shadows:
                    remove_shadows(site_dirs)
        else:
            runner = pip_runner(env_python, info, tools_dir(os.path.join(self.root, ".tools")),
                                self.request.get("python"), self.log)
            pip_install(runner, args, self.log, self.index, self.find_links)

    def finish(self, staging: str, final: str, env_python: str, info: dict, site_dirs: list, start: float) -> dict:
        check = subprocess.run([env_python, "-c", "import sys"], capture_output=True, env=tool_env())
        if check.returncode != 0:
            raise BuildError("the new environment's Python does not start: "
                             + (check.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"])[0])
        frozen = freeze(site_dirs)
        rel = os.path.relpath(env_python, staging)
        record = {
            "format": FORMAT, "key": self.key, "short": self.short, "kind": self.request.get("kind", "venv"),
            "path": final, "python": os.path.join(final, rel), "python_version": info.get("version"),
            "builder": getattr(self, "builder_name", None), "tools": getattr(self, "tools", None) or
            getattr(self, "builder_name", None), "created": now_iso(), "seconds": round(time.time() - start, 3),
            "host": os.uname().nodename, "freeze": frozen, "request": self.request,
            "find_links_used": self.find_links, "horovod": getattr(self, "horovod_result", None),
            "site_packages": [os.path.join(final, os.path.relpath(p, staging)) for p in site_dirs],
        }
        record["size"] = tree_size(staging)
        with open(os.path.join(staging, "freeze.txt"), "w") as fh:
            fh.write("".join(line + "\n" for line in frozen))
        open(os.path.join(staging, ".last-used"), "ab").close()
        atomic_write(os.path.join(staging, "env.json"), (json.dumps(record, indent=1) + "\n").encode("ascii"))
        self.log.line(f"environment {self.short}: {len(frozen)} distributions, built in {record['seconds']} s "
                      f"with {record['builder']}")
        return record

    def build_conda(self) -> dict:
        """conda/mamba/micromamba ``create -y -p <final> python=X.Y pkgs...``, then the pip packages with
        the prefix's Python (built in place: see the module's docstring)."""
        tool = self.config.get("conda") or self.request.get("conda_tool")
        tool = (tool if tool and os.path.exists(tool) else None) or which(os.path.basename(tool or "conda")) \
            or which("mamba") or which("micromamba") or which("conda")
        if not tool:
            raise BuildError("conda_packages need conda, mamba or micromamba on PATH, and none is here; "
                             "use pip_packages instead")
        start = time.time()
        final = self.final
        self.staging = final
        self.lock.record["staging"] = final
        version = ".".join((self.request.get("python_version") or "").split(".")[:2])
        argv = [tool, "create", "-y", "-p", final] + ([f"python={version}"] if version else []) \
            + list(self.request.get("conda_packages") or [])
        if self.index.get("no_index"):
            argv.append("--offline")
        self.log.line(f"building conda environment {self.short} with {os.path.basename(tool)} in {final}")
        run_tool(argv, self.log, env=tool_env({k: v for k, v in os.environ.items()
                                               if k.startswith(("CONDA_", "MAMBA_"))}), what=os.path.basename(tool))
        self.log.attach(os.path.join(final, "build.log"))
        env_python = os.path.join(final, "bin", "python")
        if not os.path.exists(env_python):
            raise BuildError(f"{os.path.basename(tool)} create made no {env_python}")
        info = query_python(env_python, tool_env())
        site_dirs = sorted({info["purelib"], info["platlib"]}, key=lambda p: p != info["purelib"])
        self.install(env_python, info, site_dirs, final, inherit=False)
        self.tools = os.path.basename(tool) + (f" + {self.builder_name}" if self.requirements() else "")
        self.builder_name = "conda"
        record = self.finish(final, final, env_python, info, site_dirs, start)
        self.log.close()
        self.staging = None
        return record

    def abandon(self) -> None:
        """After a failure: nothing half-built stays where it could be used."""
        self.log.close()
        if self.staging:
            if self.staging == self.final:  # conda, in place: move it out of the way first
                trash = os.path.join(self.root, f".trash-{self.short}-{os.urandom(4).hex()}")
                try:
                    os.rename(self.final, trash)
                except OSError:
                    trash = self.final
                remove_tree(trash)
            else:
                remove_tree(self.staging)
            self.staging = None


def message_for(exc: BaseException, key: str, root: str, index: dict, find_links: list) -> str:
    short = key[:SHORT]
    if isinstance(exc, DiskFull) or is_disk_full(exc):
        return f"No space left on device while building environment {short} in {root}"
    text = str(exc)
    if isinstance(exc, MissingPackage):
        name = exc.name
        if index.get("no_index"):
            where = ", ".join(find_links) or "(no --find-links given)"
            return f"no wheel for {name!r} in --no-index wheelhouse {where} (environment {short})"
        sources = [index.get("index_url") or "https://pypi.org/simple"] + list(find_links)
        return f"no distribution for {name!r} in {', '.join(sources)} (environment {short})"
    if isinstance(exc, BuildError):
        return f"{text} (environment {short} in {root})"
    if isinstance(exc, OSError):
        return f"building environment {short} in {root} failed: {exc.strerror or exc}" + \
            (f": {exc.filename}" if getattr(exc, "filename", None) else "")
    return f"building environment {short} in {root} failed: {exc!r}"


def build_main(config: dict, out: object = None) -> int:
    """Build as the config says; print the result (or error) line; return the exit status."""
    stream = out if out is not None else sys.stdout
    log = Log(getattr(stream, "buffer", None))

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, stop)
        except (ValueError, OSError):
            pass
    try:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # the launcher may go away: finish the build anyway
    except (AttributeError, ValueError, OSError):
        pass
    builder = None
    try:
        builder = Builder(config, log)
        result = builder.run()
    except BaseException as exc:
        if builder is not None:
            builder.abandon()
        if isinstance(exc, KeyboardInterrupt):
            message = f"the build of environment {builder.short if builder else '?'} was interrupted " \
                      f"({exc.args[0] if exc.args else 'SIGINT'}); nothing was kept"
        elif builder is not None:
            message = message_for(exc, builder.key, builder.root, builder.index, builder.find_links)
        else:
            message = f"invalid builder input: {exc!r}"
        line = ERROR_MARK + json.dumps({"message": message})
        _emit(stream, line)
        return 1
    _emit(stream, RESULT_MARK + json.dumps(result))
    return 0


def _emit(stream: object, line: str) -> None:
    try:
        stream.write("\n" + line + "\n")  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError):
        pass


# -- command line (from a checkout: python -m tflaunch.remote.envbuild ...) -----------------------------------------
def _mpi_install(mpirun: str) -> dict:
    try:
        from tflaunch.plan.mpirun import detect  # only when run from a checkout or an installed tflaunch
    except ImportError:
        raise BuildError("--mpirun needs tflaunch importable (run with python -m tflaunch.remote.envbuild from a "
                         "checkout); or give --mpi-flavour, --mpi-version and --mpi-bin") from None
    install = detect(mpirun)
    return {"flavour": install.flavour, "version": install.version,
            "bin": os.path.dirname(os.path.abspath(install.path))}


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].lstrip().startswith("{"):  # python -I -S -c SOURCE JSON
        return build_main(json.loads(argv[0]))
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tflaunch.remote.envbuild", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build from a JSON config (what tflaunch.envs.builder_command passes)")
    p.add_argument("config", help="the JSON, or @FILE")
    p = sub.add_parser("horovod-wheel", help="print the cached Horovod wheel for PYTHON's TensorFlow and an MPI, "
                                             "compiling it into the cache first when needed")
    p.add_argument("--python", required=True, help="the environment's Python (with TensorFlow installed)")
    p.add_argument("--horovod", default="0.28.1", help="Horovod version (default 0.28.1)")
    p.add_argument("--mpirun", help="the MPI's mpirun (flavour and version from mpirun --version)")
    p.add_argument("--mpi-flavour")
    p.add_argument("--mpi-version")
    p.add_argument("--mpi-bin")
    p.add_argument("--cache", help="wheel cache (default $TFLAUNCH_WHEEL_CACHE, else "
                                   "${XDG_CACHE_HOME:-~/.cache}/tflaunch/wheels)")
    p.add_argument("--find-links", action="append", default=[])
    p.add_argument("--index-url")
    p.add_argument("--no-index", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        text = args.config
        if text.startswith("@"):
            with open(text[1:]) as fh:
                text = fh.read()
        return build_main(json.loads(text))
    log = Log(getattr(sys.stderr, "buffer", None))
    try:
        if args.mpirun:
            mpi = _mpi_install(args.mpirun)
        else:
            if not (args.mpi_flavour and args.mpi_version and args.mpi_bin):
                parser.error("give --mpirun, or --mpi-flavour, --mpi-version and --mpi-bin")
            mpi = {"flavour": args.mpi_flavour, "version": args.mpi_version, "bin": os.path.abspath(args.mpi_bin)}
        found = horovod_wheel(os.path.abspath(args.python), args.horovod, mpi, log,
                              index={"no_index": args.no_index, "index_url": args.index_url},
                              find_links=args.find_links, cache_root=args.cache)
    except (BuildError, OSError) as exc:
        message = "No space left on device while building the Horovod wheel" if is_disk_full(exc) else str(exc)
        sys.stderr.write(f"tflaunch-env: error: {message}\n")
        return 1
    sys.stdout.write(found["wheel"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
