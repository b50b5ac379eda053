"""Secrets kept out of the run store: environment variables whose names look secret are withheld from every
record, and the home's permissions.

A variable is *secret* when its name contains (case-insensitively) one of :data:`SECRET_WORDS`, or matches
a pattern the user lists (``$TFLAUNCH_SECRET_ENV=NAME,PATTERN*`` or ``"secret_env"`` in the home's
``config.json``), unless it matches one listed as not secret (``$TFLAUNCH_PUBLIC_ENV`` / ``"public_env"``).
The recorded spec never holds its value: the name leaves ``environment_variables`` and goes to the
definition's ``withheld_environment`` list. The run's processes still get the value: an attached run's
supervisor has it in memory (:attr:`tflaunch.history.record.RunRecord.withheld`); a run handed to another
process (``--detach``, a sweep's trials, ``--slurm``) reads it from :data:`START_FILE` in its record, a file
of mode 0600 that its supervisor removes once the processes have started (a run that may be requeued keeps
it until it ends) and that every final status removes in any case.
"""
from __future__ import annotations

import fnmatch
import logging
import os

from .. import fsio

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable, Mapping

__all__ = ["SECRET_WORDS", "START_FILE", "PLACEHOLDER", "DEFINITION_KEY", "SecretNames", "split_definition", "mask_for_record",
           "write_start_file", "read_start_file", "remove_start_file", "home_modes"]

log = logging.getLogger(__name__)

SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")
START_FILE = "start-secrets.json"  # in a run's directory, mode 0600, only until its processes have started
PLACEHOLDER = "<withheld>"  # what the dry run, `runs diff` and the report show instead of a value
DEFINITION_KEY = "withheld_environment"  # in run.json: the names whose values were withheld


def _patterns(text: str | None) -> list[str]:
    return [p.strip().upper() for p in (text or "").split(",") if p.strip()]


class SecretNames:
    """Which variable names are secret, for one home (its ``config.json``) and this process's environment."""

    def __init__(self, listed: Iterable[str] = (), public: Iterable[str] = ()) -> None:
        self.listed = [p.upper() for p in listed]
        self.public = [p.upper() for p in public]

    @classmethod
    def for_home(cls, home: str | None) -> "SecretNames":
        config: dict[str, Any] = {}
        if home:
            from ..config import home_config
            config = home_config(home)
        return cls(list(config.get("secret_env") or ()) + _patterns(os.environ.get("TFLAUNCH_SECRET_ENV")),
                   list(config.get("public_env") or ()) + _patterns(os.environ.get("TFLAUNCH_PUBLIC_ENV")))

    def is_secret(self, name: str) -> bool:
        upper = name.upper()
        if any(fnmatch.fnmatchcase(upper, p) for p in self.public):
            return False
        return any(word in upper for word in SECRET_WORDS) or any(fnmatch.fnmatchcase(upper, p) for p in self.listed)

    def mask(self, env: Mapping[str, Any]) -> dict[str, Any]:
        """``env`` with the value of every secret variable replaced by :data:`PLACEHOLDER`."""
        return {k: PLACEHOLDER if self.is_secret(k) else v for k, v in env.items()}


def mask_for_record(env: Mapping[str, Any], record: Any) -> dict[str, Any]:
    """``env`` as a file of ``record`` may hold it: the run's withheld variables, and any other whose name is
    secret, shown as :data:`PLACEHOLDER`."""
    try:
        withheld = set(record.definition().get(DEFINITION_KEY) or ())
    except Exception:  # noqa: BLE001 - an unreadable run.json: the patterns still apply
        withheld = set()
    names = SecretNames.for_home(record.store.home)
    return {k: PLACEHOLDER if k in withheld or names.is_secret(k) else v for k, v in env.items()}


def split_definition(definition: dict[str, Any], home: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``definition`` without the values of secret variables (their names in ``withheld_environment``, with
    those already listed there: a trial's or a rerun's, inherited), and those values."""
    spec = definition.get("spec")
    env = (spec or {}).get("environment_variables") or {}
    names = SecretNames.for_home(home)
    values = {k: v for k, v in env.items() if names.is_secret(k)}
    withheld = sorted(set(definition.get(DEFINITION_KEY) or ()) | set(values))
    if not withheld:
        return definition, {}
    out = dict(definition)
    if values:
        out["spec"] = {**spec, "environment_variables": {k: v for k, v in env.items() if k not in values}}
    out[DEFINITION_KEY] = withheld
    return out, values


def write_start_file(run_dir: str, values: Mapping[str, str]) -> None:
    """What a supervisor started elsewhere needs to start the run: in ``run_dir``, owner-only (0600)."""
    path = os.path.join(run_dir, START_FILE)
    data = (fsio.json_dumps(dict(values)) + "\n").encode("ascii")
    tmp = os.path.join(run_dir, f".{START_FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_start_file(run_dir, tmp)
        raise


def read_start_file(run_dir: str) -> dict[str, str]:
    """The values :func:`write_start_file` kept; ``{}`` when there are none (removed, never written)."""
    try:
        data = fsio.read_json(os.path.join(run_dir, START_FILE))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", os.path.join(run_dir, START_FILE), exc)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def remove_start_file(run_dir: str, path: str | None = None) -> None:
    try:
        os.unlink(path or os.path.join(run_dir, START_FILE))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path or os.path.join(run_dir, START_FILE), exc)


def home_modes(home: str) -> tuple[int, int]:
    """(directory mode, file mode) for what tflaunch creates in ``home``: owner-only (0700 / 0600), or
    0770 / 0660 when the home's ``config.json`` says ``"shared_group": true``."""
    from ..config import home_config

    try:
        shared = bool(home_config(home).get("shared_group"))
    except Exception as exc:  # a broken config.json: its own commands say so; keep the safe default here
        log.debug("home config of %s: %s", home, exc)
        shared = False
    return (0o770, 0o660) if shared else (0o700, 0o600)
