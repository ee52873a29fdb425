"""Writing a file so that readers see either the old file or the whole new one, never a half-written one.

The new contents go to a hidden temp file in the target's directory (same file system), which is fsynced and
then renamed over the target with `os.replace`; if the writer raises, the temp file is removed and the target
is left as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def temp_name(path: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """A fresh hidden temp path beside `path`: `.<name>.<random><suffix>`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: some file systems refuse fsync on a directory)."""
    try:
        _fsync(directory)
    except OSError:
        pass


@contextmanager
def atomic_path(path: Path | str, suffix: str = TEMP_SUFFIX) -> Iterator[Path]:
    """Yield a temp path for a library that writes by name (h5py, torch.save, savefig, np.savez, ...).

    On a clean exit the temp file is fsynced and renamed to `path`; on an exception it is removed.
    `suffix` ends the temp name, for writers that choose the format by extension (np.savez wants ".npz").
    """
    path = Path(path)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_write(
    path: Path | str,
    mode: str = "w",
    *,
    newline: str | None = None,
    encoding: str | None = "utf-8",
    perms: int = 0o666,
) -> Iterator[IO[Any]]:
    """Yield an open file ("w": text, "wb": bytes) whose contents replace `path` when the block ends cleanly.

    The file is created with `perms` (less the umask), as `open` would with 0o666.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms)
        if mode == "wb":
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", newline=newline, encoding=encoding)
        with handle:
            yield handle


def write_text_atomic(path: Path | str, text: str, encoding: str | None = "utf-8") -> None:
    """`Path.write_text`, atomically."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)
