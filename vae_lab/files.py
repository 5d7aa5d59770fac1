"""Files written whole or not at all: the caches under ~/.cache/vae_lab that several processes
may fill at once, and checkpoints written straight into a local artifact folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def replace_whole(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(handle)` into a temporary file beside `path`, then renamed onto it (atomic: a reader
    sees the old file or the whole new one; two writers of equal content both succeed). Raises
    OSError, with nothing left behind, where it cannot be written."""
    draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with draft.open("wb") as handle:
            write(handle)
        os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)


def write_whole(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """`replace_whole` for a cache: False where it cannot be written (a read-only home), and
    the callers compute again."""
    try:
        replace_whole(path, write)
        return True
    except OSError:
        return False
