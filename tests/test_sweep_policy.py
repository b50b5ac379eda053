"""Early-termination policies on crafted curves (pure: tflaunch.sweep.policy)."""
from __future__ import annotations

import math

import pytest

from tflaunch.errors import SpecError
from tflaunch.sweep.policy import (BanditPolicy, MedianStoppingPolicy, NoTerminationPolicy,
                                   TruncationSelectionPolicy, best_so_far, due, policy_from_dict)


def stopped(policy, curves, n, maximize=True, finished=()):
    """The trials the policy stops when each reaches interval n."""
    return sorted(t for t in curves if len(curves[t]) >= n and policy.evaluate(t, curves, n, maximize, finished))


def test_due_honours_interval_and_delay():
    policy = BanditPolicy(evaluation_interval=2, slack_factor=0.1, delay_evaluation=3)
    assert [n for n in range(1, 11) if due(policy, n)] == [4, 6, 8, 10]
    assert [n for n in range(1, 4) if due(BanditPolicy(slack_amount=1), n)] == [1, 2, 3]


def test_best_so_far_counts_nonfinite_as_worst():
    assert best_so_far([0.1, float("nan"), 0.3, 0.9], 3, True) == 0.3
    assert best_so_far([float("nan")], 1, True) == -math.inf
    assert best_so_far([0.5, float("inf"), 0.2], 3, False) == 0.2


def test_bandit_slack_factor_maximize_stops_the_trial_far_behind():
    curves = {"a": [0.5, 0.8, 0.8], "b": [0.4, 0.75, 0.76], "c": [0.1, 0.2, 0.25]}
    policy = BanditPolicy(slack_factor=0.1)
    assert stopped(policy, curves, 2) == ["c"]  # 0.8/1.1 = 0.727: b (0.75) stays, c (0.2) goes
    decision = policy.evaluate("c", curves, 2, True)
    assert decision["policy"] == "BanditPolicy" and decision["best"] == 0.8 and decision["best_trial"] == "a"
    assert decision["threshold"] == pytest.approx(0.8 / 1.1) and decision["value"] == 0.2
    assert "slack_factor 0.1" in decision["message"]


def test_bandit_compares_at_the_same_interval():
    # a young trial at interval 1 is compared with the others' values at interval 1, not their later ones
    curves = {"old": [0.5, 0.9, 0.95], "young": [0.48]}
    assert BanditPolicy(slack_factor=0.1).evaluate("young", curves, 1, True) is None
    assert BanditPolicy(slack_factor=0.1).evaluate("old", {"old": [0.5], "young": [0.48]}, 1, True) is None


def test_bandit_minimize_and_slack_amount():
    curves = {"a": [1.0, 0.5], "b": [1.1, 0.54], "c": [2.0, 0.9]}
    assert stopped(BanditPolicy(slack_factor=0.1), curves, 2, maximize=False) == ["c"]  # above 0.5*1.1
    assert stopped(BanditPolicy(slack_amount=0.03), curves, 2, maximize=False) == ["b", "c"]  # above 0.53
    assert stopped(BanditPolicy(slack_amount=0.2), {"a": [0.9], "b": [0.6], "c": [0.75]}, 1) == ["b"]


def test_bandit_threshold_stays_on_the_worse_side_of_negative_values():
    policy = BanditPolicy(slack_factor=0.1)
    assert policy.threshold(-2.0, True) == pytest.approx(-2.2)
    assert policy.threshold(-2.0, False) == pytest.approx(-2.0 / 1.1)
    assert stopped(policy, {"a": [-2.0], "b": [-2.1], "c": [-3.0]}, 1) == ["c"]


def test_bandit_alone_or_with_nothing_logged_decides_nothing():
    assert BanditPolicy(slack_factor=0.1).evaluate("a", {"a": [0.1]}, 1, True) is None
    assert stopped(BanditPolicy(slack_factor=0.1), {"a": [float("nan")], "b": [float("nan")]}, 1) == []


def test_median_stopping_on_crafted_curves():
    curves = {"a": [0.9, 0.9, 0.9], "b": [0.8, 0.8, 0.8], "c": [0.1, 0.2, 0.3], "d": [0.5, 0.6, 0.75]}
    # running averages at 3: .9 .8 .2 .617 -> median .708; c's best .3 is worse, d's best .75 is not
    assert stopped(MedianStoppingPolicy(), curves, 3) == ["c"]
    decision = MedianStoppingPolicy().evaluate("c", curves, 3, True)
    assert decision["median"] == pytest.approx((0.8 + 1.85 / 3) / 2) and decision["trials"] == 4
    assert decision["value"] == 0.3
    # at interval 1: .9 .8 .1 .5 -> median .65: c and d below
    assert stopped(MedianStoppingPolicy(), curves, 1) == ["c", "d"]
    # minimize: the same curves mirrored
    mirrored = {k: [-v for v in c] for k, c in curves.items()}
    assert stopped(MedianStoppingPolicy(), mirrored, 3, maximize=False) == ["c"]


def test_median_uses_the_best_value_not_the_last():
    curves = {"a": [0.5, 0.5, 0.5, 0.5], "b": [0.5, 0.5, 0.5, 0.5], "spiky": [0.1, 0.9, 0.1, 0.1]}
    assert stopped(MedianStoppingPolicy(), curves, 4) == []  # spiky's best (.9) beats the median (.5)


def test_truncation_selection_on_crafted_curves():
    curves = {"a": [0.9, 0.9], "b": [0.8, 0.8], "c": [0.1, 0.2], "d": [0.5, 0.6]}
    assert stopped(TruncationSelectionPolicy(25), curves, 2) == ["c"]  # 4 trials: the worst 1
    assert stopped(TruncationSelectionPolicy(50), curves, 2) == ["c", "d"]  # the worst 2
    assert stopped(TruncationSelectionPolicy(20), curves, 2) == []  # floor(4 * 0.2) = 0
    decision = TruncationSelectionPolicy(50).evaluate("d", curves, 2, True)
    assert (decision["rank"], decision["trials"], decision["truncated"]) == (3, 4, 2)
    assert stopped(TruncationSelectionPolicy(25), curves, 2, maximize=False) == ["a"]


def test_truncation_compares_a_young_trial_at_its_own_interval_and_ties_favour_it():
    curves = {"a": [0.3, 0.9, 0.9], "b": [0.2, 0.9, 0.9], "c": [0.4, 0.9], "young": [0.35]}
    assert stopped(TruncationSelectionPolicy(25), curves, 1) == ["b"]  # at interval 1: .3 .2 .4 .35
    tied = {"a": [0.5], "b": [0.5], "c": [0.5], "d": [0.5]}
    assert stopped(TruncationSelectionPolicy(50), tied, 1) == []


def test_truncation_can_leave_finished_trials_out():
    curves = {"done1": [0.1], "done2": [0.2], "run": [0.3], "other": [0.9]}
    policy = TruncationSelectionPolicy(50, exclude_finished_jobs=True)
    assert policy.evaluate("run", curves, 1, True, finished=["done1", "done2"])  # of run/other: run is worst
    assert not TruncationSelectionPolicy(50).evaluate("run", curves, 1, True, finished=["done1", "done2"])


def test_no_termination_never_stops():
    assert stopped(NoTerminationPolicy(), {"a": [1.0], "b": [0.0]}, 1) == []


@pytest.mark.parametrize("make, message", [
    (lambda: BanditPolicy(), "slack_factor or slack_amount"),
    (lambda: BanditPolicy(slack_factor=0.1, slack_amount=1), "slack_factor or slack_amount"),
    (lambda: BanditPolicy(slack_factor=-1), "slack_factor must be a number > 0"),
    (lambda: BanditPolicy(evaluation_interval=0, slack_factor=0.1), "evaluation_interval: must be an integer >= 1"),
    (lambda: MedianStoppingPolicy(delay_evaluation=-1), "delay_evaluation: must be an integer >= 0"),
    (lambda: TruncationSelectionPolicy(100), "truncation_percentage must be an integer 1-99"),
    (lambda: policy_from_dict({"kind": "bandit", "slack": 1}), "BanditPolicy takes evaluation_interval"),
    (lambda: policy_from_dict({"kind": "early"}), "use bandit, median, truncation or none"),
])
def test_bad_policies_are_one_line_errors(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_policies_round_trip_through_their_recorded_form():
    for policy in (BanditPolicy(2, slack_factor=0.2, delay_evaluation=5), MedianStoppingPolicy(3, 1),
                   TruncationSelectionPolicy(30, 2, 4, True), NoTerminationPolicy()):
        again = policy_from_dict(policy.to_dict())
        assert type(again) is type(policy) and again.to_dict() == policy.to_dict()
    assert isinstance(policy_from_dict({"kind": "median"}), MedianStoppingPolicy)
    assert isinstance(policy_from_dict(None), NoTerminationPolicy)
