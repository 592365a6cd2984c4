"""Shared pieces of the bad-input, daemon-fault, failover, cache-space and stress tests
(test_bad_input.py, test_daemon_replies.py, test_daemon_death.py, test_cache_space.py,
test_stress.py); their fixtures (`env`, `daemons`, `plain_mounts`) are in conftest.py.

* `Row`: one line of the README's "Bad input and faults: expected outcomes" table. Every test
  module keeps its cases in parameter tables and exposes `OUTCOMES` (a list of rows built from
  them); `tools/outcome-table` prints them and `tests/unit/test_outcome_table.py` keeps the
  README's copy current.
* Images come from the `tiny_images` fixture of tests/fscache/conftest.py ("tiny" profile,
  about 1.4 MB): content size does not matter here, VM time does.
* The EROFS reader and writer the corruption cases use is fixtures/erofs_format.py.
"""

from __future__ import annotations

import errno
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from erofs_domains.base import config
from erofs_domains.base.names import unique

# --------------------------------------------------------------------------- outcome rows

@dataclass(frozen=True)
class Row:
    """One README row: what was fed to the kernel, what must happen, and the rule of
    erofs_domains/guest/kernel_features.py that says on which kernels (its "Kernels" cell is that rule's range)."""

    area: str
    case: str
    expected: str
    rule: str = "fscache_backend"

    @property
    def kernels(self) -> str:
        from erofs_domains.guest.kernel_features import row_kernels

        return row_kernels(self.rule)


def errname(err: int | None) -> str:
    if not err:
        return "ok"
    if err == errno.EOPNOTSUPP:  # == ENOTSUP on Linux; the kernel source says EOPNOTSUPP
        return "EOPNOTSUPP"
    return errno.errorcode.get(err, str(err))


def readable(pattern: str) -> str:
    """A log regex as a reader would write the line: `\\S*` -> `…`, `\\d+` -> `N`, no escapes."""
    import re

    text = pattern.replace(r"\S*", "…").replace(r"\d+", "N").replace("0x[0-9a-f]+", "0x…")
    return re.sub(r"\\(.)", r"\1", text)


def errnames(errs) -> str:
    return " or ".join(errname(e) for e in errs)


# --------------------------------------------------------------------------- images

def mkfs_tree(out: Path, tree: Path, *extra: str) -> Path:
    """mkfs.erofs an arbitrary tree (for images the factory does not make, e.g. -b1024)."""
    mkfs = config.current().mkfs
    r = subprocess.run([mkfs, "--quiet", "-T0", "--all-root", *extra, str(out), str(tree)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"mkfs.erofs {' '.join(extra)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return out


# --------------------------------------------------------------------------- serving blobs

def serve(control, image, fsid: str | None = None, devices: dict[str, str] | None = None) -> str:
    """Serve `image` through a daemon's control channel (a test's own daemon; `env.serve` for
    the module's): its primary blob under `fsid` (default: a unique name), its device blobs
    under their cookie names or renamed through `devices` {old: new}. Returns the fsid."""
    from erofs_domains.guest.fscache.daemons import image_blobs

    fsid = fsid or unique(image.name[:20] + "-")
    for cookie, path in image_blobs(image, fsid, devices).items():
        control.add_blob(cookie, str(path))
    return fsid


# --------------------------------------------------------------------------- readers

@dataclass
class ReadResult:
    path: str
    data: bytes | None = None
    errno: int | None = None
    seconds: float = 0.0


class Reader(threading.Thread):
    """Reads one file (or `length` bytes at `offset`) in a thread, recording data or errno."""

    def __init__(self, path: Path | str, offset: int = 0, length: int | None = None):
        super().__init__(daemon=True, name=f"reader {path}")
        self.path, self.offset, self.length = str(path), offset, length
        self.result = ReadResult(self.path)
        self.started_at = 0.0

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset)
                self.result.data = f.read() if self.length is None else f.read(self.length)
        except OSError as e:
            self.result.errno = e.errno
        self.result.seconds = time.monotonic() - self.started_at


def fscache_stats() -> dict[str, dict[str, int]]:
    from erofs_domains.guest.observe import procfs

    try:
        return procfs.read_stats()
    except FileNotFoundError:
        return {}


def stat_delta(before: dict, after: dict, section: str, name: str) -> int:
    return after.get(section, {}).get(name, 0) - before.get(section, {}).get(name, 0)


def table(rows, headers) -> str:
    return tabulate(rows, headers=headers, disable_numparse=True)
