"""Where mordasr keeps caches on a user's machine: an environment variable's folder when set, else
``$XDG_CACHE_HOME/mordasr/<name>`` (``~/.cache/mordasr/<name>``)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(env: str, name: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mordasr" / name
