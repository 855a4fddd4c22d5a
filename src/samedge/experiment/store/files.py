"""Files written atomically and JSON read safely: what every writer and reader of a run's files uses.

:func:`atomic_write` writes a temporary file beside the target, fsyncs it and renames it into
place, so a reader sees the old file or the new one, never a part.  :func:`read_json_object` turns
any damage (not UTF-8, not JSON, not an object) into one :class:`~samedge.errors.RunDirError`
naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from samedge.errors import RunDirError

__all__ = ["atomic_write", "write_json", "read_json_object", "with_path", "describe_os_error"]


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, rename, fsync of
    the directory.  On any failure (a full disk, no permission) the temporary file is removed and
    ``path`` is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise with_path(err, tmp) from None
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def with_path(err: BaseException, path: Path) -> BaseException:
    """``err`` with ``path`` as its file name if it is an ``OSError`` without one (a failed
    ``write`` such as a full disk does not say which file it was writing)."""
    if isinstance(err, OSError) and err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror or str(err), str(path))
    return err


def describe_os_error(err: OSError) -> str:
    """What the machine refused, as one line naming the path (``No space left on device: p``)."""
    what = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n").encode("utf-8"))


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """``path`` as a JSON object; a damaged file (not UTF-8, not JSON, not an object) is a
    :class:`RunDirError` naming it.  A missing file raises ``FileNotFoundError`` as usual."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RunDirError(f"{path} is damaged (not a JSON {what})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is damaged (not a JSON object)")
    return data
