"""The estimator API (mirroring Azure ML SDK v1): :class:`Estimator` and :class:`TensorFlow`.

They validate their fields eagerly (types, ranges) and name the field in every error. Filesystem checks
(does the source directory exist, is the entry script inside it) happen at submit time, in
:mod:`tflaunch.history.snapshot`. :meth:`Estimator.job_spec` turns the user's object into a
:class:`~tflaunch.spec.jobspec.JobSpec`.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

from .distributed_training import MpiConfiguration, MultiWorkerConfiguration, TensorflowConfiguration
from ..errors import SpecError
from .jobspec import JobSpec, procs_per_host, world_size
from .script_params import _scalar_arg, _with_inputs, script_params_to_argv
from .fields import _env_vars, _fail, _positive_int, _strings

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["Estimator", "TensorFlow"]

_FRAMEWORK_VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")

# Reference arguments tflaunch cannot honour, with what to use instead (one line each).
_REFUSED = {
    "custom_docker_image": "tflaunch runs no containers; give the packages as pip_packages (a virtual environment "
                           "is built from them) and run on hosts that have what the image had",
    "custom_docker_base_image": "tflaunch runs no containers; give the packages as pip_packages",
    "image_registry_details": "tflaunch runs no containers; give the packages as pip_packages",
    "environment_definition": "tflaunch builds the job's environment from pip_packages / conda_packages / "
                              "framework_version; give those instead",
    "shm_size": "tflaunch runs no containers, so there is no container shared memory to size; processes use the "
                "host's /dev/shm",
    "vm_size": "tflaunch runs on the machines you give it: use compute_target=SSHTarget(hosts=[...]) or "
               "SlurmTarget(partition=...)",
    "vm_priority": "tflaunch runs on the machines you give it: use compute_target=SSHTarget(hosts=[...]) or "
                   "SlurmTarget(qos=...)",
    "source_directory_data_store": "the snapshot of source_directory is kept in the tflaunch home; leave it out",
    "resume_from": "pass the checkpoint directory to the script in script_params (e.g. a Datastore path "
                   ".as_mount()) and resume there",
    "conda_dependencies_file": "give the packages as conda_packages=[...] (or pip_packages)",
    "conda_dependencies_file_path": "give the packages as conda_packages=[...] (or pip_packages)",
}
_IGNORED = ("_disable_validation", "_show_lint_warnings", "_show_package_warnings", "_enable_optimized_mode")


class Estimator:
    """A training job: ``entry_script`` from ``source_directory`` with ``script_params``.

    Mirrors ``azureml.train.estimator.Estimator``: ``pip_packages`` / ``pip_requirements_file`` /
    ``conda_packages`` build the job's environment (see README "Job environments"); a ``Datastore`` or
    ``Dataset`` reference as a ``script_params`` value (or in ``inputs``) becomes that host's path. The
    reference's container options (``custom_docker_image``, ...) are refused with what to use instead.
    tflaunch additions: ``arguments`` (a list, appended after the ``script_params``), ``python`` (the
    job's interpreter; default: the submitting one), ``find_links`` / ``index_url`` / ``no_index`` (where
    packages come from; defaults from the home's and the workspace's config.json), ``inherit_packages``
    (the environment sees the interpreter's own packages; default True), ``setup_commands`` (shell lines
    run on every host before the processes start), ``preflight`` (multi-host runs check that TensorFlow
    is the same everywhere first), recovery (:mod:`tflaunch.spec.recovery`): ``max_restarts``,
    ``restart_on_exit_codes``, ``restart_delay``, ``hang_timeout``, ``hang_grace``, ``max_requeues``.
    """

    def __init__(
        self,
        source_directory: str | os.PathLike | None = None,
        *args: Any,
        entry_script: str | None = None,
        script_params: Mapping[str, Any] | None = None,
        arguments: Sequence[Any] | None = None,
        compute_target: Any = None,
        node_count: int = 1,
        process_count_per_node: int = 1,
        distributed_training: MpiConfiguration | TensorflowConfiguration | MultiWorkerConfiguration | None = None,
        use_gpu: bool = False,
        gpus_per_node: int | None = None,
        gpus_shared: bool = False,
        environment_variables: Mapping[str, Any] | None = None,
        max_run_duration_seconds: float | None = None,
        python: str | os.PathLike | None = None,
        pip_packages: Sequence[str] | None = None,
        pip_requirements_file: str | os.PathLike | None = None,
        pip_requirements_file_path: str | os.PathLike | None = None,
        conda_packages: Sequence[str] | None = None,
        find_links: Sequence[str] | str | None = None,
        index_url: str | None = None,
        no_index: bool | None = None,
        inherit_packages: bool = True,
        environment_builder: str = "auto",
        user_managed: bool = False,
        use_docker: bool | None = None,
        setup_commands: Sequence[str] | None = None,
        inputs: Sequence[Any] | None = None,
        preflight: bool = True,
        max_restarts: int | None = None,
        restart_on_exit_codes: Sequence[int] | None = None,
        restart_delay: float | None = None,
        hang_timeout: float | None = None,
        hang_grace: float | None = None,
        max_requeues: int | None = None,
        **unknown: Any,
    ) -> None:
        kind = type(self).__name__
        if args:
            raise SpecError(f"{kind}: source_directory is the only positional argument; give the others by name "
                            "(entry_script='train.py', ...)")
        for name in list(unknown):
            if name in _REFUSED:
                raise SpecError(f"{name}: {_REFUSED[name]}")
            if name in _IGNORED:
                del unknown[name]
        if unknown:
            name = sorted(unknown)[0]
            raise SpecError(f"{kind}: unknown argument {name!r}; see help(tflaunch.{kind}) for the arguments")
        if use_docker:
            raise SpecError("use_docker: tflaunch runs no containers; leave use_docker out (the job runs in the "
                            "interpreter, or in a virtual environment built from pip_packages)")
        if source_directory is None:
            raise _fail("source_directory", "is required: the directory holding the training script")
        if not isinstance(source_directory, (str, os.PathLike)) or not os.fspath(source_directory):
            raise _fail("source_directory", f"must be a path, got {source_directory!r}")
        self.source_directory = os.fspath(source_directory)
        if entry_script is None:
            raise _fail("entry_script", "is required: the script to run, relative to source_directory")
        if not isinstance(entry_script, (str, os.PathLike)) or not os.fspath(entry_script):
            raise _fail("entry_script", f"must be a file name inside source_directory, got {entry_script!r}")
        self.entry_script = os.fspath(entry_script)
        self.inputs: list[dict[str, Any]] = []
        if isinstance(script_params, Mapping):
            script_params = {k: _with_inputs(f"script_params[{k!r}]", v, self.inputs) for k, v in script_params.items()}
        self.script_params = dict(script_params) if isinstance(script_params, Mapping) else script_params
        self._argv = script_params_to_argv(script_params)
        if arguments is None:
            arguments = []
        if isinstance(arguments, (str, bytes)) or not isinstance(arguments, Sequence):
            raise SpecError(f"arguments: must be a list, got {type(arguments).__name__}")
        self.arguments = [_with_inputs(f"arguments[{i}]", a, self.inputs) for i, a in enumerate(arguments)]
        self._argv += [_scalar_arg(f"arguments[{i}]", a) for i, a in enumerate(self.arguments)]
        if inputs is not None:
            if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
                raise SpecError(f"inputs: must be a list of data references, got {type(inputs).__name__}")
            from .. import data
            for i, ref in enumerate(inputs):
                if not data.is_reference(ref):
                    raise SpecError(f"inputs[{i}]: must be a Datastore/Dataset reference such as "
                                    f"ds.as_named_input('mnist').as_mount(), got {type(ref).__name__}")
                data.add_input(ref, self.inputs, f"inputs[{i}]")
        from .target import is_target

        if compute_target is not None and not is_target(compute_target) and not (
                isinstance(compute_target, str) and compute_target.lower() == "local"):
            raise _fail("compute_target", f"{compute_target!r} is not supported; give 'local', SSHTarget(hosts=[...]) "
                                          "or SlurmTarget(...)")
        self.compute_target = compute_target if is_target(compute_target) else "local"
        self._node_count = _positive_int("node_count", node_count)
        self._process_count_per_node = _positive_int("process_count_per_node", process_count_per_node)
        if distributed_training is not None and not isinstance(
                distributed_training, (MpiConfiguration, TensorflowConfiguration, MultiWorkerConfiguration)):
            raise SpecError("distributed_training: must be MpiConfiguration(), TensorflowConfiguration(...) or "
                            "MultiWorkerConfiguration(), "
                            f"got {type(distributed_training).__name__}")
        self.distributed_training = distributed_training
        if not isinstance(use_gpu, bool):
            raise _fail("use_gpu", f"must be True or False, got {use_gpu!r}")
        self.use_gpu = use_gpu
        if gpus_per_node is not None:
            _positive_int("gpus_per_node", gpus_per_node)
            if not use_gpu:
                raise _fail("gpus_per_node", "only meaningful with use_gpu=True (--gpu)")
        self.gpus_per_node = gpus_per_node
        if not isinstance(gpus_shared, bool):
            raise _fail("gpus_shared", f"must be True or False, got {gpus_shared!r}")
        if gpus_shared and not use_gpu:
            raise _fail("gpus_shared", "only meaningful with use_gpu=True (--gpu)")
        self.gpus_shared = gpus_shared
        self.environment_variables = _env_vars(environment_variables)
        if max_run_duration_seconds is not None:
            if isinstance(max_run_duration_seconds, bool) or not isinstance(max_run_duration_seconds, (int, float)) \
                    or not max_run_duration_seconds > 0:
                raise _fail("max_run_duration_seconds", f"must be a number > 0, got {max_run_duration_seconds!r}")
        self.max_run_duration_seconds = max_run_duration_seconds
        if python is not None and (not isinstance(python, (str, os.PathLike)) or not os.fspath(python)):
            raise _fail("python", f"must be the path of a Python interpreter, got {python!r}")
        self.python = os.fspath(python) if python is not None else None
        self.pip_packages = _strings("pip_packages", pip_packages)
        self.conda_packages = _strings("conda_packages", conda_packages)
        if pip_requirements_file is not None and pip_requirements_file_path is not None:
            raise _fail("pip_requirements_file", "give pip_requirements_file or pip_requirements_file_path, not both")
        requirements = pip_requirements_file if pip_requirements_file is not None else pip_requirements_file_path
        if requirements is not None and (not isinstance(requirements, (str, os.PathLike)) or not os.fspath(requirements)):
            raise _fail("pip_requirements_file", f"must be the path of a requirements file, got {requirements!r}")
        self.pip_requirements_file = os.fspath(requirements) if requirements is not None else None
        if isinstance(find_links, (str, os.PathLike)):
            find_links = [os.fspath(find_links)]
        self.find_links = _strings("find_links", find_links)
        if index_url is not None and (not isinstance(index_url, str) or not index_url):
            raise _fail("index_url", f"must be the URL of a package index, got {index_url!r}")
        self.index_url = index_url
        if no_index is not None and not isinstance(no_index, bool):
            raise _fail("no_index", f"must be True or False, got {no_index!r}")
        self.no_index = no_index
        for name, value in (("inherit_packages", inherit_packages), ("user_managed", user_managed),
                            ("preflight", preflight)):
            if not isinstance(value, bool):
                raise _fail(name, f"must be True or False, got {value!r}")
        self.inherit_packages = inherit_packages
        if environment_builder not in ("auto", "uv", "pip"):
            raise _fail("environment_builder", f"must be 'auto', 'uv' or 'pip', got {environment_builder!r}")
        self.environment_builder = environment_builder
        self.user_managed = user_managed
        self.preflight = preflight
        if user_managed and (self.pip_packages or self.conda_packages or self.pip_requirements_file):
            raise _fail("user_managed", "True uses the interpreter as it is, so nothing can be installed: leave out "
                                        "user_managed or the packages")
        if isinstance(setup_commands, str):
            setup_commands = [setup_commands]
        self.setup_commands = _strings("setup_commands", setup_commands)
        for line in self.setup_commands:
            if "\x00" in line:
                raise _fail("setup_commands", "a line contains a NUL byte")
        from .recovery import recovery

        self.recovery = recovery(max_restarts, restart_on_exit_codes, restart_delay, hang_timeout, hang_grace,
                                 max_requeues)
        self._check_counts()
        if isinstance(distributed_training, TensorflowConfiguration) and process_count_per_node != 1:
            raise _fail("process_count_per_node", "does not apply to a parameter-server job: give worker_count "
                        "(--workers) and parameter_server_count (--ps); tflaunch spreads them over the nodes")

    @property
    def node_count(self) -> int:
        """Nodes to use (an MpiConfiguration's when given there)."""
        return self._check_counts()[0]

    @node_count.setter
    def node_count(self, value: int) -> None:
        self._node_count = _positive_int("node_count", value)

    @property
    def process_count_per_node(self) -> int:
        """Processes per node (an MpiConfiguration's when given there)."""
        return self._check_counts()[1]

    @process_count_per_node.setter
    def process_count_per_node(self, value: int) -> None:
        self._process_count_per_node = _positive_int("process_count_per_node", value)

    def _check_counts(self) -> tuple[int, int]:
        """node_count and process_count_per_node, merged with an MpiConfiguration's (given here or there,
        not both, as in the reference); read when the job is specified, so attributes set later count."""
        counts = [self._node_count, self._process_count_per_node]
        if isinstance(self.distributed_training, MpiConfiguration):
            for i, name in enumerate(("node_count", "process_count_per_node")):
                mine, theirs = counts[i], getattr(self.distributed_training, name)
                if mine == 1:
                    counts[i] = theirs
                elif theirs not in (1, mine):
                    raise _fail(name, f"{mine} here but {theirs} in MpiConfiguration: give it once")
        return counts[0], counts[1]

    def _distributed(self) -> dict[str, Any] | None:
        return self.distributed_training.to_dict() if self.distributed_training is not None else None

    def _framework(self) -> dict[str, Any] | None:
        return None

    def _packages(self) -> dict[str, Any] | None:
        """What the job asks to have installed (``None``: the interpreter as it is)."""
        if not (self.pip_packages or self.conda_packages or self.pip_requirements_file):
            return None
        requirements = self.pip_requirements_file
        if requirements is not None:
            requirements = os.path.abspath(requirements)
            if not os.path.isfile(requirements):
                raise _fail("pip_requirements_file", f"{requirements} is not a file")
        return {"pip": list(self.pip_packages), "requirements_file": requirements, "conda": list(self.conda_packages)}

    def _index(self) -> dict[str, Any]:
        """The package index options given here (the rest come from config files)."""
        out: dict[str, Any] = {}
        if self.find_links:
            out["find_links"] = [x if "://" in x else os.path.abspath(x) for x in self.find_links]
        if self.index_url is not None:
            out["index_url"] = self.index_url
        if self.no_index is not None:
            out["no_index"] = self.no_index
        return out

    def resolved_target(self) -> dict[str, Any]:
        """The hosts this job uses and how to reach them (see :func:`tflaunch.spec.target.resolve_target`)."""
        from .target import resolve_target

        nodes, ppn = self._check_counts()
        distributed = self._distributed()
        return resolve_target(self.compute_target, nodes, procs_per_host(ppn, distributed),
                              world=world_size(nodes, ppn, distributed))

    def job_spec(self) -> JobSpec:
        """The normalized spec; relative paths are resolved against the current directory.

        The hosts are chosen here: the compute target's first ``node_count`` hosts, or the Slurm/PBS
        allocation tflaunch runs in, or this machine (see :func:`tflaunch.spec.target.resolve_target`).
        """
        python = self.python
        if python is None:
            python = sys.executable
        elif os.sep in python or (os.altsep and os.altsep in python):
            python = os.path.abspath(python)
        nodes, ppn = self._check_counts()
        packages = self._packages()
        spec = JobSpec(
            source_directory=os.path.abspath(self.source_directory),
            entry_script=self.entry_script,
            arguments=list(self._argv),
            python=python,
            environment_variables=dict(self.environment_variables),
            node_count=nodes,
            process_count_per_node=ppn,
            distributed=self._distributed(),
            use_gpu=self.use_gpu,
            max_run_duration_seconds=self.max_run_duration_seconds,
            framework=self._framework(),
            gpus_per_node=self.gpus_per_node,
            gpus_shared=self.gpus_shared,
            compute_target=self.resolved_target(),
            packages={**(packages or {"pip": [], "requirements_file": None, "conda": []}), "index": self._index(),
                      "inherit": self.inherit_packages, "builder": self.environment_builder},
            setup_commands=list(self.setup_commands),
            inputs=[dict(i) for i in self.inputs],
            preflight=self.preflight,
            recovery=dict(self.recovery) if self.recovery else None,
        )
        from .. import data
        data.check_placeholders(spec.arguments, spec.inputs)
        from ..plan.tfconfig import place

        place(spec)  # raises SpecError when the processes do not fit the hosts
        return spec

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source_directory={self.source_directory!r}, "
                f"entry_script={self.entry_script!r})")


class TensorFlow(Estimator):
    """Estimator for TensorFlow jobs.

    ``framework_version`` (``'2.15'``, ``'2.21.0'``): the TensorFlow the job runs with (compared
    component by component). When the job's interpreter imports a matching TensorFlow it is used as it
    is; otherwise tflaunch builds (once, then reuses) an environment with that TensorFlow series, as the
    reference's curated images did. ``None`` accepts any installed TensorFlow.
    ``distributed_backend='mpi'|'ps'`` with ``worker_count``/``parameter_server_count`` is the
    reference's older spelling of ``distributed_training``; ``'multiworker'`` is tflaunch's
    (:class:`MultiWorkerConfiguration`).
    """

    def __init__(
        self,
        source_directory: str | os.PathLike | None = None,
        *args: Any,
        framework_version: str | None = None,
        distributed_backend: str | None = None,
        worker_count: int | None = None,
        parameter_server_count: int | None = None,
        **kwargs: Any,
    ) -> None:
        if framework_version is not None:
            if not isinstance(framework_version, str) or not _FRAMEWORK_VERSION_RE.match(framework_version):
                raise _fail("framework_version", f"must look like '2.21' or '2.21.0', got {framework_version!r}")
        self.framework_version = framework_version
        if distributed_backend is not None:
            if kwargs.get("distributed_training") is not None:
                raise SpecError("distributed_backend: give either distributed_backend or distributed_training, not both")
            if distributed_backend == "mpi":
                kwargs["distributed_training"] = MpiConfiguration()
            elif distributed_backend == "ps":
                kwargs["distributed_training"] = TensorflowConfiguration(
                    worker_count=1 if worker_count is None else worker_count,
                    parameter_server_count=1 if parameter_server_count is None else parameter_server_count)
            elif distributed_backend == "multiworker" and worker_count is None and parameter_server_count is None:
                kwargs["distributed_training"] = MultiWorkerConfiguration()
            elif distributed_backend == "multiworker":
                raise SpecError("worker_count/parameter_server_count: a multiworker job has node_count x "
                                "process_count_per_node workers and no ps")
            else:
                raise SpecError(f"distributed_backend: must be 'mpi', 'ps' or 'multiworker', got {distributed_backend!r}")
        elif worker_count is not None or parameter_server_count is not None:
            if not isinstance(kwargs.get("distributed_training"), TensorflowConfiguration):
                raise SpecError("worker_count/parameter_server_count: only meaningful with distributed_backend='ps'")
            dist = kwargs["distributed_training"]  # the reference's defaults are 1: counts given here win
            if worker_count is not None:
                dist.worker_count = worker_count
            if parameter_server_count is not None:
                dist.parameter_server_count = parameter_server_count
        self.distributed_backend = distributed_backend
        super().__init__(source_directory, *args, **kwargs)

    def _framework(self) -> dict[str, Any] | None:
        return {"name": "tensorflow", "version": self.framework_version}
