"""Where the suite keeps what it builds: one cache root shared by the tools and the tests."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
KCONFIG_DIR = TOOLS / "kconfig"


def cache_root() -> Path:
    """`$EROFS_TEST_CACHE`, else `$XDG_CACHE_HOME/erofs-fscache-tests` (default ~/.cache)."""
    env = os.environ.get("EROFS_TEST_CACHE")
    if env:
        root = Path(env)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = base / "erofs-fscache-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root
