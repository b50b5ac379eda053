"""The ``distributed_training=`` configurations: :class:`MpiConfiguration` (mpirun / srun ranks),
:class:`TensorflowConfiguration` (native parameter-server job) and :class:`MultiWorkerConfiguration`
(``MultiWorkerMirroredStrategy``), each validated eagerly and serialized by ``to_dict()`` into
:attr:`tflaunch.spec.jobspec.JobSpec.distributed`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ..errors import SpecError
from .fields import _count, _fail, _positive_int

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["MpiConfiguration", "TensorflowConfiguration", "MultiWorkerConfiguration", "DEFAULT_EVALUATOR_GRACE"]

DEFAULT_EVALUATOR_GRACE = 30.0


class MpiConfiguration:
    """``distributed_training=MpiConfiguration()``: an MPI job (Horovod, mpi4py): ``mpirun`` starts the
    ``node_count`` x ``process_count_per_node`` ranks (see :mod:`tflaunch.plan.mpirun`).

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
