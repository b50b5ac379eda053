"""What to run and where, from the command line: the options ``run`` and ``sweep`` share (the job:
script, hosts, backend, GPUs, packages, ...) and the estimator they describe."""
from __future__ import annotations

import argparse
import os

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["add_job_options", "add_ssh_options", "estimator_from_args", "key_value", "positive_float", "store_from_args"]


def store_from_args(args: argparse.Namespace) -> Any:
    """The run store of ``--home`` (default: $TFLAUNCH_HOME, else ~/.tflaunch)."""
    from ..history.store import Store
    return Store(getattr(args, "home", None))


def key_value(kind: str):
    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected {kind}=VALUE, got {text!r}")
        return name, value
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _exit_codes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.replace(" ", "").split(",") if c]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected exit codes such as 75,76, got {text!r}") from None


def add_ssh_options(parser: argparse.ArgumentParser) -> None:
    """How the ssh client reaches the hosts (``run``, ``sweep``, ``doctor``)."""
    parser.add_argument("--ssh-port", type=int, metavar="PORT", help="ssh port for every host")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for ssh -o (repeatable); ~/.ssh/config applies as usual")
    parser.add_argument("--ssh-config", metavar="FILE", help="ssh client configuration file (ssh -F)")
    parser.add_argument("--connect-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help="ssh connect timeout per host (default: 10)")


def add_job_options(run: argparse.ArgumentParser) -> None:
    """The options that say what to run and where (``run``, and ``sweep`` for its trials)."""
    run.add_argument("entry", metavar="ENTRY", help="entry script, relative to --source-dir")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")
    run.add_argument("--source-dir", default=".", metavar="DIR", help="directory snapshotted for the run (default: .)")
    run.add_argument("--experiment", "-e", default="default", metavar="NAME", help="experiment name (default: default)")
    run.add_argument("--python", metavar="PATH", help="interpreter for the script (default: the one running tflaunch)")
    run.add_argument("--env", action="append", type=key_value("NAME"), default=[], metavar="NAME=VALUE",
                     help="environment variable for the script (repeatable)")
    run.add_argument("--framework-version", metavar="VERSION",
                     help="run with this TensorFlow (e.g. 2.15): the job's interpreter when it has a matching one, "
                          "else an environment with that series, built once")
    run.add_argument("--gpu", action="store_true",
                     help="give each process its share of its host's GPUs (default: CUDA_VISIBLE_DEVICES is set empty)")
    run.add_argument("--gpus-per-node", type=int, metavar="N",
                     help="with --gpu: GPUs each host gives the job (default: its CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    run.add_argument("--gpus-shared", action="store_true",
                     help="with --gpu: let processes share GPUs when a host has fewer GPUs than processes")
    run.add_argument("--backend", choices=("plain", "ps", "multiworker", "mpi"), default="plain",
                     help="plain: TFLAUNCH_RANK etc. only; ps: TensorFlow parameter-server job (--workers, --ps, "
                          "--chief); multiworker: MultiWorkerMirroredStrategy workers; both get TF_CONFIG; "
                          "mpi: mpirun starts the ranks (Horovod, mpi4py)")
    run.add_argument("--mpirun", metavar="PATH",
                     help="--backend mpi: the mpirun to use (Open MPI, MPICH or Intel MPI; default: the one "
                          "next to the job's Python, then PATH)")
    run.add_argument("--mpi-arg", action="append", default=[], metavar="ARG",
                     help="--backend mpi: pass ARG to mpirun as it is (repeatable; --mpi-arg=--mca for an ARG "
                          "that starts with -)")
    run.add_argument("--mpi-iface", metavar="IFACE",
                     help="--backend mpi: the network interface MPI uses (Open MPI also takes a subnet, "
                          "e.g. 10.0.0.0/24)")
    run.add_argument("--mpi-launcher", choices=("mpirun", "srun"), default=None,
                     help="--backend mpi inside a Slurm allocation: srun --mpi=pmix|pmi2 instead of mpirun "
                          "(default: mpirun, which uses the allocation itself)")
    run.add_argument("--srun-mpi", metavar="PLUGIN",
                     help="with --mpi-launcher srun: the srun --mpi plugin (default: pmix for Open MPI, pmi2 "
                          "for MPICH and Intel MPI)")
    run.add_argument("--workers", type=int, metavar="N", help="--backend ps: worker tasks (default: 1)")
    run.add_argument("--ps", type=int, metavar="N", help="--backend ps: parameter-server tasks (default: 1)")
    run.add_argument("--chief", action="store_true",
                     help="--backend ps: add a chief task (the coordinator of ParameterServerStrategy)")
    run.add_argument("--evaluator", action="store_true", help="--backend ps|multiworker: add an evaluator task")
    run.add_argument("--evaluator-grace", type=float, metavar="SECONDS",
                     help="how long the evaluator may go on after the chief ended (default: 30)")
    run.add_argument("--port-base", type=int, metavar="PORT",
                     help="--backend ps|multiworker: fixed ports PORT, PORT+1, ... on each host (default: free ports)")
    run.add_argument("--nodes", type=int, metavar="N",
                     help="node_count: hosts to use (default: all given hosts, else 1)")
    run.add_argument("--procs-per-node", type=int, metavar="N",
                     help="process_count_per_node (default: the hosts' slots when hosts are given, else 1)")
    hosts = run.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", metavar="H[:SLOTS],...",
                       help="hosts reached over ssh, e.g. node1:4,node2:4 (default: this machine, or the "
                            "Slurm/PBS allocation tflaunch runs in)")
    hosts.add_argument("--hostfile", metavar="FILE", help="hosts from a file of 'HOST slots=N' lines")
    run.add_argument("--launcher", choices=("srun", "ssh"), default=None,
                     help="inside a Slurm allocation: start the processes as one srun step (default), or over ssh")
    slurm = run.add_argument_group("submitting to Slurm (--slurm)")
    slurm.add_argument("--slurm", action="store_true",
                       help="submit the run with sbatch (the batch script is written into the run record); "
                            "the run is Queued until Slurm starts it; --nodes/--procs-per-node/--gpus-per-node "
                            "say what to ask for")
    slurm.add_argument("--partition", "-p", metavar="NAME", help="sbatch --partition")
    slurm.add_argument("--time", "-t", metavar="LIMIT", help="sbatch --time (e.g. 30, 02:00:00, 1-00:00:00)")
    slurm.add_argument("--account", "-A", metavar="NAME", help="sbatch --account")
    slurm.add_argument("--qos", metavar="NAME", help="sbatch --qos")
    slurm.add_argument("--job-name", metavar="NAME", help="sbatch --job-name (default: tflaunch-EXPERIMENT)")
    slurm.add_argument("--signal", metavar="SIG@SECONDS", default=None,
                       help="sent to every process this long before the time limit, to checkpoint (default: "
                            "USR2@60; the script sees its name in $TFLAUNCH_CHECKPOINT_SIGNAL; 'none' for no "
                            "signal; USR1 is refused: NCCL uses it)")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="any other sbatch option, as it is (repeatable; --sbatch-arg=--constraint=a100)")
    run.add_argument("--oversubscribe", action="store_true", help="allow more processes per host than slots")
    add_ssh_options(run)
    run.add_argument("--keep-remote", action="store_true",
                     help="keep the copy of the job on hosts without a shared filesystem")
    run.add_argument("--remote-scratch", metavar="DIR",
                     help="where hosts without a shared filesystem get their copy (default: $TMPDIR or /tmp)")
    run.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                     help="stop the run after this long; it ends Failed (reason: timeout)")
    recover = run.add_argument_group("recovery (default: the first failure ends the run)")
    recover.add_argument("--max-restarts", type=int, metavar="N",
                         help="restart a failed run up to N times (same run id, attempt counted; ps jobs restart "
                              "the failed task, others the whole group)")
    recover.add_argument("--restart-on-exit-codes", type=_exit_codes, metavar="CODE,...",
                         help="exit codes that restart without using --max-restarts (e.g. 75: the script "
                              "saved a checkpoint and asks to be restarted)")
    recover.add_argument("--restart-delay", type=float, metavar="SECONDS",
                         help="wait before a restart (default: 1), doubled after each failure (at most 300)")
    recover.add_argument("--hang-timeout", type=positive_float, metavar="SECONDS",
                         help="no output and no metric from any rank for this long: record the ranks' Python "
                              "stacks, stop the attempt (reason: hung; restartable)")
    recover.add_argument("--hang-grace", type=float, metavar="SECONDS",
                         help="no hang is declared this soon after the processes start (default: 60)")
    recover.add_argument("--max-requeues", type=int, metavar="N",
                         help="with --slurm: requeue the job up to N times on preemption or a time-limit warning "
                              "(the same run continues in the next allocation; default: 0)")
    run.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                     help="time between SIGTERM and SIGKILL when stopping (default: 10)")
    run.add_argument("--tag", action="append", type=key_value("KEY"), default=[], metavar="KEY=VALUE",
                     help="tag recorded with the run (repeatable)")
    run.add_argument("--detach", "-d", action="store_true", help="print the run id and return; the run goes on")
    run.add_argument("--dry-run", action="store_true", help="print what would run; start nothing, write nothing")
    run.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    run.add_argument("--snapshot-max-mb", type=float, metavar="MB",
                     help="snapshot size limit (default: 300, or $TFLAUNCH_SNAPSHOT_MAX_MB)")
    run.add_argument("--snapshot-max-files", type=int, metavar="N",
                     help="snapshot file-count limit (default: 2000, or $TFLAUNCH_SNAPSHOT_MAX_FILES)")
    run.add_argument("--scratch", metavar="DIR",
                     help="build the working directory under DIR (e.g. node-local disk) instead of in the record")
    prep = run.add_argument_group("before the processes start")
    prep.add_argument("--setup", action="append", default=[], metavar="CMD",
                      help="shell line run on every host before the processes start, all lines in one shell "
                           "(repeatable; what they export, e.g. `module load cuda/12.4`, the processes inherit)")
    prep.add_argument("--data", action="append", default=[], metavar="NAME=PATH[:download]",
                      help="data input NAME: PATH used in place on every host (checked first), or with "
                           ":download copied to each host's node-local scratch; {data:NAME} in ARGS is its path")
    prep.add_argument("--no-preflight", action="store_true",
                      help="start a multi-host run even if the hosts' TensorFlow versions differ")
    from .env import add_package_options
    add_package_options(run)


def estimator_from_args(args: argparse.Namespace) -> Any:
    """The Estimator (TensorFlow with --framework-version) the job options describe."""
    from ..spec import Estimator, TensorFlow

    script_args = list(args.script_args)  # argparse already dropped the "--" right after ENTRY
    distributed = _distributed(args)
    target, nodes, ppn = _compute_target(args, distributed)
    if args.gpu and args.gpus_per_node is None and getattr(target, "launcher", None) == "srun":
        from ..slurm import gpus_per_node
        args.gpus_per_node = gpus_per_node(os.environ)  # the allocation's GPUs per node
    from ..data import parse_cli

    kwargs: dict[str, Any] = dict(
        entry_script=args.entry, arguments=script_args, node_count=nodes, compute_target=target,
        process_count_per_node=ppn, use_gpu=args.gpu, environment_variables=dict(args.env),
        max_run_duration_seconds=args.timeout, python=args.python, distributed_training=distributed,
        gpus_per_node=args.gpus_per_node, gpus_shared=args.gpus_shared, setup_commands=args.setup,
        preflight=not args.no_preflight, max_restarts=args.max_restarts,
        restart_on_exit_codes=args.restart_on_exit_codes, restart_delay=args.restart_delay,
        hang_timeout=args.hang_timeout, hang_grace=args.hang_grace, max_requeues=args.max_requeues,
        **_estimator_packages(args))
    if args.framework_version is not None:
        estimator: Estimator = TensorFlow(args.source_dir, framework_version=args.framework_version, **kwargs)
    else:
        estimator = Estimator(args.source_dir, **kwargs)
    estimator.inputs = parse_cli(args.data)
    return estimator


def _estimator_packages(args: argparse.Namespace) -> dict[str, Any]:
    """The estimator's package arguments from the package options (tflaunch.cli.env.package_options);
    none given: nothing (and tflaunch.envs is not imported)."""
    if not (args.pip or args.requirements or args.conda or args.find_links or args.index_url or args.no_index
            or args.no_inherit_packages or args.env_builder != "auto"):
        return {}
    from .env import package_options

    options = package_options(args, store_from_args(args).home)
    builder = args.env_builder
    index = options["index"].to_dict()
    return {"pip_packages": list(options["pip_packages"]) or None,
            "pip_requirements_file": options["requirements_file"],
            "conda_packages": list(options["conda_packages"]) or None,
            "find_links": index.get("find_links") or None, "index_url": index.get("index_url"),
            "no_index": index.get("no_index") or None, "inherit_packages": options["inherit"],
            "environment_builder": builder}


def _distributed(args: argparse.Namespace) -> Any:
    """The distributed_training object the --backend options describe (None for plain)."""
    from ..spec import MultiWorkerConfiguration, TensorflowConfiguration
    from ..spec.distributed_training import DEFAULT_EVALUATOR_GRACE

    given = [flag for flag, value in (("--workers", args.workers), ("--ps", args.ps)) if value is not None]
    given += [flag for flag, value in (("--chief", args.chief),) if value]
    if args.backend != "ps" and given:
        raise SpecError(f"{', '.join(given)}: only with --backend ps (a {args.backend} job has --nodes x "
                        "--procs-per-node processes)")
    tf_only = [flag for flag, value in (("--evaluator", args.evaluator or None), ("--port-base", args.port_base),
                                        ("--evaluator-grace", args.evaluator_grace)) if value is not None]
    if args.evaluator_grace is not None and not args.evaluator:
        raise SpecError("--evaluator-grace: only with --evaluator")
    mpi_only = [flag for flag, value in (("--mpirun", args.mpirun), ("--mpi-arg", args.mpi_arg or None),
                                         ("--mpi-launcher", args.mpi_launcher), ("--srun-mpi", args.srun_mpi),
                                         ("--mpi-iface", args.mpi_iface))
                if value is not None]
    if args.backend != "mpi" and mpi_only:
        raise SpecError(f"{', '.join(mpi_only)}: only with --backend mpi")
    if args.backend in ("plain", "mpi"):
        if tf_only:
            raise SpecError(f"{', '.join(tf_only)}: only with --backend ps or multiworker")
        if args.backend == "mpi":
            from ..spec import MpiConfiguration
            return MpiConfiguration(mpirun=args.mpirun, mpi_args=args.mpi_arg,
                                    launcher=args.mpi_launcher or "mpirun", srun_mpi=args.srun_mpi,
                                    mpi_iface=args.mpi_iface)
        return None
    options = dict(evaluator=args.evaluator, port_base=args.port_base,
                   evaluator_grace=DEFAULT_EVALUATOR_GRACE if args.evaluator_grace is None else args.evaluator_grace)
    if args.backend == "multiworker":
        return MultiWorkerConfiguration(**options)
    if args.procs_per_node is not None:
        raise SpecError("--procs-per-node does not apply to --backend ps: give --workers and --ps; "
                        "tflaunch spreads the tasks over --nodes hosts")
    return TensorflowConfiguration(worker_count=1 if args.workers is None else args.workers,
                                   parameter_server_count=1 if args.ps is None else args.ps, chief=args.chief,
                                   **options)


def _compute_target(args: argparse.Namespace, distributed: Any = None) -> tuple[Any, int, int]:
    """The compute target the host options describe, and node_count / process_count_per_node with
    their defaults: every given host (or allocation node) and its slots; else one local process."""
    from ..spec.hosts import discover
    from ..spec.target import SlurmTarget, SSHTarget

    ssh = dict(ssh_port=args.ssh_port, ssh_options=args.ssh_option, ssh_config=args.ssh_config,
               connect_timeout=args.connect_timeout, oversubscribe=args.oversubscribe,
               keep_remote=args.keep_remote, remote_scratch=args.remote_scratch)
    sbatch_only = [flag for flag, value in (("--partition", args.partition), ("--time", args.time),
                                            ("--account", args.account), ("--qos", args.qos),
                                            ("--job-name", args.job_name), ("--signal", args.signal),
                                            ("--sbatch-arg", args.sbatch_arg or None)) if value is not None]
    if args.slurm:
        if args.hosts or args.hostfile:
            raise SpecError("--slurm: Slurm chooses the hosts; leave out --hosts/--hostfile")
        from ..slurm import DEFAULT_SIGNAL
        target: Any = SlurmTarget(partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                                  job_name=args.job_name, sbatch_args=args.sbatch_arg,
                                  signal=DEFAULT_SIGNAL if args.signal is None else args.signal,
                                  launcher=args.launcher or "srun")
        nodes = args.nodes if args.nodes is not None else 1
        ppn = args.procs_per_node if args.procs_per_node is not None else 1
        if args.backend == "ps":
            ppn = 1
        return target, nodes, ppn
    if sbatch_only:
        raise SpecError(f"{', '.join(sbatch_only)}: only with --slurm (submitting the run with sbatch)")
    if args.launcher is not None and (args.hosts or args.hostfile):
        raise SpecError("--launcher: only for the hosts of a Slurm allocation; --hosts/--hostfile hosts are "
                        "reached over ssh")
    if args.hostfile:
        target: Any = SSHTarget.from_hostfile(args.hostfile, **ssh)
        hosts = target.hosts
    elif args.hosts:
        target = SSHTarget(args.hosts, source="--hosts", **ssh)
        hosts = target.hosts
    else:
        found, source = discover()
        launcher = args.launcher
        if launcher is not None and source != "SLURM_JOB_NODELIST":
            raise SpecError("--launcher: only inside a Slurm allocation (SLURM_JOB_ID is not set) or with --slurm")
        if found and launcher is None:
            from shutil import which
            launcher = "srun" if source == "SLURM_JOB_NODELIST" and which("srun") else "ssh"
        target = SSHTarget(found, source=source, launcher=launcher or "ssh", **ssh) if found else "local"
        hosts = found or []
    nodes = args.nodes if args.nodes is not None else max(1, len(hosts))
    ppn = args.procs_per_node
    if args.backend == "ps":
        ppn = 1  # the tasks are spread over the hosts by their slots
        if args.nodes is None:  # every given host, but not more hosts than tasks
            from ..spec.jobspec import world_size
            nodes = max(1, min(nodes, world_size(1, 1, distributed.to_dict())))
    elif ppn is None:
        chosen = hosts[:nodes]
        ppn = min((h.slots for h in chosen), default=1)
        if args.backend == "mpi" and len({h.slots for h in chosen}) > 1:
            # mpirun would give each host its own slot count; tflaunch (like Intel MPI's -ppn) runs
            # the same number on every node: say so rather than run fewer ranks than the hostfile implies
            raise SpecError("--procs-per-node: the hosts have different slot counts ("
                            + ", ".join(f"{h.name}:{h.slots}" for h in chosen) + "); an MPI job runs the same "
                            f"number of ranks on every node (like Intel MPI's -ppn): give --procs-per-node N "
                            f"(at most {ppn} here)")
    return target, nodes, ppn
