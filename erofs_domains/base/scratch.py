"""Where the tests keep scratch files in the machine under test (the guest, or the host in
host mode): one root, the run configuration's `work` (`$EROFS_TEST_WORK`, default
config.DEFAULT_WORK).

Kept short on purpose: daemon control sockets live there, and a Unix socket path must fit
in sun_path (108 bytes)."""

from pathlib import Path

from erofs_domains.base import config


def work_root() -> Path:
    """The scratch root (created on first use)."""
    root = config.current().work
    root.mkdir(parents=True, exist_ok=True)
    return root
