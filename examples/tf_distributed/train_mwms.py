"""Synchronous data-parallel training of a Keras 3 model with ``MultiWorkerMirroredStrategy``.

Every process is a worker that runs this same script; ``TF_CONFIG`` lists the workers and says
which one this is (worker 0 is the chief)::

    {"cluster": {"worker": ["h0:p", "h1:p"]}, "task": {"type": "worker", "index": 1}}

Each worker holds a copy of the variables (initialised from worker 0's); each step, every worker
computes gradients on its shard of the global batch, the gradients are all-reduced (collective ops
over gRPC) and the same update is applied everywhere. All workers therefore run the same number of
steps, and every collective operation must be called by all of them.

Keras 3 ``Model.fit`` fails under a multi-worker ``MultiWorkerMirroredStrategy`` (TF 2.21 /
Keras 3.15: ``ValueError: Attempt to convert a value (PerReplica...)``, keras-team/keras#20585),
so this is a custom loop: Keras 3 layers, loss and optimizer under ``strategy.scope()``, steps
run with ``strategy.run``. (With tf-keras and ``TF_USE_LEGACY_KERAS=1``, ``fit`` works.)

Without ``TF_CONFIG`` it runs as a single worker: the same program on one process.

Every worker prints ``worker <index> epoch N loss X`` (the loss of the global batch, the same on
all workers); the chief saves ``outputs/model.keras`` and ``outputs/metrics.json`` alone. That is
safe because reading a mirrored variable outside ``strategy.run`` reads the local copy, no
collective involved; the other workers save nothing.

    python -m tflaunch run --backend multiworker --nodes 2 --procs-per-node 1 --hosts a,b \\
        --source-dir examples/tf_distributed train_mwms.py -- --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

FEATURES, CLASSES = 20, 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MultiWorkerMirroredStrategy training with Keras 3 fit")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="per replica (= per worker on CPU); the global batch is this x replicas")
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def check_tf_config() -> None:
    """ValueError unless ``TF_CONFIG`` is unset or describes this worker in a worker cluster."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a cluster and task: {e}") from None
    if task_type == "evaluator":
        raise ValueError("this example has no evaluator task; start the job without one")
    if cluster.get("ps"):
        raise ValueError("TF_CONFIG's cluster has ps tasks: that is a parameter-server job (train_ps.py)")
    if task_type not in ("worker", "chief") or not 0 <= index < len(cluster.get(task_type) or []):
        raise ValueError(f"TF_CONFIG's task {task_type}:{index} is not a worker of the cluster")


def make_data(n: int, seed: int) -> tuple[Any, Any]:
    """A deterministic classification problem: ``CLASSES`` Gaussian blobs in ``FEATURES`` dimensions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=n)
    x = centers[y] + rng.normal(scale=1.5, size=(n, FEATURES))
    return x.astype("float32"), y.astype("int32")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_tf_config()
    except ValueError as e:
        print(f"train_mwms.py: {e}", file=sys.stderr)
        return 2
    import tensorflow as tf

    # First, before any other TensorFlow op: it starts this worker's collective gRPC server.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np

    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type or "worker", resolver.task_id or 0
    cluster = resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
    workers = max(1, len(cluster.get("worker", [])) + len(cluster.get("chief", [])))
    replicas = strategy.num_replicas_in_sync  # one per worker on CPU, one per GPU with GPUs
    name = f"{task_type} {task_id}"
    print(f"{name}: {workers} worker(s), {replicas} replica(s) in sync{' (chief)' if is_chief else ''}",
          flush=True)

    keras.utils.set_random_seed(args.seed)
    x, y = make_data(5120, args.seed)
    x, y, x_test, y_test = x[:4096], y[:4096], x[4096:], y[4096:]
    global_batch = args.batch_size * replicas
    options = tf.data.Options()
    # In-memory data: every worker builds the whole pipeline and keeps its part of each batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=args.seed).repeat()
             .batch(global_batch, drop_remainder=True).with_options(options))

    with strategy.scope():  # mirrored variables: one copy per worker, kept identical
        model = keras.Sequential([
            keras.Input(shape=(FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES),
        ])
        optimizer = keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9)
        optimizer.build(model.trainable_variables)  # its variables too, before any step runs
    per_example_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    train_iterator = iter(strategy.experimental_distribute_dataset(train))

    @tf.function
    def train_step(iterator: Any) -> tf.Tensor:
        def replica_fn(features: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                logits = model(features, training=True)
                # Mean over the global batch: the optimizer sums the gradients of all workers.
                loss = tf.nn.compute_average_loss(per_example_loss(labels, logits),
                                                  global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduce + update
            return loss

        features, labels = next(iterator)
        per_replica_loss = strategy.run(replica_fn, args=(features, labels))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    losses: list[float] = []
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for _ in range(args.steps_per_epoch):
            total += float(train_step(train_iterator))
        losses.append(total / args.steps_per_epoch)
        print(f"{name} epoch {epoch} loss {losses[-1]:.4f}", flush=True)

    if is_chief:
        # Outside strategy.run a mirrored variable reads this worker's copy: no collective, so the
        # chief can evaluate and save alone while the other workers exit.
        logits = model(x_test, training=False)
        accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=1) == y_test))
        print(f"{name} test accuracy {accuracy:.4f}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        model_path = os.path.join(args.output_dir, "model.keras")
        model.save(model_path)
        metrics = {"strategy": "MultiWorkerMirroredStrategy", "workers": workers, "replicas": replicas,
                   "steps_per_epoch": args.steps_per_epoch, "global_batch_size": global_batch,
                   "learning_rate": args.learning_rate, "loss": losses, "test_accuracy": accuracy}
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        print(f"{name} saved {model_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
