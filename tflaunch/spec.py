"""What to run: the estimator API (mirroring Azure ML SDK v1) and its normalized form, :class:`JobSpec`.

``Estimator``/``TensorFlow`` validate their fields eagerly (types, ranges) and name the field in every
error. Filesystem checks (does the source directory exist, is the entry script inside it) happen at
submit time, in :mod:`tflaunch.snapshot`. :meth:`Estimator.job_spec` turns the user's object into a
:class:`JobSpec`, a plain, JSON-serializable description that the planner and the run record use.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .distributions import distribution
from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = [
    "Estimator",
    "TensorFlow",
    "MpiConfiguration",
    "TensorflowConfiguration",
    "MultiWorkerConfiguration",
    "JobSpec",
    "script_params_to_argv",
    "RESERVED_ENV_PREFIX",
]

RESERVED_ENV_PREFIX = "TFLAUNCH_"

# How each field is spelled on the command line, so one message serves the API and the CLI.
_CLI_FLAG = {
    "source_directory": "--source-dir",
    "entry_script": "ENTRY",
    "node_count": "--nodes",
    "process_count_per_node": "--procs-per-node",
    "environment_variables": "--env",
    "max_run_duration_seconds": "--timeout",
    "framework_version": "--framework-version",
    "use_gpu": "--gpu",
    "python": "--python",
    "compute_target": "--compute-target",
    "worker_count": "--workers",
    "parameter_server_count": "--ps",
    "port_base": "--port-base",
    "evaluator_grace": "--evaluator-grace",
    "mpirun": "--mpirun",
    "mpi_args": "--mpi-arg",
    "launcher": "--mpi-launcher",
    "srun_mpi": "--srun-mpi",
    "mpi_iface": "--mpi-iface",
    "gpus_per_node": "--gpus-per-node",
    "gpus_shared": "--gpus-shared",
    "environment_builder": "--builder",
    "pip_packages": "--pip",
    "conda_packages": "--conda",
    "pip_requirements_file": "--requirements",
    "find_links": "--find-links",
    "index_url": "--index-url",
    "no_index": "--no-index",
    "inherit_packages": "--no-inherit-packages",
    "setup_commands": "--setup",
    "preflight": "--no-preflight",
}

DEFAULT_EVALUATOR_GRACE = 30.0

_FRAMEWORK_VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")
_ENV_NAME_BAD = re.compile(r"[=\x00]")


def _field(name: str) -> str:
    flag = _CLI_FLAG.get(name)
    return f"{name} ({flag})" if flag and flag != "ENTRY" else name


def _fail(name: str, message: str) -> SpecError:
    return SpecError(f"{_field(name)}: {message}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"must be an integer >= 1, got {value!r}")
    if value < 1:
        raise _fail(name, f"must be an integer >= 1, got {value}")
    return value


def _scalar_arg(where: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise SpecError(
        f"{where}: unsupported type {type(value).__name__}; use str, int, float, bool, a path, "
        "a list of those, '' for a bare flag or None to leave the parameter out"
    )


def script_params_to_argv(params: Mapping[str, Any] | None) -> list[str]:
    """Turn ``script_params`` into argv, keeping insertion order.

    ``{'--lr': 0.01}`` gives ``--lr 0.01``; ``''`` gives the bare flag; ``None`` leaves the key out;
    a list or tuple gives the key followed by each item (``--layers 64 32``, for ``nargs='+'``);
    other values are ``str()``-ed (so ``True`` becomes ``True``).
    """
    if params is None:
        return []
    if not isinstance(params, Mapping):
        raise SpecError(
            f"script_params: must be a dict such as {{'--batch-size': 50}}, got {type(params).__name__}"
        )
    argv: list[str] = []
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"script_params: keys must be non-empty strings, got {key!r}")
        where = f"script_params[{key!r}]"
        if value is None:
            continue
        if isinstance(value, str) and value == "":
            argv.append(key)
        elif isinstance(value, (list, tuple)):
            argv.append(key)
            argv.extend(_scalar_arg(where, item) for item in value)
        else:
            argv.extend((key, _scalar_arg(where, value)))
    return argv


def _env_vars(values: Mapping[str, Any] | None) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise _fail("environment_variables", f"must be a dict of name -> value, got {type(values).__name__}")
    out: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name or _ENV_NAME_BAD.search(name):
            raise _fail("environment_variables", f"invalid variable name {name!r}")
        if name.startswith(RESERVED_ENV_PREFIX):
            raise _fail("environment_variables", f"{name} is set by tflaunch itself and cannot be given")
        if isinstance(value, bool) or isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str):
            raise _fail("environment_variables", f"{name}: value must be a string, got {type(value).__name__}")
        if "\x00" in value:
            raise _fail("environment_variables", f"{name}: value contains a NUL byte")
        out[name] = value
    return out


class MpiConfiguration:
    """``distributed_training=MpiConfiguration()``: an MPI job (Horovod, mpi4py): ``mpirun`` starts the
    ``node_count`` x ``process_count_per_node`` ranks (see :mod:`tflaunch.mpirun`).

    As in the reference, the counts may be given here or on the estimator. tflaunch additions:
    ``mpirun`` (its path; default: the one next to the job's Python, else the first on ``PATH``),
    ``mpi_args`` (more mpirun options, passed as they are), ``launcher`` (``'mpirun'``; ``'srun'``
    inside a Slurm allocation: ``srun --mpi=pmix`` for Open MPI, ``pmi2`` for MPICH/Intel MPI, or
    ``srun_mpi``), ``mpi_iface`` (the network the ranks and daemons use: an interface name, or for
    Open MPI a subnet; spelled as the flavour needs it).
    """

    backend = "mpi"

    def __init__(self, process_count_per_node: int = 1, node_count: int = 1, *, mpirun: str | os.PathLike | None = None,
                 mpi_args: Sequence[str] = (), launcher: str = "mpirun", srun_mpi: str | None = None,
                 mpi_iface: str | None = None) -> None:
        self.process_count_per_node = process_count_per_node
        self.node_count = node_count
        if mpirun is not None and (not isinstance(mpirun, (str, os.PathLike)) or not os.fspath(mpirun)):
            raise _fail("mpirun", f"must be the path of mpirun, got {mpirun!r}")
        self.mpirun = os.fspath(mpirun) if mpirun is not None else None
        if isinstance(mpi_args, str) or not all(isinstance(a, str) for a in mpi_args):
            raise _fail("mpi_args", f"must be a list of strings, got {mpi_args!r}")
        self.mpi_args = list(mpi_args)
        if launcher not in ("mpirun", "srun"):
            raise _fail("launcher", f"must be 'mpirun' or 'srun', got {launcher!r}")
        self.launcher = launcher
        if srun_mpi is not None and (not isinstance(srun_mpi, str) or not re.match(r"^[a-z0-9_]+$", srun_mpi)):
            raise _fail("srun_mpi", f"must be an srun --mpi plugin name such as 'pmix' or 'pmi2', got {srun_mpi!r}")
        if srun_mpi is not None and launcher != "srun":
            raise _fail("srun_mpi", "only with launcher='srun' (--mpi-launcher srun)")
        self.srun_mpi = srun_mpi
        if mpi_iface is not None and (not isinstance(mpi_iface, str) or not re.match(r"^[\w.:/-]+$", mpi_iface)):
            raise _fail("mpi_iface", f"must be a network interface name (or for Open MPI a subnet), got {mpi_iface!r}")
        self.mpi_iface = mpi_iface

    @property
    def process_count_per_node(self) -> int:
        return self._process_count_per_node

    @process_count_per_node.setter
    def process_count_per_node(self, value: int) -> None:
        self._process_count_per_node = _positive_int("process_count_per_node", value)

    @property
    def node_count(self) -> int:
        return self._node_count

    @node_count.setter
    def node_count(self, value: int) -> None:
        self._node_count = _positive_int("node_count", value)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "process_count_per_node": self.process_count_per_node,
                "node_count": self.node_count, "mpirun": self.mpirun, "mpi_args": list(self.mpi_args),
                "launcher": self.launcher, "srun_mpi": self.srun_mpi, "mpi_iface": self.mpi_iface}

    def __repr__(self) -> str:
        return (f"MpiConfiguration(process_count_per_node={self.process_count_per_node}, "
                f"node_count={self.node_count})")


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


class _NativeTF:
    """Options shared by the native TensorFlow backends (``TF_CONFIG`` for every process)."""

    backend = ""

    def _tf_options(self, evaluator: bool, port_base: int | None, evaluator_grace: float) -> None:
        if not isinstance(evaluator, bool):
            raise SpecError(f"evaluator (--evaluator): must be True or False, got {evaluator!r}")
        self.evaluator = evaluator
        if port_base is not None and (isinstance(port_base, bool) or not isinstance(port_base, int)
                                      or not 1 <= port_base <= 65535):
            raise _fail("port_base", f"must be a port number 1-65535, got {port_base!r}")
        self.port_base = port_base
        if isinstance(evaluator_grace, bool) or not isinstance(evaluator_grace, (int, float)) \
                or not 0 <= evaluator_grace < float("inf"):
            raise _fail("evaluator_grace", f"must be a number of seconds >= 0, got {evaluator_grace!r}")
        self.evaluator_grace = float(evaluator_grace)

    def _common_dict(self) -> dict[str, Any]:
        return {"evaluator": self.evaluator, "port_base": self.port_base, "evaluator_grace": self.evaluator_grace}


class TensorflowConfiguration(_NativeTF):
    """``distributed_training=TensorflowConfiguration(...)``: native TensorFlow parameter-server job.

    ``worker_count`` workers and ``parameter_server_count`` ps tasks, as in the reference; tflaunch adds
    ``chief=True`` (a ``chief`` task: the coordinator that ``ParameterServerStrategy`` needs),
    ``evaluator=True`` (an ``evaluator`` task, outside the cluster), ``port_base`` (fixed ports
    ``port_base``, ``port_base+1``, ... on each host instead of free ones found at launch) and
    ``evaluator_grace`` (seconds the evaluator may go on after the chief ended). Every process gets
    ``TF_CONFIG``; the run's outcome is the chief's (worker 0's when there is no chief).
    """

    backend = "ps"

    def __init__(self, worker_count: int = 1, parameter_server_count: int = 1, *, chief: bool = False,
                 evaluator: bool = False, port_base: int | None = None,
                 evaluator_grace: float = DEFAULT_EVALUATOR_GRACE) -> None:
        self.worker_count = worker_count
        self.parameter_server_count = parameter_server_count
        if not isinstance(chief, bool):
            raise SpecError(f"chief (--chief): must be True or False, got {chief!r}")
        self.chief = chief
        self._tf_options(evaluator, port_base, evaluator_grace)

    # the reference sets these after construction (``d = TensorflowConfiguration(); d.worker_count = 2``)
    @property
    def worker_count(self) -> int:
        return self._worker_count

    @worker_count.setter
    def worker_count(self, value: int) -> None:
        self._worker_count = _count("worker_count", value, 1)

    @property
    def parameter_server_count(self) -> int:
        return self._parameter_server_count

    @parameter_server_count.setter
    def parameter_server_count(self, value: int) -> None:
        self._parameter_server_count = _count("parameter_server_count", value, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "worker_count": self.worker_count,
                "parameter_server_count": self.parameter_server_count, "chief": self.chief,
                **self._common_dict()}

    def __repr__(self) -> str:
        extra = "".join(f", {k}=True" for k in ("chief", "evaluator") if getattr(self, k))
        return (f"TensorflowConfiguration(worker_count={self.worker_count}, "
                f"parameter_server_count={self.parameter_server_count}{extra})")


class MultiWorkerConfiguration(_NativeTF):
    """``distributed_training=MultiWorkerConfiguration()``: ``MultiWorkerMirroredStrategy`` job.

    ``node_count`` x ``process_count_per_node`` workers (worker 0 acts as chief), each with a
    ``TF_CONFIG`` listing only the workers; ``evaluator=True`` adds an evaluator task.
    """

    backend = "multiworker"

    def __init__(self, *, evaluator: bool = False, port_base: int | None = None,
                 evaluator_grace: float = DEFAULT_EVALUATOR_GRACE) -> None:
        self._tf_options(evaluator, port_base, evaluator_grace)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, **self._common_dict()}

    def __repr__(self) -> str:
        return f"MultiWorkerConfiguration(evaluator={self.evaluator})"


def procs_per_host(process_count_per_node: int, distributed: Mapping[str, Any] | None) -> int:
    """Processes each host is asked for: a ps job's tasks are spread over the hosts by their slots, so it
    asks for 1 (and takes what the slots hold); any other job, ``process_count_per_node``."""
    return 1 if distribution(distributed).spread else process_count_per_node


def world_size(node_count: int, process_count_per_node: int, distributed: Mapping[str, Any] | None) -> int:
    """Number of processes a job asks for."""
    backend = (distributed or {}).get("backend")
    extra = 1 if distributed and distributed.get("evaluator") else 0
    if backend == "ps":
        return (int(distributed["worker_count"]) + int(distributed["parameter_server_count"])
                + (1 if distributed.get("chief") else 0) + extra)
    return node_count * process_count_per_node + extra


@dataclass
class JobSpec:
    """Normalized, JSON-serializable description of a job (stored as ``spec`` in ``run.json``)."""

    source_directory: str
    entry_script: str
    arguments: list[str] = field(default_factory=list)
    python: str = ""
    environment_variables: dict[str, str] = field(default_factory=dict)
    node_count: int = 1
    process_count_per_node: int = 1
    distributed: dict[str, Any] | None = None
    use_gpu: bool = False
    max_run_duration_seconds: float | None = None
    framework: dict[str, Any] | None = None
    gpus_per_node: int | None = None  # GPUs each host gives the job (default: found at launch)
    gpus_shared: bool = False  # several processes may share a GPU when there are too few
    compute_target: dict[str, Any] | None = None  # hosts used and how to reach them (tflaunch.target)
    packages: dict[str, Any] | None = None  # what to install: {"pip", "requirements_file", "conda", "index", "inherit"}
    # (index: the options given with the job; the home's and the workspace's config.json fill in the rest)
    environment: dict[str, Any] | None = None  # the environment to build (tflaunch.envs.EnvRequest), from packages
    setup_commands: list[str] = field(default_factory=list)  # shell lines run on every host before the processes
    inputs: list[dict[str, Any]] = field(default_factory=list)  # data references (tflaunch.data)
    preflight: bool = True  # a multi-host run checks that TensorFlow is the same everywhere first

    @property
    def world_size(self) -> int:
        return world_size(self.node_count, self.process_count_per_node, self.distributed)

    @property
    def procs_per_host(self) -> int:
        return procs_per_host(self.process_count_per_node, self.distributed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


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


def _strings(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise _fail(name, f"must be a list of strings such as ['keras'], got {value!r}")
    return list(value)


def _with_inputs(where: str, value: Any, inputs: list[dict[str, Any]]) -> Any:
    """A data reference becomes the ``{data:NAME}`` placeholder each host replaces with its path."""
    from . import data

    if data.is_reference(value):
        return data.add_input(value, inputs, where)
    if isinstance(value, (list, tuple)):
        return type(value)(_with_inputs(f"{where}[{i}]", v, inputs) for i, v in enumerate(value))
    return value


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
    is the same everywhere first).
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
            from . import data
            for i, ref in enumerate(inputs):
                if not data.is_reference(ref):
                    raise SpecError(f"inputs[{i}]: must be a Datastore/Dataset reference such as "
                                    f"ds.as_named_input('mnist').as_mount(), got {type(ref).__name__}")
                data.add_input(ref, self.inputs, f"inputs[{i}]")
        from .target import SlurmTarget, SSHTarget

        if compute_target is not None and not isinstance(compute_target, (SSHTarget, SlurmTarget)) and not (
                isinstance(compute_target, str) and compute_target.lower() == "local"):
            raise _fail("compute_target", f"{compute_target!r} is not supported; give 'local', SSHTarget(hosts=[...]) "
                                          "or SlurmTarget(...)")
        self.compute_target = compute_target if isinstance(compute_target, (SSHTarget, SlurmTarget)) else "local"
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
        """The hosts this job uses and how to reach them (see :func:`tflaunch.target.resolve_target`)."""
        from .target import resolve_target

        nodes, ppn = self._check_counts()
        distributed = self._distributed()
        return resolve_target(self.compute_target, nodes, procs_per_host(ppn, distributed),
                              world=world_size(nodes, ppn, distributed))

    def job_spec(self) -> JobSpec:
        """The normalized spec; relative paths are resolved against the current directory.

        The hosts are chosen here: the compute target's first ``node_count`` hosts, or the Slurm/PBS
        allocation tflaunch runs in, or this machine (see :func:`tflaunch.target.resolve_target`).
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
        )
        from . import data
        data.check_placeholders(spec.arguments, spec.inputs)
        from .tfconfig import place

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
