"""Writing report files so that a reader never sees half of one, and a failure leaves the
previous file as it was."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` (parents created) through a temporary file beside it,
    renamed over the old one once complete.

    Raises:
        OSError: the file could not be written (a full disk, a read-only folder, ...); the
            temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # complete on disk before it replaces the old one
        partial.replace(target)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
