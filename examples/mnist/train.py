"""Train a Keras classifier on MNIST-format data (the classic Azure ML ``tf_mnist.py`` sample).

Reads the four gzipped IDX files of MNIST from ``--data-folder`` (the real ones, or those written
by ``make_data.py``), trains a two-hidden-layer network, logs loss and accuracy per epoch to the run's
history (``Run.get_context()``, ``tflaunch.keras.MetricsCallback``), to ``./logs/training.csv`` and as
TensorBoard summaries under ``./logs/tensorboard``, and writes the model to ``./outputs``; tflaunch keeps
all of it in the run record::

    python -m tflaunch run -e tf-mnist --source-dir examples/mnist train.py -- \\
        --data-folder "$PWD/data/mnist" --batch-size 50 --learning-rate 0.01
"""
import argparse
import gzip
import json
import os
import struct
import sys

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def load_idx(path: str) -> np.ndarray:
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


def load_mnist(folder: str):
    """((x_train, y_train), (x_test, y_test)) with images flattened and scaled to [0, 1]."""
    def pair(prefix):
        x = load_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
        y = load_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
        if len(x) != len(y):
            raise ValueError(f"{folder}: {len(x)} {prefix} images but {len(y)} labels")
        return x.reshape(len(x), -1).astype("float32") / 255.0, y.astype("int64")
    return pair("train"), pair("t10k")


def main() -> int:
    parser = argparse.ArgumentParser(description="Keras MNIST classifier")
    parser.add_argument("--data-folder", required=True, help="folder with the MNIST .gz files")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--first-layer-neurons", type=int, default=300)
    parser.add_argument("--second-layer-neurons", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    if not os.path.isdir(args.data_folder):
        print(f"error: --data-folder {args.data_folder} does not exist; create it with make_data.py",
              file=sys.stderr)
        return 2
    (x_train, y_train), (x_test, y_test) = load_mnist(args.data_folder)
    print(f"data: {len(x_train)} training and {len(x_test)} test images of {x_train.shape[1]} pixels")

    import tensorflow as tf
    from tensorflow import keras

    import tflaunch.keras
    from tflaunch import Run

    run = Run.get_context()  # under tflaunch: this run's history; under plain python: prints
    run.set_tags({"dataset": os.path.basename(os.path.abspath(args.data_folder))})
    run.add_properties({"learning_rate": args.learning_rate, "batch_size": args.batch_size})

    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential([
        keras.Input(shape=(x_train.shape[1],)),
        keras.layers.Dense(args.first_layer_neurons, activation="relu"),
        keras.layers.Dense(args.second_layer_neurons, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    os.makedirs("outputs", exist_ok=True)
    os.makedirs("logs", exist_ok=True)
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test), verbose=2,
              callbacks=[keras.callbacks.CSVLogger("logs/training.csv"),
                         tflaunch.keras.MetricsCallback(run),                  # epoch metrics -> run history
                         keras.callbacks.TensorBoard(log_dir="logs/tensorboard")])  # `tflaunch tensorboard RUN`
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test_loss={loss:.4f} test_accuracy={accuracy:.4f}")
    run.log("test_loss", loss)
    run.log("test_accuracy", accuracy)
    model.save("outputs/model.keras")
    with open("outputs/metrics.json", "w") as fh:
        json.dump({"test_loss": float(loss), "test_accuracy": float(accuracy), "epochs": args.epochs,
                   "tensorflow": tf.__version__}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
