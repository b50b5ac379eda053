"""Parameter expressions of a sweep (the reference's ``parameter_expressions``): what each hyperparameter
may take, drawn from a :class:`random.Random` (pure; no NumPy needed).

``choice(*options)``, ``randint(upper)`` (0 .. upper-1), ``uniform(lo, hi)``, ``quniform(lo, hi, q)``
(``round(uniform(lo, hi) / q) * q``), ``loguniform(lo, hi)`` (``exp(uniform(lo, hi))``: the bounds are
natural logarithms, as in the reference), ``qloguniform(lo, hi, q)``, ``normal(mu, sigma)``,
``qnormal(mu, sigma, q)``, ``lognormal(mu, sigma)`` (``exp(normal(mu, sigma))``), ``qlognormal``.

An expression is recorded as ``{"kind": "uniform", "args": [0, 1]}``; a sweep's JSON config may also spell
it as the call, ``"uniform(0, 1)"`` (see :func:`parse`).
"""
from __future__ import annotations

import ast
import math
from collections.abc import Mapping

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    import random
    from typing import Any

__all__ = ["Expression", "choice", "randint", "uniform", "quniform", "loguniform", "qloguniform", "normal",
           "qnormal", "lognormal", "qlognormal", "parse", "parse_space", "space_to_dict", "KINDS"]

# kind -> names of its numeric arguments (choice takes any JSON values)
KINDS = {
    "choice": None,
    "randint": ("upper",),
    "uniform": ("min_value", "max_value"),
    "quniform": ("min_value", "max_value", "q"),
    "loguniform": ("min_value", "max_value"),
    "qloguniform": ("min_value", "max_value", "q"),
    "normal": ("mu", "sigma"),
    "qnormal": ("mu", "sigma", "q"),
    "lognormal": ("mu", "sigma"),
    "qlognormal": ("mu", "sigma", "q"),
}


def _number(kind: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{kind}(): {name} must be a finite number, got {value!r}")
    return value


def _quantize(value: float, q: float) -> float:
    out = round(value / q) * q
    return int(out) if isinstance(q, int) and float(out).is_integer() else out


class Expression:
    """One hyperparameter's distribution; build it with :func:`choice`, :func:`uniform`, ..."""

    __slots__ = ("kind", "args")

    def __init__(self, kind: str, args: list[Any]) -> None:
        if kind not in KINDS:
            raise SpecError(f"unknown parameter expression {kind!r}; use one of {', '.join(KINDS)}")
        names = KINDS[kind]
        if names is None:
            if len(args) == 1 and isinstance(args[0], (list, tuple, range)):
                args = list(args[0])  # choice([16, 32]) and choice(range(4)) as the reference takes them
            if not args:
                raise SpecError("choice(): give at least one option")
            for value in args:
                if not (value is None or isinstance(value, (bool, int, float, str))):
                    raise SpecError(f"choice(): options must be numbers, strings, booleans or None, got {value!r}")
        else:
            if len(args) != len(names):
                raise SpecError(f"{kind}({', '.join(names)}): takes {len(names)} arguments, got {len(args)}")
            args = [_number(kind, n, v) for n, v in zip(names, args)]
            if kind == "randint" and (not isinstance(args[0], int) or args[0] < 1):
                raise SpecError(f"randint(upper): upper must be an integer >= 1, got {args[0]!r}")
            if kind.endswith("uniform") and not args[0] < args[1]:
                raise SpecError(f"{kind}(): min_value must be below max_value, got {args[0]!r} and {args[1]!r}")
            if kind.endswith("normal") and not args[1] > 0:
                raise SpecError(f"{kind}(): sigma must be > 0, got {args[1]!r}")
            if kind.startswith("q") and not args[2] > 0:
                raise SpecError(f"{kind}(): q must be > 0, got {args[2]!r}")
        self.kind = kind
        self.args = list(args)

    def sample(self, rng: random.Random) -> Any:
        a = self.args
        kind = self.kind
        if kind == "choice":
            return a[rng.randrange(len(a))]
        if kind == "randint":
            return rng.randrange(int(a[0]))
        if kind in ("uniform", "quniform"):
            value = rng.uniform(a[0], a[1])
        elif kind in ("loguniform", "qloguniform"):
            value = math.exp(rng.uniform(a[0], a[1]))
        elif kind in ("normal", "qnormal"):
            value = rng.gauss(a[0], a[1])
        else:
            value = math.exp(rng.gauss(a[0], a[1]))
        return _quantize(value, a[2]) if kind.startswith("q") else value

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "randint")

    def options(self) -> list[Any]:
        """Every value of a discrete expression (grid sampling)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return list(range(int(self.args[0])))
        raise SpecError(f"{self}: not a discrete expression")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": list(self.args)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and (self.kind, self.args) == (other.kind, other.args)

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(repr(v) for v in self.args)})"


def choice(*options: Any) -> Expression:
    """One of ``options`` (``choice(16, 32, 64)``, ``choice([16, 32, 64])`` or ``choice(range(4))``)."""
    return Expression("choice", list(options))


def randint(upper: int) -> Expression:
    """An integer in 0 .. upper-1."""
    return Expression("randint", [upper])


def uniform(min_value: float, max_value: float) -> Expression:
    return Expression("uniform", [min_value, max_value])


def quniform(min_value: float, max_value: float, q: float) -> Expression:
    return Expression("quniform", [min_value, max_value, q])


def loguniform(min_value: float, max_value: float) -> Expression:
    """``exp(uniform(min_value, max_value))``: ``loguniform(-6, -1)`` spans e^-6 .. e^-1."""
    return Expression("loguniform", [min_value, max_value])


def qloguniform(min_value: float, max_value: float, q: float) -> Expression:
    return Expression("qloguniform", [min_value, max_value, q])


def normal(mu: float, sigma: float) -> Expression:
    return Expression("normal", [mu, sigma])


def qnormal(mu: float, sigma: float, q: float) -> Expression:
    return Expression("qnormal", [mu, sigma, q])


def lognormal(mu: float, sigma: float) -> Expression:
    return Expression("lognormal", [mu, sigma])


def qlognormal(mu: float, sigma: float, q: float) -> Expression:
    return Expression("qlognormal", [mu, sigma, q])


def parse(value: Any, where: str = "expression") -> Expression:
    """An expression from its recorded form (``{"kind", "args"}``), its call (``"choice(16, 32)"``) or an
    :class:`Expression`; a bare list is a ``choice``."""
    if isinstance(value, Expression):
        return value
    if isinstance(value, list):
        return Expression("choice", value)
    if isinstance(value, Mapping):
        if set(value) != {"kind", "args"} or not isinstance(value["args"], list):
            raise SpecError(f"{where}: expected {{'kind': ..., 'args': [...]}}, got {value!r}")
        return Expression(str(value["kind"]), value["args"])
    if isinstance(value, str):
        try:
            tree = ast.parse(value.strip(), mode="eval").body
        except SyntaxError:
            tree = None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and not tree.keywords):
            raise SpecError(f"{where}: expected an expression such as 'uniform(0, 1)' or 'choice(16, 32)', "
                            f"got {value!r}")
        try:
            args = [ast.literal_eval(a) for a in tree.args]
        except ValueError:
            raise SpecError(f"{where}: the arguments of {value!r} must be literal numbers or strings") from None
        try:
            return Expression(tree.func.id, args)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
    raise SpecError(f"{where}: expected a parameter expression such as uniform(0, 1), got {value!r}")


def parse_space(space: Any, where: str = "parameter_space") -> dict[str, Expression]:
    """``{name: Expression}`` from a mapping of names to expressions (in any form :func:`parse` takes)."""
    if not isinstance(space, Mapping) or not space:
        raise SpecError(f"{where}: give a dict of hyperparameter names to expressions, such as "
                        "{'--learning-rate': loguniform(-6, -1)}")
    out = {}
    for name, value in space.items():
        if not isinstance(name, str) or not name.strip("-") or any(c.isspace() for c in name) or "=" in name:
            raise SpecError(f"{where}: {name!r} is not a usable parameter name (such as '--learning-rate')")
        out[name] = parse(value, f"{where}[{name!r}]")
    return out


def space_to_dict(space: Mapping[str, Expression]) -> dict[str, Any]:
    return {name: expr.to_dict() for name, expr in space.items()}
