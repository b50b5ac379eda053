"""Parameter expressions and samplings (tflaunch.sweep.space / .sampling); Bayesian with the real Optuna."""
from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys

import pytest

from tflaunch.errors import SpecError
from tflaunch.sweep import (BayesianParameterSampling, GridParameterSampling, RandomParameterSampling, choice,
                            lognormal, loguniform, normal, qloguniform, qnormal, quniform, randint, uniform)
from tflaunch.sweep.sampling import sampling_from_dict
from tflaunch.sweep.space import parse
from tflaunch.sweep.trials import trial_argv

from conftest import REPO


def draw(sampling, count, goal="maximize"):
    history = []
    for index in range(count):
        suggestion = sampling.suggest(index, history, goal)
        if suggestion is None:
            break
        history.append({"hyperparameters": suggestion[0], "sampler_values": suggestion[1], "status": "Completed",
                        "best": None})
    return [t["hyperparameters"] for t in history]


def test_every_expression_samples_in_its_range():
    rng = random.Random(1)
    for _ in range(200):
        assert choice(16, 32, 64).sample(rng) in (16, 32, 64)
        assert choice([1, "a"]).sample(rng) in (1, "a")
        assert 0 <= randint(5).sample(rng) < 5
        assert -1 <= uniform(-1, 1).sample(rng) <= 1
        value = quniform(0, 10, 2).sample(rng)
        assert value in (0, 2, 4, 6, 8, 10) and isinstance(value, int)
        assert math.exp(-6) <= loguniform(-6, -1).sample(rng) <= math.exp(-1)
        q = qloguniform(0, 3, 0.5).sample(rng)
        assert abs(q / 0.5 - round(q / 0.5)) < 1e-9
        assert lognormal(0, 1).sample(rng) > 0
        assert isinstance(normal(0, 1).sample(rng), float)
        assert float(qnormal(10, 3, 1).sample(rng)).is_integer()


def test_expressions_parse_from_calls_and_records():
    assert parse("loguniform(-6, -1)") == loguniform(-6, -1)
    assert parse("choice(16, 32, 64)") == choice(16, 32, 64)
    assert parse({"kind": "uniform", "args": [0, 1]}) == uniform(0, 1)
    assert parse([1, 2]) == choice(1, 2)
    assert parse(choice(range(3)).to_dict()) == choice(0, 1, 2)
    for bad, message in [("uniform(1, 0)", "min_value must be below max_value"), ("normal(0, 0)", "sigma must be > 0"),
                         ("choice()", "at least one option"), ("beta(1, 2)", "unknown parameter expression"),
                         ("uniform(a, 1)", "must be literal"), ("__import__('os')", "unknown parameter expression"),
                         ("uniform(0, 1", "expected an expression"), ("randint(0)", "upper must be an integer >= 1")]:
        with pytest.raises(SpecError, match=message):
            parse(bad)


def test_grid_is_every_combination_in_order():
    grid = GridParameterSampling({"--lr": choice(0.1, 0.01), "--batch": choice(16, 32, 64)})
    assert grid.total() == 6
    assert draw(grid, 10) == [{"--lr": lr, "--batch": b} for lr in (0.1, 0.01) for b in (16, 32, 64)]
    with pytest.raises(SpecError, match="grid sampling takes choice"):
        GridParameterSampling({"--lr": uniform(0, 1)})


def test_random_is_seeded_per_trial_and_never_repeats_a_combination_of_choices():
    space = {"--lr": loguniform(-6, -1), "--batch": choice(16, 32, 64), "--layers": randint(4)}
    a = draw(RandomParameterSampling(space, seed=7), 20)
    assert a == draw(RandomParameterSampling(space, properties={"rng_seed": 7}), 20)
    assert a != draw(RandomParameterSampling(space, seed=8), 20)
    # trial i's values depend on the seed and i only: what a resumed driver relies on
    sampler = RandomParameterSampling(space, seed=7)
    assert sampler.suggest(5, [], "maximize")[0] == a[5]
    discrete = draw(RandomParameterSampling({"a": choice(1, 2, 3), "b": choice("x", "y")}, seed=1), 10)
    assert len(discrete) == 6 and len({tuple(sorted(d.items())) for d in discrete}) == 6


def test_trial_arguments():
    assert trial_argv(["--epochs", "5"], {"--lr": 0.001, "batch": 32}) == ["--epochs", "5", "--lr", "0.001",
                                                                           "--batch", "32"]
    assert trial_argv(["--lr", "0.1", "--x=1"], {"--lr": 0.5, "--x": "b"}) == ["--lr", "0.5", "--x=b"]


def test_samplings_round_trip_and_refuse_what_they_cannot_do():
    for sampling in (RandomParameterSampling({"--lr": normal(0, 1)}, seed=3), GridParameterSampling({"a": choice(1)}),
                     BayesianParameterSampling({"--lr": quniform(0, 1, 0.1)}, seed=2)):
        again = sampling_from_dict(sampling.to_dict())
        assert type(again) is type(sampling) and again.to_dict() == sampling.to_dict()
    with pytest.raises(SpecError, match="Bayesian sampling takes choice, randint, uniform"):
        BayesianParameterSampling({"--lr": normal(0, 1)})
    with pytest.raises(SpecError, match="kind 'sobol': use random, grid or bayesian"):
        sampling_from_dict({"kind": "sobol", "parameter_space": {"a": [1]}})
    with pytest.raises(SpecError, match="not a usable parameter name"):
        RandomParameterSampling({"--a b": choice(1)})


def quadratic(p):
    return -((p["x"] - 0.3) ** 2 + (p["y"] + 0.2) ** 2)


def optimize(sampling, trials=30):
    history = []
    for index in range(trials):
        params, raw = sampling.suggest(index, history, "maximize")
        history.append({"hyperparameters": params, "sampler_values": raw, "status": "Completed",
                        "best": quadratic(params)})
    return max(t["best"] for t in history)


def test_bayesian_with_optuna_beats_random_on_a_quadratic():
    pytest.importorskip("optuna")
    space = {"x": uniform(-2, 2), "y": uniform(-2, 2)}
    seeds = range(5)
    bayes = [optimize(BayesianParameterSampling(space, seed=s)) for s in seeds]
    rand = [optimize(RandomParameterSampling(space, seed=s)) for s in seeds]
    assert statistics.median(bayes) > statistics.median(rand)
    assert statistics.median(bayes) > -0.05  # in the optimum's region


def test_bayesian_tells_optuna_about_failed_and_running_trials_and_maps_quantized_values():
    pytest.importorskip("optuna")
    sampling = BayesianParameterSampling({"--q": quniform(0, 1, 0.25), "--lr": qloguniform(-3, 0, 0.01),
                                          "--k": choice("a", "b")}, seed=1)
    history = []
    for index, status in enumerate(["Completed", "Failed", "Running", "Completed"]):
        params, raw = sampling.suggest(index, history, "minimize")
        assert params["--q"] in (0, 0.25, 0.5, 0.75, 1.0) and params["--k"] in ("a", "b")
        assert set(raw) == {"--q", "--lr", "--k"}
        history.append({"hyperparameters": params, "sampler_values": raw, "status": status,
                        "best": 1.0 if status == "Completed" else None})


def test_bayesian_without_optuna_is_a_one_line_error_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from tflaunch.sweep import BayesianParameterSampling, uniform\n"
            "from tflaunch.errors import SpecError\n"
            "try:\n    BayesianParameterSampling({'x': uniform(0, 1)}).suggest(0, [], 'maximize')\n"
            "except SpecError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "BayesianParameterSampling needs Optuna" in out.stdout and "tflaunch[sweep]" in out.stdout
