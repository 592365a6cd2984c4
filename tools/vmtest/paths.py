"""Where the suite keeps what it builds: one cache root shared by the tools and the tests."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
KCONFIG_DIR = TOOLS / "kconfig"


def cache_root(create: bool = True) -> Path:
    """`$EROFS_TEST_CACHE`, else `$XDG_CACHE_HOME/erofs-fscache-tests` (default ~/.cache);
    created unless `create` is false (tools/cache --list only looks)."""
    env = os.environ.get("EROFS_TEST_CACHE")
    if env:
        root = Path(env)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = base / "erofs-fscache-tests"
    if root.exists() and not root.is_dir():
        from .validate import BadInput

        raise BadInput(f"{'$EROFS_TEST_CACHE' if env else 'the cache root'} {root} is not a directory; "
                       "give a directory for the suite's cache (or unset EROFS_TEST_CACHE)")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root
