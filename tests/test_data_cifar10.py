import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from samedge.data import DataError, Split
from samedge.data import cifar10 as cifar10_module
from samedge.data.cifar10 import (
    ARCHIVE_NAME,
    CIFAR10_MD5,
    DIR_NAME,
    TEST_BATCH,
    balanced_indices,
    download_cifar10,
    load_cifar10,
    read_batch,
    verify_archive,
)
from samedge.data.download import download, md5sum

CIFAR_1K = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-1k"
TRAIN_COUNTS = [102, 112, 99, 92, 99, 85, 107, 102, 99, 103]
TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.fixture(scope="module")
def real_root() -> Path:
    if not (CIFAR_1K / ARCHIVE_NAME).is_file() or not (CIFAR_1K / DIR_NAME).is_dir():
        pytest.skip(f"CIFAR-10 excerpt not found at {CIFAR_1K}")
    return CIFAR_1K


@pytest.fixture(scope="module")
def raw(real_root):
    """The excerpt's batches decoded without any preprocessing."""
    train = read_batch((real_root / DIR_NAME / "data_batch_1").read_bytes(), "data_batch_1")
    test = read_batch((real_root / DIR_NAME / TEST_BATCH).read_bytes(), TEST_BATCH)
    return train, test


@pytest.fixture(scope="module")
def from_dir(real_root) -> Split:
    return load_cifar10(real_root / DIR_NAME, dtype=torch.float64)


@pytest.fixture(scope="module")
def from_tar(real_root) -> Split:
    return load_cifar10(real_root / ARCHIVE_NAME, dtype=torch.float64)


def _centred(train_raw: np.ndarray, test_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    train = train_raw.reshape(-1, 3, 32, 32) / 256.0
    test = test_raw.reshape(-1, 3, 32, 32) / 256.0
    mean = train.mean(axis=0, keepdims=True)
    return train - mean, test - mean


def _batch_pickle(images: np.ndarray, labels, protocol: int = 2) -> bytes:
    return pickle.dumps({b"batch_label": b"synthetic", b"labels": list(labels), b"data": images}, protocol=protocol)


def _synthetic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n)


def _dir_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    d = tmp_path / DIR_NAME
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _tar_with(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{DIR_NAME}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- the real excerpt


def test_tarball_and_directory_identical(real_root, from_dir, from_tar):
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(from_dir, name), getattr(from_tar, name)), name
    # a directory holding both the archive and the extracted batches works too
    via_root = load_cifar10(real_root, dtype=torch.float64)
    assert torch.equal(via_root.x_train, from_dir.x_train)
    assert str(real_root / ARCHIVE_NAME) in from_tar.source and md5sum(real_root / ARCHIVE_NAME) in from_tar.source
    assert "not the official" in from_tar.source
    assert str(real_root / DIR_NAME) in from_dir.source


def test_shapes_dtypes_and_class_counts(real_root, from_dir):
    split = load_cifar10(real_root / DIR_NAME)
    assert split.x_train.shape == (1000, 3, 32, 32) and split.x_test.shape == (1000, 3, 32, 32)
    assert split.x_train.dtype == torch.float32 and split.x_test.dtype == torch.float32
    assert split.y_train.dtype == torch.int64 and split.y_test.dtype == torch.int64
    assert split.n_train == 1000 and split.n_test == 1000
    assert np.bincount(split.y_train.numpy(), minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(split.y_test.numpy(), minlength=10).tolist() == TEST_COUNTS
    assert torch.allclose(split.x_train.double(), from_dir.x_train, atol=1e-6)


def test_centering(from_dir, raw):
    (train_raw, train_y), (test_raw, test_y) = raw
    x_train, x_test = _centred(train_raw, test_raw)
    assert torch.equal(from_dir.x_train, torch.from_numpy(x_train))
    assert torch.equal(from_dir.x_test, torch.from_numpy(x_test))
    assert from_dir.x_train.mean(dim=0).abs().max() < 1e-12
    assert from_dir.x_test.mean(dim=0).abs().max() > 1e-3  # the test set is centred with the training mean
    assert torch.equal(from_dir.y_train, torch.from_numpy(train_y))
    assert torch.equal(from_dir.y_test, torch.from_numpy(test_y))


def test_first_n(real_root, raw):
    (train_raw, train_y), (test_raw, test_y) = raw
    split = load_cifar10(real_root / DIR_NAME, n_train=100, n_test=50, dtype=torch.float64)
    x_train, x_test = _centred(train_raw[:100], test_raw[:50])
    assert torch.equal(split.x_train, torch.from_numpy(x_train))  # mean over the subset only
    assert torch.equal(split.x_test, torch.from_numpy(x_test))
    assert split.y_train.tolist() == train_y[:100].tolist()
    assert split.y_test.tolist() == test_y[:50].tolist()
    assert "first 100 of 1000" in split.source and "first 50 of 1000" in split.source


def test_balanced_subset(real_root, raw):
    (train_raw, train_y), _ = raw
    a = load_cifar10(real_root / DIR_NAME, n_train=100, subset="balanced", seed=0, dtype=torch.float64)
    b = load_cifar10(real_root / DIR_NAME, n_train=100, subset="balanced", seed=0, dtype=torch.float64)
    c = load_cifar10(real_root / DIR_NAME, n_train=100, subset="balanced", seed=1, dtype=torch.float64)
    assert np.bincount(a.y_train.numpy(), minlength=10).tolist() == [10] * 10
    assert np.bincount(c.y_train.numpy(), minlength=10).tolist() == [10] * 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    idx = balanced_indices(train_y, 100, seed=0)
    assert np.all(np.diff(idx) > 0)  # original order
    x_train, _ = _centred(train_raw[idx], train_raw[:1])
    assert torch.equal(a.x_train, torch.from_numpy(x_train))
    assert a.y_train.tolist() == train_y[idx].tolist()
    assert "class-balanced" in a.source and "seed 0" in a.source
    assert a.n_test == 1000


def test_balanced_indices_uneven():
    labels = np.array([0] * 3 + [1] * 50 + [2] * 50 + [3] * 1)
    for seed in range(5):
        idx = balanced_indices(labels, 25, seed)
        counts = np.bincount(labels[idx], minlength=4)
        assert counts.sum() == 25 and len(set(idx.tolist())) == 25
        assert counts[0] == 3 and counts[3] == 1 and sorted(counts[1:3].tolist()) == [10, 11]
    assert len({tuple(balanced_indices(labels, 25, s)) for s in range(10)}) > 1
    assert np.array_equal(balanced_indices(labels, len(labels), 3), np.arange(len(labels)))


def test_n_too_large(real_root):
    with pytest.raises(DataError, match="n_train=1001 but only 1000"):
        load_cifar10(real_root / DIR_NAME, n_train=1001)
    with pytest.raises(DataError, match="n_train=1001"):
        load_cifar10(real_root / ARCHIVE_NAME, n_train=1001, subset="balanced")
    with pytest.raises(DataError, match="n_test=5000 but only 1000"):
        load_cifar10(real_root / DIR_NAME, n_test=5000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_test": -1},
        {"n_train": 2.5},
        {"n_train": True},
        {"subset": "random"},
        {"seed": -1},
        {"dtype": torch.int64},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError) as err:
        load_cifar10(tmp_path, **kwargs)
    assert not isinstance(err.value, DataError)  # rejected before looking for files


def test_truncated_tarball(real_root, tmp_path):
    data = (real_root / ARCHIVE_NAME).read_bytes()
    bad = tmp_path / ARCHIVE_NAME
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_cifar10(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    bad.write_bytes(data[:100])
    with pytest.raises(DataError, match="truncated"):
        load_cifar10(tmp_path)  # a directory holding the archive


def test_not_a_tarball(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_cifar10(bad)


def test_corrupt_pickle_in_directory(real_root, tmp_path):
    d = _dir_with(
        tmp_path, {"data_batch_1": os.urandom(5000), TEST_BATCH: (real_root / DIR_NAME / TEST_BATCH).read_bytes()}
    )
    with pytest.raises(DataError) as err:
        load_cifar10(d)
    assert str(d / "data_batch_1") in str(err.value) and "\n" not in str(err.value)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_not_executed(real_root, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    d = _dir_with(tmp_path, {"data_batch_1": evil, TEST_BATCH: (real_root / DIR_NAME / TEST_BATCH).read_bytes()})
    with pytest.raises(DataError, match="not allowed") as err:
        load_cifar10(d)
    assert "system" in str(err.value) and str(d / "data_batch_1") in str(err.value)
    tar = _tar_with(tmp_path / "evil.tar.gz", {"data_batch_1": evil, TEST_BATCH: evil})
    with pytest.raises(DataError, match="not allowed"):
        load_cifar10(tar)
    for code in (
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"cos\nsystem\n(S'true'\ntR.",
        b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
    ):
        with pytest.raises(DataError):
            read_batch(code, "crafted")
    assert not marker.exists()


def test_batch_structure_is_validated():
    rng = np.random.default_rng(0)
    images, labels = _synthetic(rng, 4)
    ok_images, ok_labels = read_batch(_batch_pickle(images, labels), "ok")
    assert np.array_equal(ok_images, images) and ok_labels.tolist() == labels.tolist()
    bad = {
        "not a dict": pickle.dumps([1, 2, 3], protocol=2),
        "missing": pickle.dumps({b"data": images}, protocol=2),
        "shape": _batch_pickle(images[:, :100], labels),
        "dtype": _batch_pickle(images.astype(np.float32), labels),
        "ndim": _batch_pickle(images.reshape(4, 3, 32, 32), labels),
        "count": _batch_pickle(images, labels[:3]),
        "range": _batch_pickle(images, [0, 1, 2, 10]),
        "negative": _batch_pickle(images, [0, 1, -1, 2]),
        "float labels": _batch_pickle(images, [0.0, 1.0, 2.0, 3.0]),
        "empty": b"",
    }
    for name, data in bad.items():
        with pytest.raises(DataError, match=f"^{name}: "):
            read_batch(data, name)


def test_python2_style_pickle_names():
    """The official batches were written by Python 2 with numpy.core.multiarray._reconstruct."""
    rng = np.random.default_rng(1)
    images, labels = _synthetic(rng, 3)
    data = _batch_pickle(images, labels)
    assert b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    got, got_labels = read_batch(old, "old")
    assert np.array_equal(got, images) and got_labels.tolist() == labels.tolist()
    got, _ = read_batch(pickle.dumps({b"data": images, b"labels": list(labels)}, protocol=4), "p4")
    assert np.array_equal(got, images)


def test_synthetic_batches_layout_and_order(tmp_path):
    """Train = data_batch_1, 2, ... up to the first missing one; rows are R, G, B planes."""
    rng = np.random.default_rng(2)
    b1, b2, b4, test = (_synthetic(rng, n) for n in (5, 4, 3, 6))
    files = {
        "data_batch_1": _batch_pickle(*b1),
        "data_batch_2": _batch_pickle(*b2),
        "data_batch_4": _batch_pickle(*b4),  # skipped: data_batch_3 is missing
        TEST_BATCH: _batch_pickle(*test),
    }
    split_dir = load_cifar10(_dir_with(tmp_path, files), dtype=torch.float64)
    split_tar = load_cifar10(_tar_with(tmp_path / "c.tar.gz", files), dtype=torch.float64)
    for split in (split_dir, split_tar):
        assert split.n_train == 9 and split.n_test == 6
        assert split.y_train.tolist() == list(b1[1]) + list(b2[1])
        assert "data_batch_1+data_batch_2" in split.source
        raw = np.concatenate([b1[0], b2[0]]).astype(np.float64) / 256
        diff = (split.x_train[1] - split.x_train[0]).numpy()
        for c in range(3):
            for i, j in ((0, 0), (0, 31), (5, 7), (31, 0), (31, 31)):
                k = c * 1024 + i * 32 + j
                assert diff[c, i, j] == pytest.approx(raw[1, k] - raw[0, k], abs=1e-12)
    assert torch.equal(split_dir.x_train, split_tar.x_train) and torch.equal(split_dir.x_test, split_tar.x_test)


def test_missing_files(real_root, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(DataError, match="no CIFAR-10 data"):
        load_cifar10(tmp_path)
    d = _dir_with(tmp_path, {"data_batch_1": (real_root / DIR_NAME / "data_batch_1").read_bytes()})
    with pytest.raises(DataError, match="missing test_batch"):
        load_cifar10(d)
    tar = _tar_with(tmp_path / "t.tar.gz", {TEST_BATCH: (real_root / DIR_NAME / TEST_BATCH).read_bytes()})
    with pytest.raises(DataError, match=f"missing {DIR_NAME}/data_batch_1"):
        load_cifar10(tar)


# ----------------------------------------------------------------------------- checksums and download


def test_verify_archive(real_root, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=CIFAR10_MD5):
        verify_archive(real_root / ARCHIVE_NAME)
    with pytest.raises(DataError, match="not found"):
        verify_archive(tmp_path / ARCHIVE_NAME)
    monkeypatch.setattr(cifar10_module, "CIFAR10_MD5", md5sum(real_root / ARCHIVE_NAME))
    verify_archive(real_root / ARCHIVE_NAME)


def test_download_from_file_url(real_root, tmp_path, monkeypatch, from_tar):
    src = real_root / ARCHIVE_NAME
    md5 = md5sum(src)
    dest = download(src.as_uri(), tmp_path / "a" / ARCHIVE_NAME, md5)
    assert dest.read_bytes() == src.read_bytes()
    assert torch.equal(load_cifar10(dest, dtype=torch.float64).x_train, from_tar.x_train)

    monkeypatch.setattr(cifar10_module, "CIFAR10_URL", src.as_uri())
    with pytest.raises(DataError, match="does not match the official"):
        download_cifar10(tmp_path / "b")  # the excerpt is not the official archive
    assert not (tmp_path / "b").exists()  # nothing left behind, not even the folder the call made
    monkeypatch.setattr(cifar10_module, "CIFAR10_MD5", md5)
    got = download_cifar10(tmp_path / "b")
    assert got == tmp_path / "b" / ARCHIVE_NAME and md5sum(got) == md5
    assert load_cifar10(tmp_path / "b").n_train == 1000


def test_directory_copy_of_excerpt(real_root, tmp_path, from_dir):
    """A copied ``cifar-10-batches-py`` (inside a parent directory) loads the same."""
    shutil.copytree(real_root / DIR_NAME, tmp_path / DIR_NAME)
    split = load_cifar10(tmp_path, dtype=torch.float64)
    assert torch.equal(split.x_test, from_dir.x_test) and torch.equal(split.y_train, from_dir.y_train)
