"""Write a file so that a reader sees the old content or the new, never half: a temporary
sibling, then a rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, data: bytes | str, mode: int = 0o644) -> Path:
    with atomic_open(path, mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def atomic_open(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, renamed into place when the block succeeds and
    removed when it fails (what a long, streamed write needs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path, mode: int = 0o755) -> Iterator[Path]:
    """Build a folder in a hidden sibling and rename it into place when the block succeeds
    (replacing an older one); when it fails, nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield stage
        stage.chmod(mode)  # mkdtemp makes it private; bundles and repositories are meant to be shared
        if path.exists():
            shutil.rmtree(path)
        stage.rename(path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
