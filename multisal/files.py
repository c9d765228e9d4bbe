"""Files written whole or not at all, through names that cannot be redirected.

A file is written to a temporary name in its own folder, then renamed over its final name, so a
reader (or a run resumed after a crash) sees the old file or the new one, never half of one.
The temporary name carries a tag (a run's own, see multisal.app.output), so that a run later
removes the leftovers of its own killed writes and nobody else's. Files are created with the
permissions the process's umask gives (as open() would), never through a symbolic link, and a
rename replaces a link planted at the final name instead of writing through it.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import MultisalError

DEFAULT_TAG = "multisal"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def temporary_name(path: Path, tag: str = DEFAULT_TAG) -> Path:
    """A fresh temporary name beside `path` that temporary_files(folder, tag) finds again."""
    return path.parent / f".{path.name}.{tag}-{secrets.token_hex(6)}.tmp"


def temporary_files(folder: Path, tag: str = DEFAULT_TAG):
    """The temporary files write_atomic(..., tag) left in `folder` (not in its subfolders)."""
    marker = f".{tag}-"
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(e.path) for e in entries if e.name.startswith(".") and e.name.endswith(".tmp") and marker in e.name
            and e.is_file(follow_symlinks=False)]


def write_atomic(path, data: bytes, tag: str = DEFAULT_TAG) -> None:
    """Write `data` to `path` whole or not at all (see the module docstring)."""
    path = Path(path)
    tmp = temporary_name(path, tag)
    fd = os.open(tmp, _FLAGS, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def is_regular_file(path) -> bool:
    """A regular file (a FIFO, a device or a folder is no input, and reading one can block)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_text(path, what: str, limit: int = 16 << 20) -> str:
    """A small UTF-8 text file the user gave (a configuration, a list of images, class names), or
    one line naming it and what is wrong: missing, not a regular file (a FIFO or /dev/zero would
    block or never end), larger than `limit` bytes, or not UTF-8."""
    shown = repr(str(path))
    if not os.path.lexists(path):
        raise MultisalError(f"{what} {shown} not found")
    if not is_regular_file(path):
        raise MultisalError(f"{what} {shown} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise MultisalError(f"cannot read {what} {shown}: {err.strerror}") from None
    if len(data) > limit:
        raise MultisalError(f"{what} {shown} is larger than {limit >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MultisalError(f"{what} {shown} is not UTF-8 text (byte {err.start})") from None
