"""Parameter-server training of a small Keras classifier (TF2 ``ParameterServerStrategy``).

One script for every process of the job; ``TF_CONFIG`` says which one this is::

    {"cluster": {"chief": ["h0:p"], "worker": ["h1:p", "h2:p"], "ps": ["h3:p"]},
     "task": {"type": "worker", "index": 1}, "environment": "cloud"}

- ``ps`` and ``worker``: start a gRPC ``tf.distribute.Server`` and serve forever in ``join()``;
  whoever launched the job stops them once the chief has exited. The parameter servers hold the
  variables; the workers run the training steps the chief sends them.
- ``chief``: the coordinator. It builds the model under ``strategy.scope()`` (so its variables live
  on the parameter servers), creates a dataset on every worker, schedules training steps with
  ``ClusterCoordinator.schedule`` (asynchronous training: each worker reads and updates the
  variables on its own), prints ``epoch N loss X``, and finally saves ``outputs/model.keras`` and
  ``outputs/metrics.json``.

The reference's own layout has no chief (``TensorFlow(..., node_count=2, worker_count=2,
parameter_server_count=1, distributed_backend='ps')``): then worker 0 is the coordinator, as the
reference's worker 0 was its chief, and the other workers run the steps (so it needs two workers).

Keras 3 ``Model.fit`` does not support ``ParameterServerStrategy``, so this is a custom training
loop; Keras 3 layers and optimizers built under the strategy's scope work in it (TF 2.21).

Each worker prints ``worker <index> ran steps: ...`` to its own stderr from inside the scheduled
step (``tf.print`` runs where the step runs), so the workers' logs show that they trained.

    python -m tflaunch run --backend ps --workers 2 --ps 1 --chief --source-dir examples/tf_distributed \\
        train_ps.py -- --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

LAUNCH_HINT = "python -m tflaunch run --backend ps --workers 2 --ps 1 --chief train_ps.py"
FEATURES, CLASSES = 20, 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ParameterServerStrategy training (chief, worker or ps)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=20,
                        help="steps scheduled per epoch, all workers together")
    parser.add_argument("--batch-size", type=int, default=64, help="per step (one worker)")
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--log-every", type=int, default=10,
                        help="a worker prints its 1st step and every N-th of its steps (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def read_tf_config() -> tuple[dict[str, list[str]], str, int]:
    """The cluster, task type and index from ``TF_CONFIG``; ValueError saying what is wrong."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("TF_CONFIG is not set")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a cluster and task: {e}") from None
    if task_type == "evaluator":
        raise ValueError("this example has no evaluator task; start the job without one")
    missing = [job for job in ("worker", "ps") if not cluster.get(job)]
    if not cluster.get("chief") and len(cluster.get("worker") or []) < 2:
        missing.insert(0, "chief")  # worker 0 could coordinate, but then no worker would be left to train
    if missing:
        raise ValueError(f"TF_CONFIG's cluster has no {'/'.join(missing)} task")
    if task_type not in ("chief", "worker", "ps") or not 0 <= index < len(cluster[task_type]):
        raise ValueError(f"TF_CONFIG's task {task_type}:{index} is not in the cluster")
    return cluster, task_type, index


def make_data(n: int, seed: int) -> tuple[Any, Any]:
    """A deterministic classification problem: ``CLASSES`` Gaussian blobs in ``FEATURES`` dimensions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=n)
    x = centers[y] + rng.normal(scale=1.5, size=(n, FEATURES))
    return x.astype("float32"), y.astype("int32")


def serve(tf: Any, resolver: Any) -> None:
    """A ps or worker task: start this task's gRPC server and serve until killed."""
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc",
                                  start=True)
    print(f"{resolver.task_type} {resolver.task_id} serving {server.target} until stopped", flush=True)
    server.join()


def coordinate(tf: Any, resolver: Any, args: argparse.Namespace) -> int:
    """The chief: train on the workers, keep the variables on the parameter servers, save."""
    import keras
    import numpy as np

    num_workers = resolver.cluster_spec().num_tasks("worker")
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

    keras.utils.set_random_seed(args.seed)
    x, y = make_data(5120, args.seed)
    x, y, x_test, y_test = x[:4096], y[:4096], x[4096:], y[4096:]

    with strategy.scope():  # variables (weights and optimizer state) are created on the ps tasks
        model = keras.Sequential([
            keras.Input(shape=(FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES),
        ])
        optimizer = keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    devices = sorted({v.value.device for v in model.variables + optimizer.variables})
    print(f"chief: {num_workers} workers train, variables live on {', '.join(devices)}", flush=True)

    def dataset_fn(_: tf.distribute.InputContext) -> tf.data.Dataset:
        # Runs on each worker; the worker index is filled in when the function runs there.
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shard(num_workers, worker)
        ds = ds.shuffle(4096, seed=args.seed).repeat().batch(args.batch_size, drop_remainder=True)
        return ds.enumerate(start=1).prefetch(2)  # (how many batches this worker has taken, batch)

    per_worker_dataset = coordinator.create_per_worker_dataset(
        lambda: strategy.distribute_datasets_from_function(dataset_fn))
    per_worker_iterator = iter(per_worker_dataset)

    @tf.function
    def train_step(iterator: Any) -> tf.Tensor:
        # Scheduled by the chief, executed on whichever worker is free.
        local_step, (features, labels) = next(iterator)

        def replica_fn(features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(features, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss, tf.convert_to_tensor(optimizer.iterations)

        loss, global_step = strategy.run(replica_fn, args=(features, labels))
        # Called outside the `if`: the index is fed in at call time, which a branch cannot capture.
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        if local_step == 1 or local_step % args.log_every == 0:
            line = tf.strings.format("worker {} ran steps: {} here, {} in all, batch loss ",
                                     (worker, local_step, global_step))
            tf.print(line + tf.strings.as_string(loss, precision=4), output_stream=sys.stderr)
        return loss

    losses: list[float] = []
    for epoch in range(1, args.epochs + 1):
        step_losses = [coordinator.schedule(train_step, args=(per_worker_iterator,))
                       for _ in range(args.steps_per_epoch)]
        coordinator.join()  # every scheduled step has run
        losses.append(float(np.mean([v.fetch() for v in step_losses])))
        print(f"epoch {epoch} loss {losses[-1]:.4f}", flush=True)

    # The coordinator reads the variables from the parameter servers to evaluate and to save.
    logits = model(x_test, training=False)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=1) == y_test))
    os.makedirs(args.output_dir, exist_ok=True)
    model_path = os.path.join(args.output_dir, "model.keras")
    model.save(model_path)
    metrics = {"strategy": "ParameterServerStrategy", "workers": num_workers,
               "parameter_servers": resolver.cluster_spec().num_tasks("ps"),
               "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
               "learning_rate": args.learning_rate, "loss": losses, "test_accuracy": accuracy}
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    print(f"test accuracy {accuracy:.4f}; saved {model_path}", flush=True)
    return 0


def worker_zero_coordinates(tf: Any, resolver: Any) -> Any:
    """The reference's chief-less cluster as ParameterServerStrategy needs it: worker 0 becomes the chief
    (the coordinator) and worker i becomes worker i-1. Every task computes the same cluster."""
    cluster = resolver.cluster_spec().as_dict()
    workers = cluster["worker"]
    renamed = {"chief": [workers[0]], "worker": workers[1:], "ps": cluster["ps"]}
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "worker":
        task_type, task_id = ("chief", 0) if task_id == 0 else ("worker", task_id - 1)
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(renamed), task_type=task_type, task_id=task_id, rpc_layer=resolver.rpc_layer or "grpc")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        read_tf_config()
    except ValueError as e:
        print(f"train_ps.py: needs a chief/worker/ps cluster in TF_CONFIG ({e}); start it with e.g. "
              f"`{LAUNCH_HINT}`", file=sys.stderr)
        return 2
    # As TensorFlow's parameter-server guide does: lets worker and ps failures reach the coordinator.
    # Launchers (tflaunch, run_by_hand.py) set it already; a value given is left alone.
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "chief" not in resolver.cluster_spec().jobs:
        resolver = worker_zero_coordinates(tf, resolver)
    if resolver.task_type in ("worker", "ps"):
        serve(tf, resolver)
        return 0
    return coordinate(tf, resolver, args)


if __name__ == "__main__":
    sys.exit(main())
