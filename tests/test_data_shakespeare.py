import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samedge.data import DataError, Split
from samedge.data.download import verify_md5
from samedge.data.shakespeare import (
    SHAKESPEARE_MD5,
    MinibatchSampler,
    Vocabulary,
    load_shakespeare,
    load_text,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def real_path() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"tiny-Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture(scope="module")
def real_text(real_path) -> str:
    return load_text(real_path)


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    p.write_bytes(data)
    return p


def _ordered(text: str, vocab: Vocabulary, window: int) -> np.ndarray:
    ids = vocab.encode(text)
    k = len(ids) // window
    return ids[: k * window].reshape(k, window)


# ----------------------------------------------------------------------------- real file


def test_real_file_checksum_size_vocab(real_path, real_text):
    verify_md5(real_path, SHAKESPEARE_MD5)
    assert len(real_text) == 1_115_394
    vocab = Vocabulary.from_text(real_text)
    assert vocab.size == 65
    assert vocab.chars == tuple(sorted(set(real_text)))
    assert vocab.decode(vocab.encode(real_text[:5000])) == real_text[:5000]


@pytest.mark.parametrize("seq_len,test_fraction", [(64, 0.1), (100, 0.25)])
def test_real_windows(real_path, real_text, seq_len, test_fraction):
    split, vocab = load_shakespeare(real_path, seq_len=seq_len, test_fraction=test_fraction, seed=3)
    assert isinstance(split, Split)
    n = len(real_text)
    window = seq_len + 1
    n_test = round(n * test_fraction)
    n_train = n - n_test
    for x, y, n_chars in [(split.x_train, split.y_train, n_train), (split.x_test, split.y_test, n_test)]:
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (n_chars // window, seq_len)  # non-overlapping, tail dropped
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(x.max()) < vocab.size
    assert "official" in split.source and "not the official" not in split.source

    # test windows: in order, contiguous, from the last test_fraction of the text
    test_text = real_text[n_train:]
    for i in [0, 1, split.n_test // 2, split.n_test - 1]:
        w = torch.cat([split.x_test[i], split.y_test[i, -1:]])
        assert vocab.decode(w) == test_text[i * window : (i + 1) * window]
    whole = torch.cat([split.x_test, split.y_test[:, -1:]], dim=1).reshape(-1)
    assert vocab.decode(whole) == test_text[: split.n_test * window]

    # training windows: verbatim pieces of the training text, a seeded permutation of the ordered windows
    train_text = real_text[:n_train]
    for i in [0, 7, split.n_train - 1]:
        w = torch.cat([split.x_train[i], split.y_train[i, -1:]])
        assert vocab.decode(w) in train_text
    ordered = _ordered(train_text, vocab, window)
    perm = np.random.default_rng(3).permutation(len(ordered))
    assert np.array_equal(split.x_train.numpy(), ordered[perm, :-1])
    assert np.array_equal(split.y_train.numpy(), ordered[perm, 1:])
    assert not np.array_equal(perm, np.arange(len(perm)))


def test_real_shuffle_is_deterministic_by_seed(real_path):
    a, _ = load_shakespeare(real_path, seq_len=32, seed=0)
    b, _ = load_shakespeare(real_path, seq_len=32, seed=0)
    c, _ = load_shakespeare(real_path, seq_len=32, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    # the seed changes only the order of the training windows, never the test split
    assert torch.equal(a.x_test, c.x_test)
    assert sorted(map(tuple, a.x_train.tolist())) == sorted(map(tuple, c.x_train.tolist()))


def test_real_ascii_vocab(real_path, real_text):
    split, vocab = load_shakespeare(real_path, seq_len=64, vocab="ascii")
    assert vocab.size == 128 and vocab.kind == "ascii"
    row = split.x_test[0]
    assert vocab.decode(row) == "".join(chr(c) for c in row.tolist())


# ----------------------------------------------------------------------------- synthetic files


def test_small_file_exact_layout(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(100))  # 100 characters
    p = _write(tmp_path, "t.txt", text)
    split, vocab = load_shakespeare(p, seq_len=4, test_fraction=0.2, seed=0)
    assert vocab.chars == tuple("abcdefghijklmnopqrstuvwxyz")
    # 80 training characters -> 16 windows of 5; 20 test characters -> 4 windows
    assert split.n_train == 16 and split.n_test == 4
    assert [vocab.decode(torch.cat([x, y[-1:]])) for x, y in zip(split.x_test, split.y_test)] == [
        text[80:85],
        text[85:90],
        text[90:95],
        text[95:100],
    ]
    got = {vocab.decode(torch.cat([x, y[-1:]])) for x, y in zip(split.x_train, split.y_train)}
    assert got == {text[i : i + 5] for i in range(0, 80, 5)}
    assert "not the official" in split.source


def test_remainder_dropped(tmp_path):
    p = _write(tmp_path, "t.txt", "x" * 93 + "y" * 7)  # 90 train (10 windows of 9 = 90), 10 test -> 1 window
    split, vocab = load_shakespeare(p, seq_len=8, test_fraction=0.1)
    assert split.n_train == 10 and split.n_test == 1
    assert vocab.decode(split.x_test[0]) == "xxxyyyyy"
    assert vocab.decode(split.y_test[0]) == "xxyyyyyy"


def test_text_vocab_spans_both_splits(tmp_path):
    # a character that occurs only in the test part is still in the text vocabulary
    p = _write(tmp_path, "t.txt", "a" * 90 + "Z" * 10)
    split, vocab = load_shakespeare(p, seq_len=4, test_fraction=0.1)
    assert vocab.chars == ("Z", "a")
    assert int(split.x_test.min()) == 0


def test_newlines_kept_verbatim(tmp_path):
    text = "ab\r\ncd\n" * 30
    p = _write(tmp_path, "t.txt", text)
    assert load_text(p) == text
    split, vocab = load_shakespeare(p, seq_len=6, test_fraction=0.5)
    assert "\r" in vocab


def test_utf8_text_vocab_and_ascii_rejection(tmp_path):
    text = "abc" * 20 + "é" + "abc" * 20
    p = _write(tmp_path, "t.txt", text)
    split, vocab = load_shakespeare(p, seq_len=4, test_fraction=0.5)
    assert "é" in vocab and vocab.size == 4
    with pytest.raises(DataError) as err:
        load_shakespeare(p, seq_len=4, test_fraction=0.5, vocab="ascii")
    msg = str(err.value)
    assert "'é'" in msg and "position 60" in msg and str(p) in msg


def test_empty_file(tmp_path):
    p = _write(tmp_path, "empty.txt", b"")
    with pytest.raises(DataError, match="empty") as err:
        load_shakespeare(p)
    assert str(p) in str(err.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="not found") as err:
        load_text(p)
    assert str(p) in str(err.value)
    with pytest.raises(DataError, match="cannot read"):
        load_text(tmp_path)  # a directory


def test_binary_file_with_nul(tmp_path):
    p = _write(tmp_path, "bin.txt", b"hello world\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="binary") as err:
        load_shakespeare(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_binary_file_of_control_characters(tmp_path):
    p = _write(tmp_path, "ctl.txt", bytes([1, 2, 3, 4, 65, 66, 27, 0x7F]) * 50)
    with pytest.raises(DataError, match="binary"):
        load_text(p)
    # a few control characters in ordinary text are fine
    ok = _write(tmp_path, "ok.txt", "text with an escape \x1b here\n" * 10)
    assert load_text(ok).count("\x1b") == 10


def test_invalid_utf8(tmp_path):
    p = _write(tmp_path, "latin1.txt", "caf\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="UTF-8") as err:
        load_shakespeare(p)
    assert str(p) in str(err.value) and "offset 3" in str(err.value)


def test_too_short(tmp_path):
    p = _write(tmp_path, "short.txt", "a" * 100)
    with pytest.raises(DataError, match="too short") as err:
        load_shakespeare(p, seq_len=64, test_fraction=0.1)
    msg = str(err.value)
    # 65-character windows; round(646 * 0.1) = 65 test characters and 581 training characters
    assert str(p) in msg and "at least 646 characters" in msg and "\n" not in msg
    # the stated minimum is exact
    p646 = _write(tmp_path, "ok.txt", "a" * 646)
    split, _ = load_shakespeare(p646, seq_len=64, test_fraction=0.1)
    assert split.n_train == 8 and split.n_test == 1
    p645 = _write(tmp_path, "short2.txt", "a" * 645)
    with pytest.raises(DataError, match="at least 646"):
        load_shakespeare(p645, seq_len=64, test_fraction=0.1)


@pytest.mark.parametrize(
    "kwargs", [{"seq_len": 0}, {"test_fraction": 0.0}, {"test_fraction": 1.0}, {"vocab": "bytes"}, {"seed": -1}]
)
def test_bad_arguments(tmp_path, kwargs):
    p = _write(tmp_path, "t.txt", "abcdefgh" * 100)
    with pytest.raises(ValueError):
        load_shakespeare(p, **kwargs)


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_roundtrip_and_saving():
    vocab = Vocabulary.from_text("hello, world\n")
    assert vocab.chars == tuple(sorted(set("hello, world\n")))
    ids = vocab.encode("world, hello")
    assert ids.dtype == np.int64
    assert vocab.decode(ids) == "world, hello"
    assert vocab.decode(torch.as_tensor(ids)) == "world, hello"
    assert [vocab.chars[i] for i in ids] == list("world, hello")
    saved = json.loads(json.dumps(vocab.to_dict()))
    restored = Vocabulary.from_dict(saved)
    assert restored == vocab and restored.kind == "text"
    assert np.array_equal(restored.encode("low"), vocab.encode("low"))
    with pytest.raises(DataError, match="'z'.*position 2"):
        vocab.encode("hoz")
    with pytest.raises(ValueError):
        vocab.decode([0, vocab.size])
    with pytest.raises(DataError):
        Vocabulary.from_dict({"chars": "aa"})
    with pytest.raises(DataError):
        Vocabulary.from_dict({})


def test_ascii_vocabulary():
    vocab = Vocabulary.ascii()
    assert vocab.size == 128
    assert vocab.encode("Az\n").tolist() == [65, 122, 10]
    assert vocab.decode([72, 105]) == "Hi"
    with pytest.raises(DataError) as err:
        vocab.encode("plain ascii then ü and more ñ")
    assert "'ü'" in str(err.value) and "position 17" in str(err.value)


def test_loader_accepts_saved_vocabulary(tmp_path):
    p = _write(tmp_path, "t.txt", "abcab" * 40)
    _, vocab = load_shakespeare(p, seq_len=4, test_fraction=0.2)
    wider = Vocabulary.from_dict({"kind": "text", "chars": "abcd"})
    split, used = load_shakespeare(p, seq_len=4, test_fraction=0.2, vocab=wider)
    assert used is wider and int(split.x_train.max()) <= 2
    with pytest.raises(DataError, match="'c'"):
        load_shakespeare(p, seq_len=4, test_fraction=0.2, vocab=Vocabulary("ab"))


# ----------------------------------------------------------------------------- minibatches


def test_sampler_is_a_pure_function_of_seed_and_step():
    a = MinibatchSampler(100, 7, seed=5)
    b = MinibatchSampler(100, 7, seed=5)
    c = MinibatchSampler(100, 7, seed=6)
    steps = [0, 1, 13, 14, 15, 500, 3]
    first = [a.batch_indices(s) for s in steps]
    for s, idx in zip(reversed(steps), reversed(first)):  # any order, fresh object: same batches
        assert torch.equal(b.batch_indices(s), idx)
        assert idx.dtype == torch.int64 and idx.shape == (7,)
    assert not all(torch.equal(c.batch_indices(s), idx) for s, idx in zip(steps, first))


def test_sampler_epochs_cover_every_index():
    n, bs = 50, 10
    s = MinibatchSampler(n, bs, seed=0)
    for epoch in range(3):
        idx = torch.cat([s.batch_indices(epoch * 5 + k) for k in range(5)])
        assert sorted(idx.tolist()) == list(range(n))
        assert s.epoch(epoch * 5) == epoch
        assert np.array_equal(idx.numpy(), np.random.default_rng([0, epoch]).permutation(n))
    assert not torch.equal(
        torch.cat([s.batch_indices(k) for k in range(5)]), torch.cat([s.batch_indices(5 + k) for k in range(5)])
    )


def test_sampler_wraps_across_epochs():
    n, bs = 10, 4
    s = MinibatchSampler(n, bs, seed=2)
    stream = np.concatenate([np.random.default_rng([2, e]).permutation(n) for e in range(4)])
    got = torch.cat([s.batch_indices(k) for k in range(10)]).numpy()
    assert np.array_equal(got, stream[:40])
    assert s.epoch(2) == 0 and s.epoch(3) == 1  # step 2 covers stream[8:12]: end of epoch 0, start of epoch 1
    assert s.steps_per_epoch == 2.5
    # a batch inside one epoch has distinct indices (one that straddles two epochs may repeat one),
    # and every index is used exactly 4 times in 10 batches
    assert all(
        len(set(s.batch_indices(k).tolist())) == bs for k in range(10) if (k * bs) // n == (k * bs + bs - 1) // n
    )
    assert np.bincount(got, minlength=n).tolist() == [4] * n


def test_sampler_full_batch_and_validation():
    s = MinibatchSampler(6, 6, seed=0)
    assert sorted(s.batch_indices(11).tolist()) == list(range(6))
    for bad in [(6, 0), (6, 7), (0, 1)]:
        with pytest.raises(ValueError):
            MinibatchSampler(*bad, seed=0)
    with pytest.raises(ValueError):
        MinibatchSampler(6, 2, seed=-1)
    with pytest.raises(ValueError):
        s.batch_indices(-1)
