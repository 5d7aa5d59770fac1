"""Files written whole or not at all: the caches under ~/.cache/vae_lab that several processes
may fill at once."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def write_whole(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """`write(handle)` into a temporary file beside `path`, then renamed onto it (atomic: a reader
    sees the old file or the whole new one; two writers of equal content both succeed). False,
    with nothing left behind, where it cannot be written (a read-only home): callers compute again."""
    draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with draft.open("wb") as handle:
            write(handle)
        os.replace(draft, path)
        return True
    except OSError:
        return False
    finally:
        draft.unlink(missing_ok=True)
