"""The CLI of sweeps: ``tflaunch sweep --config sweep.json`` (or the run options plus ``--param``),
``tflaunch sweep show|cancel|resume SWEEP``."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .. import textfmt
from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["add_commands", "route"]

ACTIONS = ("start", "show", "cancel", "resume")
_EPILOG = """\
Examples:
  python -m tflaunch sweep --config sweep.json
  python -m tflaunch sweep --param '--learning-rate=loguniform(-6, -1)' --param '--batch-size=choice(16, 32, 64)' \\
      --primary-metric accuracy --goal maximize --policy bandit --slack-factor 0.1 --delay-evaluation 2 \\
      --max-total-runs 20 --max-concurrent-runs 4 --source-dir ./proj train.py -- --epochs 5
  python -m tflaunch sweep show SWEEP         # the trials: hyperparameters, status, primary metric
  python -m tflaunch sweep resume SWEEP       # after its driver was lost
"""


def route(argv: Sequence[str]) -> list[str]:
    """``tflaunch sweep ...`` without an action is ``tflaunch sweep start ...``."""
    argv = list(argv)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the global options before the command
        i += 2 if argv[i] in ("--home", "--log-level") else 1
    if i < len(argv) and argv[i] == "sweep":
        following = argv[i + 1] if i + 1 < len(argv) else None
        if following not in ACTIONS and following not in ("-h", "--help"):
            argv.insert(i + 1, "start")
    return argv


def add_commands(commands: Any, common: argparse.ArgumentParser, parser_class: type) -> None:
    from .job import add_job_options

    sweep = commands.add_parser("sweep", parents=[common], help="hyperparameter sweeps (HyperDrive): start, show, "
                                                                "cancel, resume",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                                description="tflaunch sweep [start] (--config FILE | OPTIONS ENTRY [ARGS]) starts a "
                                            "sweep; tflaunch sweep show|cancel|resume SWEEP")
    sub = sweep.add_subparsers(dest="sweep_command", metavar="ACTION", parser_class=parser_class)
    sub.required = True

    p = sub.add_parser("start", parents=[common], help="start a sweep (the default action)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    add_job_options(p)
    for action in p._actions:  # with --config the job comes from the file
        if action.dest == "entry":
            action.nargs, action.required, action.default = "?", False, None
    g = p.add_argument_group("the sweep")
    g.add_argument("--config", metavar="FILE", help="the sweep as a JSON file (see README \"Hyperparameter "
                                                    "sweeps\"); the other sweep options override it")
    g.add_argument("--param", action="append", default=[], metavar="NAME=EXPR",
                   help="a hyperparameter and its expression, e.g. 'lr=loguniform(-6, -1)' or --param=--batch-size=choice(16,32) "
                        "(repeatable; the trial gets it as NAME VALUE, a NAME without - as --NAME)")
    g.add_argument("--sampling", choices=("random", "grid", "bayesian"), help="how trials are drawn (default: random)")
    g.add_argument("--seed", type=int, help="random and Bayesian sampling: the seed (default: chosen and recorded)")
    g.add_argument("--primary-metric", metavar="NAME", help="the metric the script logs that ranks the trials")
    g.add_argument("--goal", choices=("maximize", "minimize"), help="maximize or minimize the primary metric")
    g.add_argument("--policy", choices=("none", "bandit", "median", "truncation"),
                   help="early termination (default: none)")
    g.add_argument("--evaluation-interval", type=int, metavar="N", help="policy: look every N intervals (default 1)")
    g.add_argument("--delay-evaluation", type=int, metavar="N", help="policy: not before interval N (default 0)")
    g.add_argument("--slack-factor", type=float, metavar="F", help="bandit: the allowed ratio to the best trial")
    g.add_argument("--slack-amount", type=float, metavar="A", help="bandit: the allowed distance to the best trial")
    g.add_argument("--truncation-percentage", type=int, metavar="P", help="truncation: stop the worst P%% (1-99)")
    g.add_argument("--max-total-runs", type=int, metavar="N", help="trials in all (1-1000)")
    g.add_argument("--max-concurrent-runs", type=int, metavar="N", help="trials at once (1-100; default: as many as "
                                                                        "fit)")
    g.add_argument("--max-duration-minutes", type=float, metavar="M", help="then running trials are canceled "
                                                                           "(default: 10080)")
    g.add_argument("--slots", type=int, metavar="N", help="a local sweep: processes this machine runs at once "
                                                         "(default: its CPU count)")
    g.add_argument("--no-job-array", dest="job_array", action="store_false", default=None,
                   help="with --slurm: one sbatch per trial (default: grid and random trials go as one job array)")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("show", parents=[common], help="a sweep's trials: hyperparameters, status, primary metric")
    p.add_argument("sweep", metavar="SWEEP", help="the sweep's run id (or a unique prefix or suffix)")
    p.add_argument("--json", action="store_true", help="print the sweep's state (sweep.json) with its status")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("cancel", parents=[common], help="cancel a sweep and its running trials")
    p.add_argument("sweep", metavar="SWEEP")
    p.add_argument("--wait", action="store_true", help="wait until the sweep has ended")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", parents=[common], help="continue a sweep whose driver was lost (killed, "
                                                        "host rebooted): running trials are adopted")
    p.add_argument("sweep", metavar="SWEEP")
    p.add_argument("--detach", "-d", action="store_true", help="print the sweep id and return")
    p.set_defaults(func=cmd_resume)


def _config(args: argparse.Namespace) -> tuple[Any, str | None, dict[str, str]]:
    """The HyperDriveConfig from --config and/or the options (options win)."""
    from .job import estimator_from_args
    from ..sweep.config import HyperDriveConfig, load_config
    from ..sweep.policy import policy_from_dict
    from ..sweep.sampling import sampling_from_dict

    base: dict[str, Any] = {}
    experiment, tags = None, {}
    if args.config:
        if args.entry is not None:
            raise SpecError("--config gives the job: leave out ENTRY (or leave out --config and give the job here)")
        given = _job_options_given(args)
        if given:
            raise SpecError(f"--config gives the job: {given[0]} cannot be added to it (put it in the file's "
                            "\"estimator\", or leave out --config)")
        loaded, experiment, tags = load_config(args.config)
        base = {"estimator": loaded.estimator, "sampling": loaded.to_dict()["hyperparameter_sampling"],
                "policy": loaded.policy.to_dict(), **{k: v for k, v in loaded.to_dict().items()
                                                        if k not in ("hyperparameter_sampling", "policy")}}
    elif args.entry is None:
        raise SpecError("give the sweep as --config FILE, or the job (ENTRY) with --param NAME=EXPR ...")
    estimator = base.get("estimator") or estimator_from_args(args)
    sampling = dict(base.get("sampling") or {"kind": "random", "parameter_space": {}, "seed": None})
    if args.param:
        space = {}
        for item in args.param:
            name, sep, expr = item.partition("=")
            if not sep or not name:
                raise SpecError(f"--param: expected NAME=EXPR such as '--lr=uniform(0, 1)', got {item!r}")
            space[name] = expr
        sampling["parameter_space"] = space
    if args.sampling:
        sampling["kind"] = args.sampling
    if args.seed is not None:
        sampling["seed"] = args.seed
    if sampling["kind"] == "grid":
        sampling.pop("seed", None)
    if not sampling.get("parameter_space"):
        raise SpecError("give the hyperparameters with --param NAME=EXPR (or in --config)")
    policy = dict(base.get("policy") or {"kind": "none"})
    if args.policy:
        policy = {"kind": args.policy}
    for key in ("evaluation_interval", "delay_evaluation", "slack_factor", "slack_amount", "truncation_percentage"):
        value = getattr(args, key)
        if value is not None:
            if policy.get("kind", "none") in ("none", "NoTerminationPolicy"):
                raise SpecError(f"--{key.replace('_', '-')} goes with --policy bandit|median|truncation")
            policy[key] = value
    option = {"primary_metric_name": "primary_metric", "primary_metric_goal": "goal"}  # else the same name

    def pick(name: str, default: Any = None) -> Any:
        """The option's value when given, else the config file's, else ``default``."""
        value = getattr(args, option.get(name, name), None)
        return value if value is not None else base.get(name, default)

    config = HyperDriveConfig(
        estimator=estimator, hyperparameter_sampling=sampling_from_dict(sampling, "--param/--sampling"),
        primary_metric_name=pick("primary_metric_name"), primary_metric_goal=pick("primary_metric_goal"),
        policy=policy_from_dict(policy, "--policy"), max_total_runs=pick("max_total_runs"),
        max_concurrent_runs=pick("max_concurrent_runs"), max_duration_minutes=pick("max_duration_minutes", 10080),
        slots=pick("slots"), job_array=pick("job_array"))
    return config, experiment, tags


# options of the sweep's own run record, not of its job: they go with --config too
_RECORD_OPTIONS = ("experiment", "tag", "detach", "dry_run", "json", "grace", "scratch", "snapshot_max_mb",
                   "snapshot_max_files", "entry", "script_args", "help")


def _job_options_given(args: argparse.Namespace) -> list[str]:
    """The job options (``--hosts``, ``--gpu``, ...) given on the command line: ``--option`` names."""
    from .job import add_job_options

    probe = argparse.ArgumentParser(add_help=False)
    add_job_options(probe)
    return [action.option_strings[0] for action in probe._actions
            if action.dest not in _RECORD_OPTIONS and action.option_strings
            and getattr(args, action.dest, action.default) != action.default]


def cmd_start(args: argparse.Namespace) -> int:
    from ..history.snapshot import SnapshotLimits
    from ..submit import SubmitOptions, create_run
    from ..sweep.driver import spawn_driver
    from ..sweep.submit import prepare_sweep, sweep_dry_run

    if args.json and not args.dry_run:
        raise SpecError("--json goes with --dry-run (use `sweep show --json` for a sweep's state)")
    config, experiment, tags = _config(args)
    if args.experiment != "default" or experiment is None:
        experiment = args.experiment
    limits = None
    if args.snapshot_max_mb is not None or args.snapshot_max_files is not None:
        limits = SnapshotLimits.from_env(args.snapshot_max_mb, args.snapshot_max_files)
    options = SubmitOptions(experiment=experiment, home=getattr(args, "home", None), tags={**tags, **dict(args.tag)},
                            limits=limits, grace=args.grace, scratch=args.scratch)
    prepared = prepare_sweep(config, options)
    if args.dry_run:
        plan = sweep_dry_run(prepared)
        if args.json:
            sys.stdout.write(json.dumps(plan, indent=2) + "\n")
        else:
            _print_plan(plan)
        return 0
    record = create_run(prepared)
    spawn_driver(record)
    if args.detach:
        sys.stdout.write(record.id + "\n")
        return 0
    import logging
    logging.getLogger("tflaunch").info("sweep %s (experiment %s), record %s", record.id, experiment, record.dir)
    return _follow(record)


def _follow(record: Any) -> int:
    """Print the sweep's progress until it ends; Ctrl-C cancels it (a second Ctrl-C leaves it running)."""
    from ..history.store import TERMINAL, exit_code_for
    from ..submit import cancel_run
    from ..sweep import trials as T
    from ..tail import follow_files

    interrupts = 0
    while True:
        try:
            follow_files(lambda: [(record.path(T.SWEEP_LOG), sys.stdout, "")],
                         lambda: (record.read_status() or {}).get("status") in TERMINAL)
            break
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts > 1:
                sys.stderr.write(f"tflaunch: left sweep {record.id} being canceled\n")
                return 130
            sys.stderr.write(f"tflaunch: canceling sweep {record.id} and its trials (Ctrl-C again to leave)\n")
            cancel_run(record, "interrupted (Ctrl-C)")
    final = record.read_status() or {}
    error = final.get("error") or {}
    sys.stderr.write(f"tflaunch: sweep {record.id} {final.get('status')}"
                     + (f": {error.get('message')}" if error else "") + "\n")
    return exit_code_for(final)


def _print_plan(plan: dict[str, Any]) -> None:
    import shlex
    config = plan["sweep"]
    lines = ["dry run: nothing started, nothing written",
             f"sampling:    {config['hyperparameter_sampling']['kind']}"
             + (f" (seed {config['hyperparameter_sampling'].get('seed')})"
                if config['hyperparameter_sampling'].get('seed') is not None else ""),
             f"primary:     {config['primary_metric_name']} ({config['primary_metric_goal']})",
             f"policy:      {config['policy']['kind']}",
             f"trials:      {config['max_total_runs']} in all"
             + (f" (the space holds {plan['space_size']})" if plan["space_size"] is not None else "")
             + f", {plan['trials_at_once']} at once"]
    first = plan["first_trials"]
    if isinstance(first, str):
        lines.append(f"first trials: {first}")
    else:
        lines.append("first trials:")
        entry = plan["run"]["snapshot"]["entry_script"]
        lines += [f"  {t['index']}: {shlex.join([entry, *t['arguments']])}" for t in first]
    sys.stdout.write("\n".join(lines) + "\n")


def cmd_show(args: argparse.Namespace) -> int:
    from .job import store_from_args as _store
    from ..sweep import trials as T
    from ..sweep.submit import sweep_record

    record = sweep_record(_store(args), args.sweep)
    status = record.read_status() or {}
    try:
        state = T.load(record.dir)
    except FileNotFoundError:
        state = {"trials": [], "config": record.definition()["sweep"]["config"]}
    if args.json:
        sys.stdout.write(json.dumps({"status": status, **state}, indent=2) + "\n")
        return 0
    config = state["config"]
    summary = T.summary(state)
    error = status.get("error") or {}
    lines = [f"sweep:       {record.id} ({status.get('experiment')})",
             f"status:      {status.get('status')}" + (f" ({error.get('reason')}: {error.get('message')})" if error
                                                      else f" ({status['cancel_reason']})" if status.get("cancel_reason")
                                                      else ""),
             f"sampling:    {config['hyperparameter_sampling']['kind']}, policy {config['policy']['kind']}",
             f"primary:     {config['primary_metric_name']} ({config['primary_metric_goal']})",
             f"trials:      {summary['trials']} of {config['max_total_runs']}: "
             + ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))]
    best = summary["best"]
    if best:
        lines.append(f"best:        trial {best['index']} ({best['run_id']}) {config['primary_metric_name']} "
                     f"{textfmt.value(best['value'])}  " + " ".join(f"{k}={T.value_text(v)}"
                                                                 for k, v in best["hyperparameters"].items()))
    sys.stdout.write("\n".join(lines) + "\n")
    names = list(config["hyperparameter_sampling"]["parameter_space"])
    rows = [("TRIAL", "RUN", "STATUS", *names, "INTERVALS", "BEST", "LAST", "NOTE")]
    for t in state["trials"]:
        note = ""
        if t.get("stopped"):
            note = f"stopped by {t['stopped']['policy']} at interval {t['stopped']['interval']}"
        elif t["status"] == T.LOST:
            note = f"lost (launcher gone); replaced by trial {t.get('replaced_by')}"
        elif t.get("replaces") is not None:
            note = f"replaces trial {t['replaces']}"
        elif t.get("error"):
            note = str(t["error"].get("reason"))
        rows.append((str(t["index"]), t["run_id"], t["status"],
                     *[T.value_text(t["hyperparameters"].get(n)) for n in names], str(t.get("intervals") or 0),
                     textfmt.value(t.get("best")), textfmt.value(t.get("last")), note))
    sys.stdout.write(textfmt.table(rows))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .job import store_from_args as _store
    from ..history.store import TERMINAL
    from ..submit import cancel_run
    from ..sweep.submit import sweep_record

    record = sweep_record(_store(args), args.sweep)
    status = cancel_run(record, "canceled with `tflaunch sweep cancel`")
    if status.get("status") in TERMINAL:
        sys.stdout.write(f"sweep {record.id} is already {status['status']}; its trials were canceled if any ran\n")
        return 0
    if not args.wait:
        sys.stdout.write(f"cancel requested for sweep {record.id} and its trials\n")
        return 0
    while (record.read_status() or {}).get("status") not in TERMINAL:
        time.sleep(0.2)
    sys.stdout.write(f"sweep {record.id} {(record.read_status() or {}).get('status')}\n")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from .job import store_from_args as _store
    from ..sweep.submit import resume_sweep, sweep_record

    record = sweep_record(_store(args), args.sweep)
    resume_sweep(record)
    if args.detach:
        sys.stdout.write(record.id + "\n")
        return 0
    return _follow(record)
