"""The reference's MNIST tutorial, through tflaunch's Python API (the Azure ML SDK v1 names): a workspace
from config.json, the data as a dataset downloaded to each host before the job starts, a TensorFlow
estimator, the run's output streamed, its report, and the model registered.

    python examples/mnist/make_data.py --out data/mnist
    python examples/mnist/submit.py --data data/mnist --epochs 5            # this machine
    python examples/mnist/submit.py --data /shared/mnist --hosts node1,node2 --mount

``Workspace.from_config()`` reads the first ``config.json`` (``.tflaunch/config.json``) found from the
current directory upwards, e.g. ``{"home": "~/.tflaunch", "find_links": "/site/wheels", "no_index": true}``;
without one the default home is used.
"""
import argparse
import os
import sys

from tflaunch import Dataset, Experiment, SSHTarget, SpecError, TensorFlow, Workspace

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the folder with the four MNIST files (make_data.py writes one)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hosts", help="ssh hosts (one process each); default: this machine")
    parser.add_argument("--mount", action="store_true", help="use the data where it is (every host must see it)")
    parser.add_argument("--framework-version", default=None, help="e.g. 2.15: run with that TensorFlow series")
    args = parser.parse_args(argv)

    try:
        ws = Workspace.from_config()
    except SpecError:
        ws = Workspace()  # no config.json: the default home (~/.tflaunch or $TFLAUNCH_HOME)
    exp = Experiment(workspace=ws, name="tf-mnist")

    ds = Dataset.File.from_files(path=os.path.abspath(args.data))
    mnist = ds.as_named_input("mnist")
    script_params = {
        "--data-folder": mnist.as_mount() if args.mount else mnist.as_download(),
        "--batch-size": 50,
        "--first-layer-neurons": 300,
        "--second-layer-neurons": 100,
        "--learning-rate": 0.01,
        "--epochs": args.epochs,
    }
    hosts = args.hosts.split(",") if args.hosts else None
    est = TensorFlow(source_directory=HERE, entry_script="train.py", script_params=script_params,
                     compute_target=SSHTarget(hosts=hosts) if hosts else "local",
                     node_count=len(hosts) if hosts else 1, framework_version=args.framework_version)
    run = exp.submit(est)
    run.wait_for_completion(show_output=True)
    print(f"report: {run.get_portal_url()}")
    model = run.register_model(model_name="tf-dnn-mnist", model_path="outputs/model.keras")
    print(f"registered {model.name} version {model.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
