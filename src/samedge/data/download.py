"""Fetching official data files, with checksum verification.

Nothing here runs unless the user asks for a download.  Files are written to a temporary name,
verified, and only then renamed into place, so an interrupted or corrupted download never
leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from samedge.data import DataError

__all__ = ["md5sum", "verify_md5", "download"]


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DataError(f"{path}: md5 {actual} does not match the official {expected}")


def download(url: str, dest: str | os.PathLike, md5: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right md5 is already there."""
    dest = Path(dest)
    if dest.exists():
        try:
            verify_md5(dest, md5)
            return dest
        except DataError:
            pass  # fetch it again; the bad file is replaced only after the new one verifies
    made = _missing_ancestors(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch(url, dest, md5, timeout)
    except BaseException:
        for folder in made:  # the folders this call made, innermost first, if nothing else is in them
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
            except OSError as err:  # offline, refused, timed out: the environment's answer, not bad input
                reason = getattr(err, "reason", None) or err
                raise ConnectionError(f"could not download {url} ({reason})") from None
            out.flush()
            os.fsync(out.fileno())
        verify_md5(tmp, md5)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
