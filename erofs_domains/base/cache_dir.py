"""Where the suite keeps what it builds: one cache root shared by the tools and the tests."""

from pathlib import Path

from erofs_domains.base import config


def cache_root() -> Path:
    """`$EROFS_TEST_CACHE`, else `$XDG_CACHE_HOME/erofs-fscache-tests` (default ~/.cache): the
    run configuration's `cache_root`, created on first use."""
    root = config.current().cache_root
    root.mkdir(parents=True, exist_ok=True)
    return root
