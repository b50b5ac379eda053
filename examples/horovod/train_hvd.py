"""Data-parallel Keras training with Horovod (TensorFlow 2.15, Keras 2).

Every process trains the same model on its own shard of the data; ``hvd.DistributedOptimizer``
averages the gradients over all processes after each batch. Runs with one process as it is::

    python train_hvd.py --epochs 2

or with N processes under MPI (Open MPI shown; tflaunch's ``--backend mpi`` starts the same)::

    mpirun -np 2 python train_hvd.py --epochs 2

Data: the four gzipped MNIST IDX files in ``--data-folder`` (the real MNIST, or those that
``examples/mnist/make_data.py`` writes), else a synthetic, seeded 10-class data set of 28x28
images generated in memory (``--samples`` of them), so nothing is downloaded.

Rank 0 writes ``./outputs/model.h5`` (loads back with ``tf.keras.models.load_model``) and
``./outputs/metrics.json``; every rank prints ``rank R/S trained N samples, loss L``.

``samples_per_second`` in metrics.json is the global training throughput: samples trained by all
processes together divided by the wall time of the epochs, leaving out the first epoch (graph
tracing, Horovod's first collectives) when there is more than one epoch; with one epoch it is
measured over that epoch, warm-up included.
"""
import argparse
import gzip
import json
import os
import struct
import sys
import time

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
NUM_CLASSES = 10


def load_idx(path):
    """Read one (optionally gzipped) IDX file of unsigned bytes: images (n, rows, cols) or labels (n,)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        magic = struct.unpack(">I", fh.read(4))[0]
        if magic == IMAGES_MAGIC:
            n, rows, cols = struct.unpack(">III", fh.read(12))
            shape = (n, rows, cols)
        elif magic == LABELS_MAGIC:
            shape = struct.unpack(">I", fh.read(4))
        else:
            raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {magic:#x})")
        data = np.frombuffer(fh.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def load_mnist_train(folder):
    """(x, y) of the MNIST training files in folder: images flattened and scaled to [0, 1]."""
    x = load_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"))
    y = load_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"))
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels")
    return x.reshape(len(x), -1).astype("float32") / 255.0, y.astype("int64")


def synthetic_data(samples, seed=0, pixels=28 * 28):
    """A learnable 10-class problem: grey images, each class a faint fixed random pattern, plus noise.

    Faint enough that the model needs a few epochs (loss about 1.9, 0.4, 0.06 over the first
    three). Same seed, same data on every process, so sharding by rank splits one data set.
    """
    rng = np.random.default_rng(seed)
    patterns = rng.random((NUM_CLASSES, pixels), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=samples)
    noise = rng.normal(0.0, 0.3, size=(samples, pixels))
    x = np.clip(0.5 + 0.2 * (patterns[y] - 0.5) + noise, 0.0, 1.0).astype("float32")
    return x, y.astype("int64")


def main():
    parser = argparse.ArgumentParser(description="Keras + Horovod data-parallel training")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.01, help="for one process; scaled by hvd.size()")
    parser.add_argument("--data-folder", help="folder with MNIST .gz IDX files; synthetic data if unset")
    parser.add_argument("--samples", type=int, default=8192, help="size of the synthetic data set")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--outputs", default="outputs", help="where rank 0 writes model and metrics")
    args = parser.parse_args()

    import tensorflow as tf
    import horovod
    import horovod.tensorflow.keras as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()

    # One GPU per process, chosen by the rank on this node. No GPU: CPU, nothing to do.
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")

    if args.data_folder:
        x, y = load_mnist_train(args.data_folder)
        source = args.data_folder
    else:
        x, y = synthetic_data(args.samples, seed=0)
        source = f"synthetic({args.samples})"
    # Every rank must run the same number of steps (each step is an allreduce): shards differ by
    # at most one sample, so take the steps the smallest shard (len // size samples) fills.
    steps = max(1, (len(y) // size) // args.batch_size)
    # Shard by rank: process r takes samples r, r+size, r+2*size, ...
    x, y = x[rank::size], y[rank::size]
    if rank == 0:
        print(f"data: {source}, {len(x)} samples per process, {size} process(es)", flush=True)

    # Seeded per rank (reproducible runs); the initial weights then differ between ranks until
    # BroadcastGlobalVariablesCallback copies rank 0's to all at the start of training.
    tf.keras.utils.set_random_seed(args.seed + rank)
    model = tf.keras.Sequential([
        tf.keras.Input(shape=(x.shape[1],)),
        tf.keras.layers.Dense(128, activation="relu"),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(NUM_CLASSES, activation="softmax"),
    ])
    # Larger effective batch (batch_size * size): scale the learning rate with it.
    optimizer = tf.keras.optimizers.SGD(learning_rate=args.lr * size, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class EpochTimer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.begin = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.begin)

    times = []
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # rank 0's initial weights to all
        hvd.callbacks.MetricAverageCallback(),              # epoch metrics averaged over ranks
        EpochTimer(),
    ]
    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shuffle(len(y), seed=args.seed + rank, reshuffle_each_iteration=True)
               .repeat().batch(args.batch_size, drop_remainder=True))
    history = model.fit(dataset, epochs=args.epochs, steps_per_epoch=steps, callbacks=callbacks,
                        verbose=2 if rank == 0 else 0)

    trained = steps * args.batch_size * args.epochs
    loss = float(history.history["loss"][-1])
    accuracy = float(history.history["accuracy"][-1])
    print(f"rank {rank}/{size} trained {trained} samples, loss {loss:.4f}", flush=True)

    if rank == 0:
        timed = times[1:] if len(times) > 1 else times
        samples_per_second = steps * args.batch_size * size * len(timed) / sum(timed)
        os.makedirs(args.outputs, exist_ok=True)
        # HDF5 keeps the model loadable without Horovod: the optimizer is a wrapped class, so
        # leave it out (include_optimizer=False); reload with load_model(path, compile=False).
        model.save(os.path.join(args.outputs, "model.h5"), include_optimizer=False)
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "first_epoch_loss": float(history.history["loss"][0]),
            "epochs": args.epochs,
            "world_size": size,
            "batch_size_per_process": args.batch_size,
            "learning_rate": args.lr * size,
            "samples_per_second": samples_per_second,
            "throughput_excludes_first_epoch": len(times) > 1,
            "data": source,
            "tensorflow": tf.__version__,
            "horovod": horovod.__version__,
        }
        with open(os.path.join(args.outputs, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        print(f"saved {args.outputs}/model.h5 and {args.outputs}/metrics.json: "
              f"loss {loss:.4f}, accuracy {accuracy:.4f}, {samples_per_second:.0f} samples/s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
