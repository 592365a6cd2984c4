"""Names unique in this machine's run: tests share one kernel, one after another, and the
kernel keeps domains, fsids and cache tags until their last user is gone."""

import itertools
import os

_counter = itertools.count(1)


def unique(prefix: str) -> str:
    """`<prefix><pid % 1000>x<n>`: erofs_domains/guest/observables.py numbers these per test."""
    return f"{prefix}{os.getpid() % 1000}x{next(_counter)}"
