"""The reference's hyperparameter-tuning how-to on the MNIST estimator, through tflaunch: random sampling
of the learning rate and the batch size, a Bandit early-termination policy on the validation accuracy the
Keras callback logs each epoch, the best trial's model registered.

    python examples/mnist/make_data.py --out data/mnist
    python examples/mnist/sweep.py --data data/mnist --trials 8 --concurrent 2 --epochs 4
    python -m tflaunch sweep show SWEEP            # the trials, as the sweep recorded them
"""
import argparse
import os
import sys

from tflaunch import Dataset, Experiment, SSHTarget, TensorFlow
from tflaunch.sweep import (BanditPolicy, HyperDriveConfig, PrimaryMetricGoal, RandomParameterSampling, choice,
                            loguniform)

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the folder with the four MNIST files (make_data.py writes one)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=8, help="max_total_runs")
    parser.add_argument("--concurrent", type=int, default=2, help="max_concurrent_runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hosts", help="ssh hosts to spread the trials over (one trial per slot); default: here")
    args = parser.parse_args(argv)

    mnist = Dataset.File.from_files(path=os.path.abspath(args.data)).as_named_input("mnist")
    est = TensorFlow(source_directory=HERE, entry_script="train.py",
                     script_params={"--data-folder": mnist.as_mount(), "--epochs": args.epochs},
                     compute_target=SSHTarget(hosts=args.hosts.split(",")) if args.hosts else "local")
    sampling = RandomParameterSampling({"--learning-rate": loguniform(-6, -1),  # e^-6 .. e^-1
                                        "--batch-size": choice(16, 32, 64, 128)}, seed=args.seed)
    config = HyperDriveConfig(estimator=est, hyperparameter_sampling=sampling,
                              primary_metric_name="val_accuracy", primary_metric_goal=PrimaryMetricGoal.MAXIMIZE,
                              policy=BanditPolicy(evaluation_interval=1, slack_factor=0.1, delay_evaluation=2),
                              max_total_runs=args.trials, max_concurrent_runs=args.concurrent)
    sweep = Experiment("tf-mnist-sweep").submit(config)
    sweep.wait_for_completion(show_output=True)
    best = sweep.get_best_run_by_primary_metric()
    if best is None:
        print("no trial logged val_accuracy", file=sys.stderr)
        return 1
    print(f"best trial: {best.id} {sweep.get_hyperparameters()[best.id]} "
          f"val_accuracy {max(best.get_metrics()['val_accuracy'])}")
    model = best.register_model(model_name="tf-dnn-mnist-tuned", model_path="outputs/model.keras")
    print(f"registered {model.name} version {model.version}")
    print(f"report: {sweep.get_portal_url()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
