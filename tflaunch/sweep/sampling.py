"""How a sweep picks each trial's hyperparameters: grid, random (seeded) and Bayesian (Optuna's TPE).

Every sampler is a pure function of what is recorded: the sweep's seed, the trial's index and the trials
before it (their hyperparameters, status and primary metric). Nothing else is kept, so a resumed sweep
asks for the next trial exactly as the first driver would have.
"""
from __future__ import annotations

import itertools
import math
import random

from ..errors import SpecError
from .space import Expression, parse_space, space_to_dict

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Optional, Sequence, Tuple

    Suggestion = Optional[Tuple[dict, Optional[dict]]]

__all__ = ["ParameterSampling", "RandomParameterSampling", "GridParameterSampling", "BayesianParameterSampling",
           "sampling_from_dict", "BAYESIAN_KINDS", "OPTUNA_MISSING"]

# What Bayesian sampling can model (the reference: choice- and uniform-like expressions only)
BAYESIAN_KINDS = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform")
OPTUNA_MISSING = ("BayesianParameterSampling needs Optuna, which is not installed in {python}: "
                  "pip install 'tflaunch[sweep]' (or pip install optuna), or use RandomParameterSampling")
_DRAWS = 1000  # attempts at a combination not drawn before, in a space of choices only


class ParameterSampling:
    """Base of the samplings: ``parameter_space`` maps each hyperparameter name (as the script takes it,
    e.g. ``'--learning-rate'``) to an expression; ``properties`` as in the reference (``rng_seed``)."""

    kind = ""

    def __init__(self, parameter_space: Mapping[str, Any], properties: Mapping[str, Any] | None = None,
                 *, seed: int | None = None) -> None:
        self.parameter_space: dict[str, Expression] = parse_space(parameter_space)
        if properties is not None and not isinstance(properties, dict):
            raise SpecError(f"properties: must be a dict such as {{'rng_seed': 1}}, got {properties!r}")
        self.properties = dict(properties or {})
        if seed is None:
            seed = self.properties.get("rng_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SpecError(f"seed (rng_seed): must be an integer, got {seed!r}")
        self.seed = seed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "parameter_space": space_to_dict(self.parameter_space), "seed": self.seed}

    def total(self) -> int | None:
        """How many distinct trials the space holds (None: unbounded)."""
        if all(e.discrete for e in self.parameter_space.values()):
            return math.prod(len(e.options()) for e in self.parameter_space.values())
        return None

    def suggest(self, index: int, history: Sequence[Mapping[str, Any]], goal: str) -> Suggestion:
        """(hyperparameters of trial ``index`` (0-based), what the sampler itself chose (recorded with the
        trial as ``sampler_values``; None for grid and random)), or None when the space is used up.
        ``history``: the trials so far (``hyperparameters``, ``status``, ``best``: their best primary metric,
        ``sampler_values``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.parameter_space!r})"


class RandomParameterSampling(ParameterSampling):
    """Each trial draws every hyperparameter independently (any expression). Seeded (``seed=`` or
    ``properties={'rng_seed': N}``; without one a seed is chosen and recorded), trial *i*'s values depend
    only on the seed and *i*. When every expression is discrete, no combination is drawn twice."""

    kind = "random"

    def suggest(self, index: int, history: Sequence[Mapping[str, Any]], goal: str) -> Suggestion:
        total = self.total()
        seen = {_key(t["hyperparameters"]) for t in history} if total is not None else set()
        if total is not None and len(seen) >= total:
            return None
        for attempt in range(_DRAWS):
            rng = random.Random(f"{self.seed}:{index}:{attempt}")
            params = {name: expr.sample(rng) for name, expr in self.parameter_space.items()}
            if _key(params) not in seen:
                return params, None
        return params, None  # a nearly exhausted space of choices: allow a repeat rather than stop


class GridParameterSampling(ParameterSampling):
    """Every combination of the ``choice`` values, in order (the first name varies slowest)."""

    kind = "grid"

    def __init__(self, parameter_space: Mapping[str, Any], properties: Mapping[str, Any] | None = None) -> None:
        super().__init__(parameter_space, properties)
        for name, expr in self.parameter_space.items():
            if expr.kind != "choice":
                raise SpecError(f"GridParameterSampling: {name!r} is {expr}; grid sampling takes choice(...) only")

    def suggest(self, index: int, history: Sequence[Mapping[str, Any]], goal: str) -> Suggestion:
        names = list(self.parameter_space)
        combos = itertools.product(*(self.parameter_space[n].options() for n in names))
        combo = next(itertools.islice(combos, index, None), None)
        return None if combo is None else (dict(zip(names, combo)), None)


class BayesianParameterSampling(ParameterSampling):
    """Each trial is suggested from the results so far by Optuna's TPE sampler (the optional extra
    ``tflaunch[sweep]``), asked afresh from the recorded trials: finished ones with their best primary
    metric, failed ones as failed, running ones as running. Expressions: ``choice``, ``randint``,
    ``uniform``, ``quniform``, ``loguniform``, ``qloguniform``; no early-termination policy (as in the
    reference). The first 10 trials are TPE's random start-up."""

    kind = "bayesian"

    def __init__(self, parameter_space: Mapping[str, Any], properties: Mapping[str, Any] | None = None,
                 *, seed: int | None = None) -> None:
        super().__init__(parameter_space, properties, seed=seed)
        for name, expr in self.parameter_space.items():
            if expr.kind not in BAYESIAN_KINDS:
                raise SpecError(f"BayesianParameterSampling: {name!r} is {expr}; Bayesian sampling takes "
                                f"{', '.join(BAYESIAN_KINDS)} only (use RandomParameterSampling for it)")

    @staticmethod
    def require() -> None:
        """SpecError naming the extra when Optuna cannot be imported."""
        import sys
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpecError(OPTUNA_MISSING.format(python=sys.executable)) from None

    def _distributions(self) -> dict[str, Any]:
        from optuna import distributions as d

        out = {}
        for name, expr in self.parameter_space.items():
            a = expr.args
            if expr.kind == "choice":
                out[name] = d.CategoricalDistribution(a)
            elif expr.kind == "randint":
                out[name] = d.IntDistribution(0, int(a[0]) - 1)
            elif expr.kind == "uniform":
                out[name] = d.FloatDistribution(a[0], a[1])
            elif expr.kind == "quniform":  # the multiples of q in the range: modelled as their integer k
                out[name] = d.IntDistribution(math.ceil(a[0] / a[2] - 1e-9), math.floor(a[1] / a[2] + 1e-9))
            else:  # loguniform / qloguniform: e^lo .. e^hi on a log scale
                out[name] = d.FloatDistribution(math.exp(a[0]), math.exp(a[1]), log=True)
        return out

    def _external(self, name: str, raw: Any) -> Any:
        expr = self.parameter_space[name]
        if expr.kind == "quniform":
            return raw * expr.args[2]
        if expr.kind == "qloguniform":
            return round(raw / expr.args[2]) * expr.args[2]
        return raw

    def suggest(self, index: int, history: Sequence[Mapping[str, Any]], goal: str) -> Suggestion:
        self.require()
        import optuna
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = self._distributions()
        sampler = optuna.samplers.TPESampler(seed=(self.seed or 0) * 1_000_003 + index)
        study = optuna.create_study(direction="maximize" if goal == "maximize" else "minimize", sampler=sampler)
        for trial in history:
            raw = trial.get("sampler_values")
            if not isinstance(raw, dict) or set(raw) != set(dists):
                continue  # suggested by another sampling (never with one config), or not recorded
            best = trial.get("best")
            status = trial.get("status")
            if status in ("Completed", "Canceled") and isinstance(best, (int, float)) and math.isfinite(best):
                frozen = create_trial(params=raw, distributions=dists, value=float(best))
            elif status in ("Failed", "Canceled", "Completed"):
                frozen = create_trial(params=raw, distributions=dists, state=TrialState.FAIL)
            else:
                frozen = create_trial(params=raw, distributions=dists, state=TrialState.RUNNING)
            study.add_trial(frozen)
        raw = dict(study.ask(dists).params)
        return {name: self._external(name, raw[name]) for name in self.parameter_space}, raw


def _key(params: Mapping[str, Any]) -> str:
    import json
    return json.dumps(params, sort_keys=True)


_KINDS = {"random": RandomParameterSampling, "grid": GridParameterSampling, "bayesian": BayesianParameterSampling}


def sampling_from_dict(data: Any, where: str = "hyperparameter_sampling") -> ParameterSampling:
    """A sampling from its recorded form, or from a sweep config's ``{"kind": "random", "parameter_space":
    {...}, "seed": 1}``."""
    if isinstance(data, ParameterSampling):
        return data
    if not isinstance(data, dict) or "parameter_space" not in data:
        raise SpecError(f"{where}: expected {{'kind': 'random'|'grid'|'bayesian', 'parameter_space': {{...}}}}, "
                        f"got {data!r}")
    kind = str(data.get("kind", "random")).lower()
    unknown = set(data) - {"kind", "parameter_space", "seed", "properties"}
    if unknown:
        raise SpecError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: kind, parameter_space, seed, properties)")
    cls = _KINDS.get(kind)
    if cls is None:
        raise SpecError(f"{where}: kind {kind!r}: use random, grid or bayesian")
    if cls is GridParameterSampling:
        if data.get("seed") is not None:
            raise SpecError(f"{where}: grid sampling takes no seed")
        return cls(data["parameter_space"], data.get("properties"))
    return cls(data["parameter_space"], data.get("properties"), seed=data.get("seed"))
