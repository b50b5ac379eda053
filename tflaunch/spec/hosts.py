"""Which machines a run uses: ``--hosts``, hostfiles, Slurm and PBS allocations, and the local machine.

``--hosts`` takes horovodrun's syntax (``h1:4,h2:4``); a hostfile takes Open MPI's, which horovodrun
and DeepSpeed share (``host slots=N`` per line). Inside a Slurm or PBS job, :func:`discover` reads the
allocation from the environment. Everything here is pure text handling: no name is resolved and no
machine is contacted; every error is a :class:`~tflaunch.errors.SpecError` that names its source.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import product

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from collections.abc import Mapping, Sequence

__all__ = [
    "Host",
    "parse_hosts",
    "parse_hostfile",
    "parse_hostfile_text",
    "expand_nodelist",
    "expand_counts",
    "from_slurm",
    "from_pbs",
    "is_local",
    "select_hosts",
    "discover",
]

MAX_NODELIST_HOSTS = 65536  # a typo such as n[1-99999999] must not fill the memory

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE = re.compile(r"[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9._-]+)?")
_IPV4_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_WHOLE_RE = re.compile(r"[0-9]+")
_RANGE_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_COUNT_RE = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")
_GROUP_RE = re.compile(r"\[([^\[\]]*)\]")
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "::1"})


@dataclass(frozen=True)
class Host:
    """A machine processes run on and how many processes it takes."""

    name: str
    slots: int = 1


def _check_name(name: str, where: str, bare_ipv6: bool = False) -> str:
    """``name`` without IPv6 brackets, or SpecError: it goes on an ssh command line as is."""
    if name.startswith("[") and name.endswith("]") and _IPV6_RE.fullmatch(name[1:-1]):
        return name[1:-1]
    if bare_ipv6 and _IPV6_RE.fullmatch(name):
        return name
    if not name:
        raise SpecError(f"{where}: host name is empty")
    if name.startswith("-"):
        raise SpecError(f"{where}: host name starts with '-' (ssh would take it as an option)")
    if not _NAME_RE.fullmatch(name):
        raise SpecError(f"{where}: host name may contain only letters, digits, '.', '_' and '-' "
                        "(IPv6 addresses in brackets: '[::1]')")
    return name


def _whole(text: str, where: str, what: str, minimum: int = 1) -> int:
    if not _WHOLE_RE.fullmatch(text) or int(text) < minimum:
        raise SpecError(f"{where}: {what} must be a whole number >= {minimum}")
    return int(text)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def parse_hosts(text: str, source: str = "--hosts") -> list[Host]:
    """``h1:4,h2:4,[::1]:2`` -> hosts in order; a host without ``:N`` has 1 slot."""
    if not text.strip():
        raise SpecError(f"{source}: empty; give HOST[:SLOTS],... e.g. 'h1:4,h2:4'")
    hosts: list[Host] = []
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise SpecError(f"{source}: empty item in {text!r} (remove the extra comma)")
        where = f"{source}: {item!r}"
        if item.startswith("["):
            end = item.find("]") + 1
            if not end or (item[end:] and item[end] != ":"):
                raise SpecError(f"{where}: write IPv6 addresses as '[ADDRESS]' or '[ADDRESS]:SLOTS'")
            name, sep, slots = item[:end], item[end:end + 1], item[end + 1:]
        else:
            name, sep, slots = item.partition(":")
            if ":" in slots:
                raise SpecError(f"{where}: put IPv6 addresses in brackets, e.g. '[::1]:2'")
        name = _check_name(name, where)
        if name.lower() in seen:
            raise SpecError(f"{source}: host {name!r} is listed twice")
        seen.add(name.lower())
        hosts.append(Host(name, _whole(slots, where, "slots") if sep else 1))
    return hosts


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Hostfile lines ``HOST [slots=N] [max_slots=N]``; ``#`` comments and blank lines are skipped."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        at = f"{source} line {number}"
        where = f"{at}: {line!r}"
        first, *fields = line.split()
        name = _check_name(first, where, bare_ipv6=True)
        slots, keys = 1, set()
        for item in fields:
            key, eq, value = item.partition("=")
            if not eq:
                hint = " (missing 'slots=')" if _WHOLE_RE.fullmatch(item) else ""
                raise SpecError(f"{at}: expected 'HOST slots=N', got {line!r}{hint}")
            if key in keys:
                raise SpecError(f"{where}: {key!r} given twice")
            keys.add(key)
            if key == "slots":
                slots = _whole(value, where, "slots")
            elif key in ("max_slots", "max-slots"):  # Open MPI's cap; tflaunch never exceeds slots
                _whole(value, where, key, minimum=0)
            else:
                raise SpecError(f"{where}: unknown key {key!r} (expected 'HOST slots=N')")
        if name.lower() in seen:
            raise SpecError(f"{at}: host {name!r} already listed on line {seen[name.lower()]}")
        seen[name.lower()] = number
        hosts.append(Host(name, slots))
    if not hosts:
        label = source if source.startswith("hostfile") else f"hostfile {source}"
        raise SpecError(f"{label}: no hosts in it (write one 'HOST slots=N' per line)")
    return hosts


def _read_text(path: str, label: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SpecError(f"{label} {path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{label} {path}: cannot read: not UTF-8 text") from None


def parse_hostfile(path: str) -> list[Host]:
    """The hosts in the hostfile at ``path`` (see :func:`parse_hostfile_text`)."""
    path = os.fspath(path)
    return parse_hostfile_text(_read_text(path, "hostfile"), source=path)


def _split_top(text: str, where: str) -> list[str]:
    """Split at commas and whitespace outside brackets; check that brackets pair up, unnested."""
    items, start, depth = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif depth == 0 and (char == "," or char.isspace()):
            items.append(text[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise SpecError(f"{where}: unbalanced or nested brackets")
    if depth:
        raise SpecError(f"{where}: unbalanced brackets ('[' without ']')")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_group(body: str, where: str) -> list[str]:
    if not body.strip():
        raise SpecError(f"{where}: empty brackets '[]'")
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE_RE.fullmatch(part)
        if not m:
            raise SpecError(f"{where}: {part!r} in '[{body}]' is not a number or a range N-M")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(lo) > int(hi):
            raise SpecError(f"{where}: range {part!r} starts after it ends")
        if int(hi) - int(lo) >= MAX_NODELIST_HOSTS:
            raise SpecError(f"{where}: range {part!r} has more than {MAX_NODELIST_HOSTS} hosts")
        width = len(lo)  # Slurm keeps the width of the range start: n[08-11] -> n08..n11
        out.extend(f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str, *, source: str = "nodelist") -> list[str]:
    """Slurm hostlist -> host names, as ``scontrol show hostnames`` prints them."""
    where = f"{source} {text!r}"
    names: list[str] = []
    for item in _split_top(text, where):
        parts: list[list[str]] = []
        pos = 0
        for m in _GROUP_RE.finditer(item):
            parts += [[item[pos:m.start()]], _expand_group(m.group(1), where)]
            pos = m.end()
        parts.append([item[pos:]])
        total = 1
        for choices in parts:
            total *= len(choices)
        if len(names) + total > MAX_NODELIST_HOSTS:
            raise SpecError(f"{where}: more than {MAX_NODELIST_HOSTS} hosts")
        for combo in product(*parts):
            name = "".join(combo)
            names.append(_check_name(name, f"{where}: {name!r}"))
    if not names:
        raise SpecError(f"{where}: no hosts in it")
    return names


def expand_counts(text: str, *, source: str = "count list") -> list[int]:
    """Slurm per-node counts (``SLURM_TASKS_PER_NODE``): ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in text.split(","):
        m = _COUNT_RE.fullmatch(part.strip())
        if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise SpecError(f"{source} {text!r}: {part!r} is not N or N(xM) with N, M >= 1")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def from_slurm(env: Mapping[str, str]) -> list[Host] | None:
    """The hosts of the Slurm allocation in ``env``; None outside a Slurm job."""
    if not env.get("SLURM_JOB_ID"):
        return None
    var = "SLURM_JOB_NODELIST" if env.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
    if not env.get(var):
        raise SpecError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not; "
                        "run inside the allocation (srun/sbatch) or give --hosts")
    names = expand_nodelist(env[var], source=var)
    for count_var in ("SLURM_TASKS_PER_NODE", "SLURM_JOB_CPUS_PER_NODE"):
        if env.get(count_var):
            counts = expand_counts(env[count_var], source=count_var)
            if len(counts) != len(names):
                raise SpecError(
                    f"{count_var}={env[count_var]!r} gives {_plural(len(counts), 'count')} but "
                    f"{var}={env[var]!r} names {_plural(len(names), 'node')}; give --hosts instead")
            break
    else:
        counts = [1] * len(names)
    return [Host(name, count) for name, count in zip(names, counts)]


def from_pbs(env: Mapping[str, str]) -> list[Host] | None:
    """The hosts in ``$PBS_NODEFILE`` (one line per slot); None outside a PBS job."""
    path = env.get("PBS_NODEFILE")
    if not path:
        return None
    label = f"PBS_NODEFILE {path}"
    slots: dict[str, int] = {}  # keeps the order of first appearance
    for number, line in enumerate(_read_text(path, "PBS_NODEFILE").split("\n"), 1):
        if line.strip():
            name = _check_name(line.strip(), f"{label} line {number}", bare_ipv6=True)
            slots[name] = slots.get(name, 0) + 1
    if not slots:
        raise SpecError(f"{label}: no hosts in it")
    return [Host(name, count) for name, count in slots.items()]


def _nodename() -> str:
    return os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")


def is_local(name: str) -> bool:
    """Whether ``name`` is this machine by its spelling: loopback, or this machine's host name."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in _LOCAL_NAMES or (name.startswith("127.") and _IPV4_RE.fullmatch(name)):
        return True
    node = _nodename().strip().lower()
    if not name or not node:
        return False
    if name == node:
        return True
    if ":" in name or _IPV4_RE.fullmatch(name):  # an address: its first label is not a short name
        return False
    return name.split(".", 1)[0] == node.split(".", 1)[0]


def select_hosts(hosts: Sequence[Host] | None, node_count: int, procs_per_node: int, *,
                 oversubscribe: bool = False, source: str = "--hosts") -> list[Host]:
    """The first ``node_count`` hosts, checked to take ``procs_per_node`` processes each."""
    if node_count < 1 or procs_per_node < 1:
        raise SpecError(f"--nodes {node_count} --procs-per-node {procs_per_node}: both must be >= 1")
    if hosts is None:
        if node_count == 1:
            return [Host("localhost", procs_per_node)]
        raise SpecError(f"--nodes {node_count} needs hosts: give --hosts or --hostfile "
                        "(the local machine is one node)")
    if not hosts:
        raise SpecError(f"--nodes {node_count} but {source} gives no hosts")
    if node_count > len(hosts):
        shown = ", ".join(h.name for h in hosts[:8]) + (", ..." if len(hosts) > 8 else "")
        raise SpecError(f"--nodes {node_count} but {source} gives only "
                        f"{_plural(len(hosts), 'host')} ({shown})")
    chosen = list(hosts[:node_count])
    if not oversubscribe:
        for host in chosen:
            if procs_per_node > host.slots:
                raise SpecError(
                    f"--procs-per-node {procs_per_node} but host {host.name!r} has "
                    f"{_plural(host.slots, 'slot')} in {source} "
                    "(use --oversubscribe to run more processes than slots)")
    return chosen


def discover(env: Mapping[str, str] | None = None) -> tuple[list[Host] | None, str]:
    """Hosts from the batch system when neither --hosts nor --hostfile is given, and their source."""
    env = os.environ if env is None else env
    hosts = from_slurm(env)
    if hosts is not None:
        return hosts, "SLURM_JOB_NODELIST"
    hosts = from_pbs(env)
    if hosts is not None:
        return hosts, "PBS_NODEFILE"
    return None, "local"
