"""Write a small MNIST-format data set (gzipped IDX files) from scikit-learn's bundled digits.

MNIST cannot be downloaded where tflaunch is tested (no network), so this writes the same four files
the real MNIST distribution has, in the same format, from the 1,797 real handwritten digits that
scikit-learn ships inside its wheel (8x8 pixels, scaled to 20x20 and centred in 28x28 like MNIST).
``train.py`` reads them with the loader it would use on the real files::

    python make_data.py --out ./data/mnist
"""
import argparse
import gzip
import os
import struct

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a batch of square images (n, h, w) to (n, size, size) by bilinear interpolation."""
    n, h, _ = images.shape
    coords = (np.arange(size) + 0.5) * h / size - 0.5
    coords = np.clip(coords, 0, h - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, h - 1)
    frac = coords - lo
    rows = images[:, lo, :] * (1 - frac)[None, :, None] + images[:, hi, :] * frac[None, :, None]
    return rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, hi] * frac[None, None, :]


def to_mnist_images(digits_8x8: np.ndarray) -> np.ndarray:
    """sklearn digits (values 0..16, 8x8) -> MNIST-like uint8 images (28x28, digit in the centre 20x20)."""
    scaled = resize_bilinear(digits_8x8.astype(np.float64) / 16.0, 20)
    out = np.zeros((len(digits_8x8), 28, 28), dtype=np.uint8)
    out[:, 4:24, 4:24] = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    return out


def write_idx_images(path: str, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, n, rows, cols))
        fh.write(images.astype(np.uint8).tobytes())


def write_idx_labels(path: str, labels: np.ndarray) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">II", 2049, len(labels)))
        fh.write(labels.astype(np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/mnist", help="directory for the four .gz files")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.datasets import load_digits  # reads the copy bundled in the wheel: no network

    digits = load_digits()
    images = to_mnist_images(digits.images)
    labels = digits.target.astype(np.uint8)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    n_test = int(len(labels) * args.test_fraction)
    split = {"test": order[:n_test], "train": order[n_test:]}
    os.makedirs(args.out, exist_ok=True)
    for part, (image_file, label_file) in FILES.items():
        write_idx_images(os.path.join(args.out, image_file), images[split[part]])
        write_idx_labels(os.path.join(args.out, label_file), labels[split[part]])
        print(f"{part}: {len(split[part])} images -> {os.path.join(args.out, image_file)}")


if __name__ == "__main__":
    main()
