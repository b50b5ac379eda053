"""Parameter-server training that survives the loss of any task (TF2 ``ParameterServerStrategy``).

The same job as ``train_ps.py`` (one script for every process; ``TF_CONFIG`` says which one this is),
written for restarts: run it with ``--max-restarts`` and a failed task is started again::

    python -m tflaunch run --backend ps --workers 2 --ps 1 --chief --max-restarts 3 \\
        --source-dir examples/tf_distributed train_ps_fault_tolerant.py -- --epochs 10

What TensorFlow does about each failure (``ClusterCoordinator``, "Handling Task Failure"), and what
this script adds:

- **a worker** dies: the coordinator puts the steps that worker was running back in its queue (the
  other workers run them: a step may run more than once), keeps training with the workers left and,
  once a server answers at the worker's address again, re-creates the per-worker dataset there and
  sends it steps again. Nothing to do in the script; the launcher only has to start the worker again
  with the same ``TF_CONFIG`` task and port (tflaunch does: a failed worker restarts alone).
- **a parameter server** dies: its variables are gone. ``schedule``/``join`` raise
  ``UnavailableError`` (or ``AbortedError``); the coordinator must be restarted, to re-create the
  variables and load the last checkpoint. This script then exits with status 75 (EX_TEMPFAIL)
  and one line on stderr; tflaunch restarts the failed ps together with the chief.
- **the chief** (the coordinator) dies: started again, it connects to the workers and parameter
  servers and resumes from the checkpoint.

So the chief keeps a ``tf.train.Checkpoint`` (model, optimizer and the number of epochs done) under
``<output-dir>/ckpt`` (``tf.train.CheckpointManager``, the last 2 kept), saved after every
``--checkpoint-every`` epochs and restored at start: it prints ``chief resumed from step N (epoch E)``
(N: the optimizer's ``iterations``, all workers' steps together; with asynchronous training a step
re-run after a worker failure counts twice) or ``chief starting at step 0 (no checkpoint)``, then
``epoch N loss X`` per epoch, and at the end saves ``outputs/model.keras`` and ``outputs/metrics.json``
and exits 0. A run started again after it completed resumes at the last epoch and trains no more.

Workers print ``worker <index> ran steps: ...`` from inside the scheduled step (``tf.print`` runs
where the step runs), and every ps and worker prints ``<role> <index> serving ... (attempt A)`` when
its server is up (``A``: ``TFLAUNCH_ATTEMPT``, 1 without tflaunch), so each task's log shows that it
came back and trained again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from train_ps import CLASSES, FEATURES, make_data  # the same data as train_ps.py, in the same directory

LAUNCH_HINT = ("python -m tflaunch run --backend ps --workers 2 --ps 1 --chief --max-restarts 3 "
               "train_ps_fault_tolerant.py")
EX_TEMPFAIL = 75  # "try again": the chief lost a parameter server; a restart resumes from the checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fault-tolerant ParameterServerStrategy training "
                                                 "(chief, worker or ps) with checkpoints")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=20,
                        help="steps scheduled per epoch, all workers together")
    parser.add_argument("--batch-size", type=int, default=32, help="per step (one worker)")
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="save a checkpoint every N epochs")
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--log-every", type=int, default=10,
                        help="a worker prints its 1st step and every N-th of its steps (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size", "checkpoint_every", "log_every"):
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
    missing = [job for job in ("chief", "worker", "ps") if not cluster.get(job)]
    if missing:
        raise ValueError(f"TF_CONFIG's cluster has no {'/'.join(missing)} task (this example needs a chief)")
    if task_type not in ("chief", "worker", "ps") or not 0 <= index < len(cluster[task_type]):
        raise ValueError(f"TF_CONFIG's task {task_type}:{index} is not in the cluster")
    return cluster, task_type, index


def attempt() -> int:
    """Which start of this task this is: tflaunch's ``TFLAUNCH_ATTEMPT`` (1, 2, ...), 1 without it."""
    value = os.environ.get("TFLAUNCH_ATTEMPT", "1")
    return int(value) if value.isdigit() else 1


def serve(tf: Any, resolver: Any) -> None:
    """A ps or worker task: start this task's gRPC server and serve until killed. A worker started again
    after a failure needs nothing else: the coordinator finds it at the same address."""
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc",
                                  start=True)
    print(f"{resolver.task_type} {resolver.task_id} serving {server.target} (attempt {attempt()})", flush=True)
    server.join()


def coordinate(tf: Any, resolver: Any, args: argparse.Namespace) -> int:
    """The chief: restore the last checkpoint, train the epochs left on the workers, save."""
    import keras
    import numpy as np

    num_workers = resolver.cluster_spec().num_tasks("worker")
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

    keras.utils.set_random_seed(args.seed)
    x, y = make_data(5120, args.seed)
    x, y, x_test, y_test = x[:4096], y[:4096], x[4096:], y[4096:]

    with strategy.scope():  # every variable below lives on the ps tasks
        model = keras.Sequential([
            keras.Input(shape=(FEATURES,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(CLASSES),
        ])
        optimizer = keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9)
        optimizer.build(model.trainable_variables)
        epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Keras 3 models and optimizers are trackable: tf.train.Checkpoint saves and restores their
    # variables wherever they live (here: read from and written back to the parameter servers).
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epochs_done=epochs_done)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(args.output_dir, "ckpt"), max_to_keep=2)
    resumed_from = 0
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        resumed_from = int(optimizer.iterations.numpy())
        print(f"chief resumed from step {resumed_from} (epoch {int(epochs_done.numpy())}, "
              f"{manager.latest_checkpoint}; attempt {attempt()})", flush=True)
    else:
        print(f"chief starting at step 0 (no checkpoint; attempt {attempt()})", flush=True)

    def dataset_fn(_: tf.distribute.InputContext) -> tf.data.Dataset:
        # Runs on each worker, again on a worker that came back after a failure.
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shard(num_workers, worker)
        ds = ds.shuffle(4096, seed=args.seed).repeat().batch(args.batch_size, drop_remainder=True)
        return ds.enumerate(start=1).prefetch(2)

    per_worker_iterator = iter(coordinator.create_per_worker_dataset(
        lambda: strategy.distribute_datasets_from_function(dataset_fn)))

    @tf.function
    def train_step(iterator: Any) -> tf.Tensor:
        local_step, (features, labels) = next(iterator)

        def replica_fn(features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(features, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss, tf.convert_to_tensor(optimizer.iterations)

        loss, global_step = strategy.run(replica_fn, args=(features, labels))
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()  # outside the `if`
        if local_step == 1 or local_step % args.log_every == 0:
            line = tf.strings.format("worker {} ran steps: {} here, {} in all, batch loss ",
                                     (worker, local_step, global_step))
            tf.print(line + tf.strings.as_string(loss, precision=4), output_stream=sys.stderr)
        return loss

    losses: list[float] = []
    try:
        for epoch in range(int(epochs_done.numpy()) + 1, args.epochs + 1):
            step_losses = [coordinator.schedule(train_step, args=(per_worker_iterator,))
                           for _ in range(args.steps_per_epoch)]
            coordinator.join()  # raises UnavailableError/AbortedError once a parameter server is lost
            losses.append(float(np.mean([v.fetch() for v in step_losses])))
            print(f"epoch {epoch} loss {losses[-1]:.4f}", flush=True)
            epochs_done.assign(epoch)
            if epoch % args.checkpoint_every == 0 or epoch == args.epochs:
                path = manager.save(checkpoint_number=int(optimizer.iterations.numpy()))
                print(f"chief saved {path}", flush=True)
        logits = model(x_test, training=False)
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line for line in lines if "UNAVAILABLE" in line or "ABORTED" in line), lines[0] if lines else "")
        print(f"chief: lost a parameter server ({type(e).__name__}: {cause[:300]}); exiting {EX_TEMPFAIL}: "
              "start the ps and the chief again and the chief resumes from the last checkpoint",
              file=sys.stderr, flush=True)
        return EX_TEMPFAIL

    accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=1) == y_test))
    os.makedirs(args.output_dir, exist_ok=True)
    model_path = os.path.join(args.output_dir, "model.keras")
    model.save(model_path)
    metrics = {"strategy": "ParameterServerStrategy", "workers": num_workers,
               "parameter_servers": resolver.cluster_spec().num_tasks("ps"), "epochs": args.epochs,
               "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
               "learning_rate": args.learning_rate, "attempt": attempt(), "resumed_from_step": resumed_from,
               "steps": int(optimizer.iterations.numpy()), "loss": losses, "test_accuracy": accuracy}
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    print(f"test accuracy {accuracy:.4f} after {metrics['steps']} steps; saved {model_path}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        read_tf_config()
    except ValueError as e:
        print(f"train_ps_fault_tolerant.py: needs a chief/worker/ps cluster in TF_CONFIG ({e}); start it "
              f"with e.g. `{LAUNCH_HINT}`", file=sys.stderr)
        return 2
    # TensorFlow's parameter-server guide sets it: worker and ps failures reach the coordinator as errors
    # instead of hanging its RPCs. tflaunch sets it already; a value given is left alone.
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type in ("worker", "ps"):
        serve(tf, resolver)
        return 0
    return coordinate(tf, resolver, args)


if __name__ == "__main__":
    sys.exit(main())
