"""Tiny Shakespeare, character level: the paper's language-model experiment.

The text is Karpathy's ``char-rnn`` file (1,115,394 characters, 65 distinct).  Preprocessing:

* every character becomes an integer id through a :class:`Vocabulary` (the text's sorted distinct
  characters, or all of ASCII);
* the **last** ``round(len(text) * test_fraction)`` characters (Python's ``round``) are held out
  as the test split, the rest is the training split;
* each split is cut, from its start, into non-overlapping windows of ``seq_len + 1`` characters
  (the remainder at the end of a split is dropped); inputs are ``window[:-1]`` and targets
  ``window[1:]``, int64 tensors of shape ``(N, seq_len)``;
* training windows are shuffled with ``numpy.random.default_rng(seed)``; test windows stay in order.

:class:`~samedge.data.sampling.MinibatchSampler` (re-exported here) draws minibatches of windows
as a pure function of the step number, so a run resumed at step ``s`` sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from samedge.data import DataError, Split, int64_tensor
from samedge.data.download import download, md5sum
from samedge.data.sampling import MinibatchSampler  # re-exported

__all__ = [
    "VOCABS",
    "SHAKESPEARE_URL",
    "SHAKESPEARE_MD5",
    "SHAKESPEARE_FILENAME",
    "download_shakespeare",
    "Vocabulary",
    "load_text",
    "load_shakespeare",
    "MinibatchSampler",
]

#: the named vocabularies: the file's distinct characters, or all 128 ASCII codes (the paper code)
VOCABS = ("text", "ascii")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_FILENAME = "input.txt"

# A text file may contain these control characters; others (and a NUL anywhere) mark it as binary.
_TEXT_CONTROLS = "\t\n\v\f\r"
_BAD_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_FRACTION = 0.3


def download_shakespeare(directory: str | os.PathLike) -> Path:
    """Download the official ``input.txt`` into ``directory`` (kept if its md5 already matches)."""
    return download(SHAKESPEARE_URL, Path(directory) / SHAKESPEARE_FILENAME, SHAKESPEARE_MD5)


class Vocabulary:
    """A bijection between characters and the ids ``0 .. size - 1`` (id = position in ``chars``).

    Build one with :meth:`from_text` (the text's sorted distinct characters, the char-rnn
    convention) or :meth:`ascii` (ids are the code points 0..127); save it with :meth:`to_dict`
    and restore it with :meth:`from_dict`.
    """

    def __init__(self, chars: Iterable[str], kind: str = "custom"):
        chars = tuple(chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"vocabulary entry {i} is {c!r}, not a single character")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary characters must be distinct")
        self.chars: tuple[str, ...] = chars
        self.kind = kind
        codes = np.fromiter((ord(c) for c in chars), dtype=np.int64, count=len(chars))
        self._order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[self._order]
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """The sorted distinct characters of ``text``."""
        if not text:
            raise DataError("cannot build a vocabulary from an empty text")
        return cls(sorted(set(text)), kind="text")

    @classmethod
    def ascii(cls) -> Vocabulary:
        """All 128 ASCII characters; a character's id is its code point."""
        return cls((chr(i) for i in range(128)), kind="ascii")

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: object) -> bool:
        return char in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Vocabulary(kind={self.kind!r}, size={self.size})"

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text`` (int64 array); a character outside the vocabulary
        raises :class:`DataError` naming the first such character and its position."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, codes)
        np.minimum(pos, len(self._sorted_codes) - 1, out=pos)
        known = self._sorted_codes[pos] == codes
        if not known.all():
            i = int(np.argmin(known))
            raise DataError(
                f"character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} is not in the "
                f"{self.kind} vocabulary of {self.size} characters"
            )
        return self._order[pos]

    def decode(self, ids: Tensor | np.ndarray | Sequence[int]) -> str:
        """The text of a 1-D sequence of ids."""
        if isinstance(ids, Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"ids must be in [0, {self.size}), got values in [{ids.min()}, {ids.max()}]")
        chars = self.chars
        return "".join(chars[i] for i in ids.tolist())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"kind": ..., "chars": "<all characters in id order>"}``."""
        return {"kind": self.kind, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        try:
            chars = data["chars"]
        except (KeyError, TypeError):
            raise DataError("a saved vocabulary must be a mapping with a 'chars' string") from None
        if not isinstance(chars, str):
            raise DataError(f"a saved vocabulary's 'chars' must be a string, got {type(chars).__name__}")
        try:
            return cls(chars, kind=str(data.get("kind", "custom")))
        except ValueError as err:
            raise DataError(f"invalid saved vocabulary: {err}") from None


def load_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``, exactly as stored (no newline translation).

    Raises :class:`DataError` (one line, naming the file) if it is missing or unreadable, empty,
    not valid UTF-8, or binary: it contains a NUL byte, or more than 30 % of its characters are
    control characters other than tab, newline, vertical tab, form feed and carriage return.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    if not raw:
        raise DataError(f"{path}: file is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: binary file (NUL byte at offset {nul}), not a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start}: {err.reason})") from None
    controls = len(_BAD_CONTROLS.findall(text))
    if controls > _MAX_CONTROL_FRACTION * len(text):
        raise DataError(
            f"{path}: looks binary ({controls} of {len(text)} characters are non-printable control characters)"
        )
    return text


def _test_chars(n: int, test_fraction: float) -> int:
    return int(round(n * test_fraction))


def _min_chars(window: int, test_fraction: float) -> int:
    """Fewest characters that give one training and one test window."""

    def ok(n: int) -> bool:
        t = _test_chars(n, test_fraction)
        return t >= window and n - t >= window

    # every n below these bounds fails (rounding adds at most half a character); ok(n) is monotone
    n = max(2 * window, math.floor((window - 1) / test_fraction), math.floor((window - 1) / (1.0 - test_fraction)))
    while not ok(n):
        n += 1
    return n


def _windows(ids: np.ndarray, window: int) -> np.ndarray:
    count = len(ids) // window
    return ids[: count * window].reshape(count, window)


def load_shakespeare(
    path: str | os.PathLike,
    *,
    seq_len: int = 64,
    test_fraction: float = 0.1,
    vocab: str | Vocabulary = "text",
    seed: int = 0,
) -> tuple[Split, Vocabulary]:
    """Character windows of a text file and the vocabulary that encodes them.

    ``vocab`` is ``"text"`` (sorted distinct characters of the whole file), ``"ascii"`` or a
    :class:`Vocabulary` (e.g. one restored with :meth:`Vocabulary.from_dict`).  Returns
    ``(split, vocabulary)``; ``split.x_*`` and ``split.y_*`` are int64 of shape ``(N, seq_len)``
    with ``y[i, t] = x[i, t + 1]`` (for ``t < seq_len - 1``): the next character.
    """
    seq_len = operator.index(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if isinstance(seed, bool) or operator.index(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(vocab, Vocabulary) and vocab not in VOCABS:
        raise ValueError(f"vocab must be 'text', 'ascii' or a Vocabulary, got {vocab!r}")

    path = Path(path)
    text = load_text(path)
    n = len(text)
    window = seq_len + 1
    n_test = _test_chars(n, test_fraction)
    n_train = n - n_test
    if n_train < window or n_test < window:
        raise DataError(
            f"{path}: too short: {n} characters give {n_train} training and {n_test} test characters, but "
            f"seq_len={seq_len} needs windows of {window}; with test_fraction={test_fraction} the file "
            f"needs at least {_min_chars(window, test_fraction)} characters"
        )

    if isinstance(vocab, Vocabulary):
        vocabulary = vocab
    elif vocab == "ascii":
        vocabulary = Vocabulary.ascii()
    else:
        vocabulary = Vocabulary.from_text(text)
    try:
        ids = vocabulary.encode(text)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None

    train = _windows(ids[:n_train], window)
    test = _windows(ids[n_train:], window)
    train = train[np.random.default_rng(seed).permutation(len(train))]

    md5 = md5sum(path)
    official = "official" if md5 == SHAKESPEARE_MD5 else "not the official tiny-Shakespeare"
    source = (
        f"{path} ({n} characters, md5 {md5}, {official}); {vocabulary.kind} vocabulary of {vocabulary.size}; "
        f"last {n_test} characters ({test_fraction:g}) held out; non-overlapping windows of {window} "
        f"(seq_len {seq_len}): {len(train)} train (shuffled, seed {seed}), {len(test)} test (in order)"
    )
    split = Split(
        x_train=int64_tensor(train[:, :-1]),
        y_train=int64_tensor(train[:, 1:]),
        x_test=int64_tensor(test[:, :-1]),
        y_test=int64_tensor(test[:, 1:]),
        source=source,
    )
    return split, vocabulary
