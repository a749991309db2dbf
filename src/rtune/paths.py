"""Where rtune keeps cached assets (converted models, downloaded data)."""

import os
from pathlib import Path


def rtune_home() -> Path:
    """`$RTUNE_HOME`, else `$XDG_CACHE_HOME/rtune`, else `~/.cache/rtune`."""
    if os.environ.get("RTUNE_HOME"):
        return Path(os.environ["RTUNE_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "rtune"
