"""CIFAR-10 from the official Python pickles: the paper's image-classification experiment.

The data come from ``cifar-10-python.tar.gz`` (read in place, streaming, nothing extracted to disk)
or from its extracted ``cifar-10-batches-py/`` directory.  Each batch file is a pickle of a dict
with ``b'data'`` (uint8, ``N x 3072``: 1024 red, then 1024 green, then 1024 blue values, each a
row-major 32 x 32 image) and ``b'labels'`` (``N`` integers in 0..9).

Pickles are **never trusted**: they are read with a restricted unpickler that resolves only the
few globals needed to rebuild numpy arrays (and bytes written by Python 3 at protocol 2), so a
file from the internet cannot run code.  Anything else is a :class:`DataError`.

Preprocessing (the paper's): images become float tensors of shape ``(N, 3, 32, 32)`` equal to
``x / 256`` minus the per-pixel mean of the chosen training images (:func:`center_images`);
labels are int64.  The training set is the concatenation of ``data_batch_1, data_batch_2, ...``
as far as they exist (at least ``data_batch_1``), the test set is ``test_batch``.  Loading a
user-given archive does not require the official md5 (a shortened excerpt is fine); only
:func:`download_cifar10` and :func:`verify_archive` check it.
"""

from __future__ import annotations

import io
import lzma
import operator
import os
import pickle
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samedge.core.validation import positive_int
from samedge.data import DataError, Split, center_images, int64_tensor
from samedge.data.download import download, md5sum, verify_md5

__all__ = [
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "ARCHIVE_NAME",
    "DIR_NAME",
    "TRAIN_BATCHES",
    "TEST_BATCH",
    "CLASSES",
    "SUBSETS",
    "download_cifar10",
    "verify_archive",
    "read_batch",
    "balanced_indices",
    "load_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
DIR_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_BATCH = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SUBSETS = ("first", "balanced")

IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32
_NUM_CLASSES = len(CLASSES)
# A full official batch is about 31 MB; anything far larger is not a CIFAR-10 batch.
_MAX_BATCH_BYTES = 1 << 28


# ----------------------------------------------------------------------------- safe unpickling


def _numpy_multiarray() -> Any:
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """What ``_codecs.encode`` does for bytes that Python 3 pickles at protocol 2, and nothing more."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """What ``bytes()`` does for an empty bytes object pickled by Python 3 at protocol 2."""
    if args:
        raise pickle.UnpicklingError("refused bytes() with arguments")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar  # numpy scalars (e.g. labels stored as np.int64)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing that could execute code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _get(d: dict, key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one batch pickle (its bytes) into ``(images uint8 (N, 3072), labels int64 (N,))``.

    ``where`` names the file in error messages.  Raises :class:`DataError` for a pickle that is
    corrupt, references anything but numpy array reconstruction, or is not a CIFAR-10 batch.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as err:
        raise DataError(
            f"{where}: refused to unpickle: the pickle references {err}, which is not allowed "
            "(only numpy array reconstruction is; the file is not a genuine CIFAR-10 batch)"
        ) from None
    except Exception as err:  # pickle can raise almost anything on garbage input
        raise DataError(f"{where}: not a valid pickle ({_one_line(err)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch: the pickle holds a {type(obj).__name__}, not a dict")
    images, labels = _get(obj, "data"), _get(obj, "labels")
    if images is None or labels is None:
        raise DataError(f"{where}: not a CIFAR-10 batch: 'data' or 'labels' is missing")
    if not isinstance(images, np.ndarray):
        raise DataError(f"{where}: 'data' is a {type(images).__name__}, not a numpy array")
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != _ROW or images.shape[0] < 1:
        raise DataError(
            f"{where}: 'data' must be a uint8 array of shape (N, {_ROW}) with N >= 1, "
            f"got {images.dtype} of shape {images.shape}"
        )
    n = images.shape[0]
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise DataError(f"{where}: 'labels' is a {type(labels).__name__}, not a list")
    try:
        labels = np.asarray(labels)
    except Exception as err:
        raise DataError(f"{where}: 'labels' is not a list of integers ({_one_line(err)})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: 'labels' must be a list of integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != n:
        raise DataError(f"{where}: {n} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= _NUM_CLASSES))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} of image {bad[0]} is not in 0..{_NUM_CLASSES - 1}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


# ----------------------------------------------------------------------------- reading files


def _locate(path: Path) -> tuple[str, Path]:
    """``("tar", archive)`` or ``("dir", batches directory)`` for a user-given path."""
    if path.is_file():
        return "tar", path
    if path.is_dir():
        if (path / TEST_BATCH).exists() or (path / TRAIN_BATCHES[0]).exists():
            return "dir", path
        if (path / DIR_NAME).is_dir():  # an extracted directory is preferred: no decompression
            return "dir", path / DIR_NAME
        if (path / ARCHIVE_NAME).is_file():
            return "tar", path / ARCHIVE_NAME
        raise DataError(
            f"{path}: no CIFAR-10 data here: expected {ARCHIVE_NAME}, a {DIR_NAME}/ directory, "
            f"or the batch files {TRAIN_BATCHES[0]} and {TEST_BATCH}"
        )
    if path.exists():
        raise DataError(f"{path}: neither a file nor a directory")
    raise DataError(f"{path}: not found")


def _read_dir(directory: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        p = directory / name
        if not p.exists():
            continue
        if not p.is_file():
            raise DataError(f"{p}: not a regular file")
        try:
            size = p.stat().st_size
            if size > _MAX_BATCH_BYTES:
                raise DataError(f"{p}: {size} bytes, far too large for a CIFAR-10 batch")
            found[name] = p.read_bytes()
        except OSError as err:
            raise DataError(f"{p}: cannot read: {err.strerror or err}") from None
    return found


def _member_name(name: str) -> str:
    name = posixpath.normpath(name)
    return name[2:] if name.startswith("./") else name


def _read_tar(archive: Path) -> dict[str, bytes]:
    """The batch members of ``archive``, streamed (no seeking, nothing written to disk).  The whole
    archive is read, so a truncated or corrupt file is detected even after the batches."""
    wanted = {f"{DIR_NAME}/{name}": name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = wanted.get(_member_name(member.name))
                if name is None:
                    continue
                if not member.isfile():
                    raise DataError(f"{archive}: member {member.name} is not a regular file")
                if member.size > _MAX_BATCH_BYTES:
                    raise DataError(
                        f"{archive}: member {member.name} has {member.size} bytes, far too large for a CIFAR-10 batch"
                    )
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} is truncated")
                found[name] = data
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{archive}: not found") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as err:
        raise DataError(f"{archive}: not a readable tar archive, or truncated/corrupt ({_one_line(err)})") from None
    return found


# ----------------------------------------------------------------------------- subsets


def balanced_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded class-balanced sample of ``n`` out of ``labels``.

    Every class gets ``min(available, level)`` examples, ``level`` as large as ``n`` allows; the
    remaining ``< #classes`` examples go one each to classes (with examples to spare) chosen by
    the seed.  Within a class the examples are a seeded random choice.  The result is sorted, so
    the sample keeps the data set's order.  Deterministic given ``(labels, n, seed)``.
    """
    labels = np.asarray(labels)
    n = operator.index(n)
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot choose {n} of {len(labels)} examples")
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    available = np.array([len(m) for m in members], dtype=np.int64)
    lo, hi = 0, int(available.max(initial=0))
    while lo < hi:  # largest level with sum(min(available, level)) <= n
        mid = (lo + hi + 1) // 2
        if np.minimum(available, mid).sum() <= n:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(available, lo)
    rng = np.random.default_rng(seed)
    extra = n - int(quota.sum())
    spare = np.flatnonzero(available > quota)
    quota[rng.permutation(spare)[:extra]] += 1
    chosen = [rng.permutation(m)[:q] for m, q in zip(members, quota)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- public API


def download_cifar10(directory: str | os.PathLike) -> Path:
    """Download the official ``cifar-10-python.tar.gz`` into ``directory`` (kept if its md5
    already matches) and return its path; :func:`load_cifar10` reads it as it is."""
    return download(CIFAR10_URL, Path(directory) / ARCHIVE_NAME, CIFAR10_MD5)


def verify_archive(path: str | os.PathLike) -> None:
    """Raise :class:`DataError` unless ``path`` is the official archive (by md5)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    verify_md5(path, CIFAR10_MD5)


def load_cifar10(
    path: str | os.PathLike,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    subset: str = "first",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """CIFAR-10 as centred image tensors ``(N, 3, 32, 32)`` and int64 labels.

    ``path`` is the tarball, the ``cifar-10-batches-py`` directory, or a directory holding either
    (the extracted directory is used when both are there).  ``n_train`` training images (all when
    ``None``) are the first ones (``subset="first"``) or a seeded class-balanced sample kept in the
    original order (``subset="balanced"``, see :func:`balanced_indices`); the test set is the first
    ``n_test`` images of ``test_batch``.  Centring uses the mean of the chosen training images.
    """
    n_train = positive_int("n_train", n_train, optional=True)
    n_test = positive_int("n_test", n_test, optional=True)
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(map(repr, SUBSETS))}, got {subset!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")

    kind, location = _locate(Path(path))
    files = _read_tar(location) if kind == "tar" else _read_dir(location)

    def where(name: str) -> str:
        return f"{location}:{DIR_NAME}/{name}" if kind == "tar" else str(location / name)

    train_names: list[str] = []
    for name in TRAIN_BATCHES:
        if name not in files:
            break
        train_names.append(name)
    missing = [name for name in (TRAIN_BATCHES[0], TEST_BATCH) if name not in files]
    if missing:
        inside = f"{DIR_NAME}/" if kind == "tar" else ""
        raise DataError(f"{location}: missing {' and '.join(inside + m for m in missing)}")

    batches = [read_batch(files[name], where(name)) for name in train_names]
    train_x = np.concatenate([b[0] for b in batches])
    train_y = np.concatenate([b[1] for b in batches])
    test_x, test_y = read_batch(files[TEST_BATCH], where(TEST_BATCH))
    del files, batches

    total_train, total_test = len(train_y), len(test_y)
    if n_train is not None and n_train > total_train:
        raise DataError(
            f"{location}: n_train={n_train} but only {total_train} training images ({', '.join(train_names)})"
        )
    if n_test is not None and n_test > total_test:
        raise DataError(f"{location}: n_test={n_test} but only {total_test} test images ({TEST_BATCH})")
    n_train = total_train if n_train is None else n_train
    n_test = total_test if n_test is None else n_test

    if subset == "balanced":
        idx = balanced_indices(train_y, n_train, seed)
        train_x, train_y = train_x[idx], train_y[idx]
        how = f"class-balanced sample of {n_train} (seed {seed})"
    else:
        train_x, train_y = train_x[:n_train], train_y[:n_train]
        how = f"first {n_train}"
    test_x, test_y = test_x[:n_test], test_y[:n_test]

    x_train, x_test = center_images(train_x.reshape(-1, *IMAGE_SHAPE), test_x.reshape(-1, *IMAGE_SHAPE), dtype=dtype)
    if kind == "tar":
        md5 = md5sum(location)
        official = "official" if md5 == CIFAR10_MD5 else "not the official archive"
        origin = f"{location} (md5 {md5}, {official})"
    else:
        origin = f"{location} (extracted batches)"
    source = (
        f"CIFAR-10 {origin}; train: {how} of {total_train} in {'+'.join(train_names)}; "
        f"test: first {n_test} of {total_test} in {TEST_BATCH}; images / 256 minus the per-pixel training mean"
    )
    return Split(
        x_train=x_train,
        y_train=int64_tensor(train_y),
        x_test=x_test,
        y_test=int64_tensor(test_y),
        source=source,
    )
