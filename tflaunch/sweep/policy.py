"""Early termination of a sweep's trials (pure functions of the trials' primary-metric curves).

A trial's curve is the primary metric as its script logged it, in order (its lowest rank's points): the
*n*-th value is interval *n*. A policy is asked about a trial each time the trial reaches an interval
*n* that is a multiple of ``evaluation_interval`` and at least ``delay_evaluation``; it compares the
trial's **best value up to n** (per the goal) with the other trials' values **at the same interval n**
(their best up to n), so that a young trial is never compared with an older trial's later, better
values. Non-finite values (NaN, infinities) count as the worst possible. Each decision to stop is a dict
with the policy's name and the numbers that decided it; it is recorded with the trial.

- :class:`BanditPolicy`: B is the best trial's value at interval n. With ``slack_factor`` s the allowed
  distance is a ratio, the same in both directions: maximize stops a trial below ``B / (1 + s)``,
  minimize one above ``B * (1 + s)`` (for B < 0 the ratio is taken on ``|B|``, so the threshold is always
  on the worse side of B). With ``slack_amount`` a: below ``B - a`` / above ``B + a``.
- :class:`MedianStoppingPolicy`: stops a trial whose best value up to n is worse than the median of
  the running averages (the mean of intervals 1..n) of every trial that reached n, itself included.
- :class:`TruncationSelectionPolicy`: of the k trials that reached n (finished ones too, unless
  ``exclude_finished_jobs``), the worst ``floor(k * truncation_percentage / 100)`` are stopped; ties are
  decided in the trial's favour.
- :class:`NoTerminationPolicy`: never stops a trial.
"""
from __future__ import annotations

import math

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["EarlyTerminationPolicy", "BanditPolicy", "MedianStoppingPolicy", "TruncationSelectionPolicy",
           "NoTerminationPolicy", "policy_from_dict", "best_so_far", "due"]


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _clean(value: Any, maximize: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return -math.inf if maximize else math.inf
    return float(value)


def best_so_far(curve: Sequence[Any], n: int, maximize: bool) -> float:
    """The best of the first ``n`` values of ``curve`` (non-finite ones count as the worst)."""
    values = [_clean(v, maximize) for v in curve[:n]]
    return max(values) if maximize else min(values)


def due(policy: EarlyTerminationPolicy, n: int) -> bool:
    """Whether the policy looks at a trial when it reaches interval ``n`` (1-based)."""
    return n >= max(1, policy.delay_evaluation) and n % policy.evaluation_interval == 0


class EarlyTerminationPolicy:
    """Base of the policies: ``evaluation_interval`` (default 1) and ``delay_evaluation`` (default 0)."""

    name = ""

    def __init__(self, evaluation_interval: int = 1, delay_evaluation: int = 0) -> None:
        self.evaluation_interval = _count("evaluation_interval", evaluation_interval, 1)
        self.delay_evaluation = _count("delay_evaluation", delay_evaluation, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "evaluation_interval": self.evaluation_interval,
                "delay_evaluation": self.delay_evaluation}

    def evaluate(self, trial: str, curves: Mapping[str, Sequence[Any]], n: int, maximize: bool,
                 finished: Sequence[str] = ()) -> dict[str, Any] | None:
        """Stop ``trial`` at interval ``n``? ``curves``: every trial's curve by id (``trial``'s included);
        ``finished``: the ids of trials that have ended. Returns the decision, or None to go on."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class NoTerminationPolicy(EarlyTerminationPolicy):
    """Every trial runs to its end."""

    name = "NoTerminationPolicy"

    def __init__(self) -> None:
        super().__init__()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name}


def _at(curves: Mapping[str, Sequence[Any]], n: int, maximize: bool, skip: Sequence[str] = ()) -> dict[str, float]:
    """Every trial that reached interval n: its best value up to n."""
    return {t: best_so_far(c, n, maximize) for t, c in curves.items() if len(c) >= n and t not in skip}


class BanditPolicy(EarlyTerminationPolicy):
    """Stop trials that fall outside the slack (``slack_factor`` or ``slack_amount``) of the best trial."""

    name = "BanditPolicy"

    def __init__(self, evaluation_interval: int = 1, slack_factor: float | None = None,
                 slack_amount: float | None = None, delay_evaluation: int = 0) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        if (slack_factor is None) == (slack_amount is None):
            raise SpecError("BanditPolicy: give slack_factor or slack_amount (one of them)")
        for what, value in (("slack_factor", slack_factor), ("slack_amount", slack_amount)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise SpecError(f"BanditPolicy: {what} must be a number > 0, got {value!r}")
        self.slack_factor = slack_factor
        self.slack_amount = slack_amount

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "slack_factor": self.slack_factor, "slack_amount": self.slack_amount}

    def threshold(self, best: float, maximize: bool) -> float:
        if self.slack_amount is not None:
            return best - self.slack_amount if maximize else best + self.slack_amount
        s = self.slack_factor
        if maximize:
            return best / (1 + s) if best >= 0 else best * (1 + s)
        return best * (1 + s) if best >= 0 else best / (1 + s)

    def evaluate(self, trial, curves, n, maximize, finished=()):
        values = _at(curves, n, maximize)
        if trial not in values or len(values) < 2:
            return None
        leader = max(values, key=values.get) if maximize else min(values, key=values.get)
        best = values[leader]
        if not math.isfinite(best):
            return None
        limit = self.threshold(best, maximize)
        mine = values[trial]
        if (mine < limit) if maximize else (mine > limit):
            slack = (f"slack_amount {self.slack_amount}" if self.slack_amount is not None
                     else f"slack_factor {self.slack_factor}")
            return {"policy": self.name, "interval": n, "value": mine, "threshold": limit, "best": best,
                    "best_trial": leader,
                    "message": f"best value {_fmt(mine)} by interval {n} is {'below' if maximize else 'above'} "
                               f"{_fmt(limit)}, the best trial's {_fmt(best)} with {slack}"}
        return None


class MedianStoppingPolicy(EarlyTerminationPolicy):
    """Stop trials whose best value is worse than the median of the trials' running averages."""

    name = "MedianStoppingPolicy"

    def evaluate(self, trial, curves, n, maximize, finished=()):
        if trial not in curves or len(curves[trial]) < n:
            return None
        averages = []
        for c in curves.values():
            if len(c) >= n:
                averages.append(sum(_clean(v, maximize) for v in c[:n]) / n)
        if len(averages) < 2:
            return None
        median = _median(averages)
        if not math.isfinite(median):
            return None
        mine = best_so_far(curves[trial], n, maximize)
        if (mine < median) if maximize else (mine > median):
            return {"policy": self.name, "interval": n, "value": mine, "median": median, "trials": len(averages),
                    "message": f"best value {_fmt(mine)} by interval {n} is worse than {_fmt(median)}, the median "
                               f"of the running averages of {len(averages)} trials"}
        return None


class TruncationSelectionPolicy(EarlyTerminationPolicy):
    """At each evaluation, stop the worst ``truncation_percentage`` % (1-99) of the trials."""

    name = "TruncationSelectionPolicy"

    def __init__(self, truncation_percentage: int, evaluation_interval: int = 1, delay_evaluation: int = 0,
                 exclude_finished_jobs: bool = False) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        if isinstance(truncation_percentage, bool) or not isinstance(truncation_percentage, int) \
                or not 1 <= truncation_percentage <= 99:
            raise SpecError(f"TruncationSelectionPolicy: truncation_percentage must be an integer 1-99, "
                            f"got {truncation_percentage!r}")
        if not isinstance(exclude_finished_jobs, bool):
            raise SpecError(f"TruncationSelectionPolicy: exclude_finished_jobs must be True or False, "
                            f"got {exclude_finished_jobs!r}")
        self.truncation_percentage = truncation_percentage
        self.exclude_finished_jobs = exclude_finished_jobs

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "truncation_percentage": self.truncation_percentage,
                "exclude_finished_jobs": self.exclude_finished_jobs}

    def evaluate(self, trial, curves, n, maximize, finished=()):
        skip = [t for t in finished if t != trial] if self.exclude_finished_jobs else ()
        values = _at(curves, n, maximize, skip)
        if trial not in values:
            return None
        cut = len(values) * self.truncation_percentage // 100
        mine = values[trial]
        better = sum(1 for v in values.values() if (v > mine if maximize else v < mine))
        if cut and better >= len(values) - cut:
            return {"policy": self.name, "interval": n, "value": mine, "rank": better + 1, "trials": len(values),
                    "truncated": cut,
                    "message": f"best value {_fmt(mine)} by interval {n} ranks {better + 1} of {len(values)} "
                               f"trials: in the worst {self.truncation_percentage}% ({cut})"}
        return None


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _fmt(value: float) -> str:
    return f"{value:.6g}"


_POLICIES = {cls.name: cls for cls in (BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy,
                                        NoTerminationPolicy)}
_SHORT = {"bandit": "BanditPolicy", "median": "MedianStoppingPolicy", "truncation": "TruncationSelectionPolicy",
          "none": "NoTerminationPolicy"}


def policy_from_dict(data: Any, where: str = "policy") -> EarlyTerminationPolicy:
    """A policy from its recorded form (``{"kind": "BanditPolicy", ...}``; ``kind`` may also be ``bandit``,
    ``median``, ``truncation`` or ``none``); None is :class:`NoTerminationPolicy`."""
    if data is None:
        return NoTerminationPolicy()
    if isinstance(data, EarlyTerminationPolicy):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise SpecError(f"{where}: expected {{'kind': 'bandit'|'median'|'truncation'|'none', ...}}, got {data!r}")
    kind = str(data["kind"])
    cls = _POLICIES.get(_SHORT.get(kind.lower(), kind))
    if cls is None:
        raise SpecError(f"{where}: kind {kind!r}: use bandit, median, truncation or none")
    args = {k: v for k, v in data.items() if k != "kind" and v is not None}
    try:
        return cls(**args)
    except TypeError:
        import inspect
        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(args) - set(known))
        raise SpecError(f"{where}: {cls.name} takes {', '.join(known) or 'no arguments'}"
                        + (f", not {unknown[0]!r}" if unknown else "")) from None
