"""Shared pieces of the bad-input, daemon-fault, failover, cache-space and stress tests
(test_bad_input.py, test_daemon_replies.py, test_daemon_death.py, test_cache_space.py,
test_stress.py). Not a conftest: test modules import what they use.

* `Row`: one line of the README's "Bad input and faults: expected outcomes" table. Every test
  module keeps its cases in parameter tables and exposes `OUTCOMES` (a list of rows built from
  them); `tools/outcome-table` prints them and `tests/unit/test_outcome_table.py` keeps the
  README's copy current.
* Images come from the `tiny_images` fixture of tests/fscache/conftest.py ("tiny" profile,
  about 1.4 MB): content size does not matter here, VM time does.
* `ErofsMeta` and the mutations: a small reader of the EROFS on-disk format (superblock,
  inodes, directories) to corrupt precisely what a case names, and crc32c to re-seal the
  superblock checksum so that the corruption, not the checksum, is what the kernel meets.
* `shared_daemon` (module scope) and `env` (per test): one cache + daemon for a whole module
  (daemon start-up costs seconds under TCG), with per-test unique fsids, the test's slice of
  the request log, a MountTable and cleanup of faults. `daemons`/`plain_mounts`: per-test
  daemons for the tests that kill them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tabulate import tabulate

from fixtures.paths import work_root
from fixtures.plugin import WATCHDOG, test_dir, unique

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- outcome rows

@dataclass(frozen=True)
class Row:
    """One README row: what was fed to the kernel, what must happen, on which kernels."""

    area: str
    case: str
    expected: str
    kernels: str = "6.12"


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
    mkfs = os.environ["MKFS_EROFS"]
    r = subprocess.run([mkfs, "--quiet", "-T0", "--all-root", *extra, str(out), str(tree)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"mkfs.erofs {' '.join(extra)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return out


# --------------------------------------------------------------------------- EROFS on-disk format

SB_OFF = 1024
EROFS_MAGIC = 0xE0F5E1E2
COMPAT_SB_CHKSUM = 0x1
S_IFMT, S_IFDIR, S_IFREG = 0o170000, 0o040000, 0o100000
FLAT_PLAIN, FLAT_INLINE = 0, 2


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(crc: int, data: bytes) -> int:
    """The kernel's crc32c(seed, data, len): no final inversion."""
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@dataclass
class Inode:
    nid: int
    off: int  # byte offset in the image
    version: int  # 0 compact (32 bytes), 1 extended (64 bytes)
    layout: int
    mode: int
    size: int
    raw_blkaddr: int
    xattr_isize: int

    @property
    def isize(self) -> int:
        return 64 if self.version else 32


class ErofsMeta:
    """A read/write view of an uncompressed EROFS image's metadata (enough to corrupt it)."""

    def __init__(self, data: bytes | bytearray):
        self.data = bytearray(data)
        magic, = struct.unpack_from("<I", self.data, SB_OFF)
        if magic != EROFS_MAGIC:
            raise ValueError("not an EROFS image")
        self.feature_compat, = struct.unpack_from("<I", self.data, SB_OFF + 8)
        self.blksz = 1 << self.data[SB_OFF + 12]
        self.root_nid, = struct.unpack_from("<H", self.data, SB_OFF + 14)
        self.meta_blkaddr, = struct.unpack_from("<I", self.data, SB_OFF + 40)

    # -- reading ------------------------------------------------------------
    def iloc(self, nid: int) -> int:
        return self.meta_blkaddr * self.blksz + nid * 32

    def inode(self, nid: int) -> Inode:
        off = self.iloc(nid)
        ifmt, icount, mode = struct.unpack_from("<HHH", self.data, off)
        version, layout = ifmt & 1, (ifmt >> 1) & 7
        if version:
            size, = struct.unpack_from("<Q", self.data, off + 8)
        else:
            size, = struct.unpack_from("<I", self.data, off + 8)
        raw, = struct.unpack_from("<I", self.data, off + 16)
        xsize = 0 if icount == 0 else 12 + (icount - 1) * 4
        return Inode(nid, off, version, layout, mode, size, raw, xsize)

    def dir_blocks(self, ino: Inode) -> list[tuple[int, int]]:
        """(offset, length) of each directory block of a FLAT_PLAIN/FLAT_INLINE directory."""
        if ino.layout not in (FLAT_PLAIN, FLAT_INLINE):
            raise ValueError(f"nid {ino.nid}: layout {ino.layout} not handled")
        n = -(-ino.size // self.blksz)
        out = []
        for i in range(n):
            length = min(self.blksz, ino.size - i * self.blksz)
            if ino.layout == FLAT_INLINE and i == n - 1:
                out.append((ino.off + ino.isize + ino.xattr_isize, length))
            else:
                out.append(((ino.raw_blkaddr + i) * self.blksz, length))
        return out

    def dirents(self, nid: int) -> list[tuple[str, int, int, int]]:
        """[(name, nid, file_type, offset of the dirent in the image)] of a directory."""
        out = []
        for boff, blen in self.dir_blocks(self.inode(nid)):
            nameoff0, = struct.unpack_from("<H", self.data, boff + 8)
            n = nameoff0 // 12
            for j in range(n):
                dnid, nameoff, ftype = struct.unpack_from("<QHB", self.data, boff + 12 * j)
                if j + 1 < n:
                    end, = struct.unpack_from("<H", self.data, boff + 12 * (j + 1) + 8)
                else:
                    raw = bytes(self.data[boff + nameoff: boff + blen])
                    end = nameoff + (raw.index(0) if 0 in raw else len(raw))
                name = bytes(self.data[boff + nameoff: boff + end]).decode("utf-8", "surrogateescape")
                out.append((name, dnid, ftype, boff + 12 * j))
        return out

    def lookup(self, path: str) -> int:
        nid = self.root_nid
        for part in [p for p in path.split("/") if p]:
            match = [e for e in self.dirents(nid) if e[0] == part]
            if not match:
                raise FileNotFoundError(path)
            nid = match[0][1]
        return nid



    def all_nids(self) -> list[int]:
        seen, todo = [], [self.root_nid]
        while todo:
            nid = todo.pop()
            if nid in seen:
                continue
            seen.append(nid)
            if self.inode(nid).mode & S_IFMT == S_IFDIR:
                todo += [n for name, n, _, _ in self.dirents(nid) if name not in (".", "..")]
        return seen

    # -- writing --------------------------------------------------------------
    def put(self, off: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, self.data, off, *values)

    def seal(self) -> None:
        """Recompute the superblock checksum (if the image has one) after editing."""
        if not self.feature_compat & COMPAT_SB_CHKSUM:
            return
        length = self.blksz - SB_OFF if self.blksz > SB_OFF else self.blksz
        sb = bytearray(self.data[SB_OFF:SB_OFF + length])
        sb[4:8] = b"\0\0\0\0"
        self.put(SB_OFF + 4, "<I", crc32c(0xFFFFFFFF, bytes(sb)))



# --------------------------------------------------------------------------- shared daemon per module

@dataclass
class SharedDaemon:
    """One ext4 cache and one on-demand daemon for a whole test module."""

    name: str
    args: list[str]
    cache_mib: int
    workdir: Path
    cache: object = None
    proc: object = None
    starts: int = 0

    def start(self) -> None:
        from fixtures.cache import CacheFs
        from fixtures.ondemand.process import DaemonProcess

        if self.cache is None:
            self.cache = CacheFs.create(unique("fcache"), self.cache_mib)
        self.proc = DaemonProcess(cache_dir=self.cache.mountpoint, workdir=self.workdir, tag=unique("ft"),
                                  extra_args=list(self.args))
        self.starts += 1
        self.proc.start()

    def ensure_alive(self) -> None:
        """A test (or the watchdog) may have killed it: start a fresh one on the same cache."""
        from fixtures.cache import wait_withdrawn

        if self.proc is not None and self.proc.alive:
            return
        if self.proc is not None:
            self.proc.stop()
            wait_withdrawn(self.proc.tag)
        self.start()

    def stop(self) -> None:
        from fixtures.cache import wait_withdrawn

        try:
            if self.proc is not None:
                self.proc.stop()
                wait_withdrawn(self.proc.tag)
        finally:
            if self.cache is not None:
                self.cache.destroy()
            save_logs(self.workdir, test_dir(f"{self.name}::shared-daemon"))


def work_dir(stem: str) -> Path:
    """A directory in the guest's /tmp for daemon logs: a request log on the 9p results
    directory slows every request down. `save_logs` copies it to the results afterwards."""
    d = work_root() / unique(stem)
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_logs(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir() if src.is_dir() else ():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
        elif f.is_dir():
            save_logs(f, dest / f.name)
    shutil.rmtree(src, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_daemon(request, require):
    """The module's cache + daemon; module attributes SHARED_DAEMON_ARGS / SHARED_CACHE_MIB."""
    require.ondemand()
    stem = Path(str(request.module.__file__)).stem
    sd = SharedDaemon(stem, list(getattr(request.module, "SHARED_DAEMON_ARGS", [])),
                      int(getattr(request.module, "SHARED_CACHE_MIB", 64)), work_dir(f"{stem}-daemon-"))
    try:
        sd.start()
        yield sd
    finally:
        sd.stop()


@dataclass
class FaultEnv:
    """What a test of the shared daemon gets: the daemon, its control channel, mounts, the
    kernel log, and the request log entries of this test only."""

    shared: SharedDaemon
    mounts: object
    kmsg: object
    artifacts: Path
    mark: int

    @property
    def daemon(self):
        return self.shared.proc

    @property
    def control(self):
        return self.shared.proc.control

    @property
    def cache_dir(self) -> Path:
        return Path(self.shared.cache.mountpoint)

    def requests(self, op: str | None = None) -> list[dict]:
        return [r for r in self.shared.proc.requests()[self.mark:] if op is None or r.get("op") == op]

    def render(self, last: int = 40) -> str:
        from fixtures.ondemand.process import render_requests

        return render_requests(self.requests(), last)

    def serve(self, image, fsid: str | None = None, devices: dict[str, str] | None = None) -> str:
        """Serve `image` with its primary blob under `fsid` (default: a unique name) and its
        device blobs under their cookie names, or renamed through `devices` {old: new}.
        Returns the fsid."""
        fsid = fsid or unique(image.name[:20] + "-")
        devices = devices or {}
        for name, blob in image.blobs.items():
            cookie = fsid if name == image.fsid else devices.get(name, name)
            self.control.add_blob(cookie, str(blob.path))
        return fsid

    def serve_file(self, name: str, path: Path) -> str:
        self.control.add_blob(name, str(path))
        return name


@pytest.fixture
def env(shared_daemon, kmsg, artifacts):
    from fixtures.mounts import MountTable

    shared_daemon.ensure_alive()
    WATCHDOG.register(shared_daemon.proc.kill)
    mark = len(shared_daemon.proc.requests())
    table = MountTable(root=work_root() / "mnt" / unique("f"), kmsg=kmsg)
    e = FaultEnv(shared_daemon, table, kmsg, artifacts, mark)
    yield e
    errors = table.close()
    if shared_daemon.proc.alive:
        with contextlib.suppress(Exception):
            st = e.control.status()
            if st["faults"]:
                e.control.clear_faults()
            if st["ignored"]:
                e.control.serve_ignored(with_data=False)
            e.control.wait_idle(timeout=10, quiet=0.1)
    (artifacts / "daemon-requests.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in shared_daemon.proc.requests()[mark:]))
    if errors:
        pytest.fail("unmount failed at teardown:\n" + "\n".join(errors), pytrace=False)


# --------------------------------------------------------------------------- per-test daemons

@dataclass
class Daemons:
    """Daemons (and fd holders) of one test, on the test's cache_fs; stopped at teardown in
    reverse order, then the cache must be withdrawn."""

    cache_dir: Path
    artifacts: Path
    work: Path
    procs: list = field(default_factory=list)
    holders: list = field(default_factory=list)
    tags: set = field(default_factory=set)

    def start(self, *args: str, tag: str | None = None, name: str | None = None,
              blobs: dict[str, Path] | None = None):
        """Start a daemon (`blobs` are served from the start, e.g. before a `restore`)."""
        from fixtures.ondemand.process import DaemonProcess

        n = len(self.procs) + 1
        d = DaemonProcess(cache_dir=self.cache_dir, workdir=self.work / (name or f"daemon{n}"),
                          tag=tag or unique("t"), extra_args=list(args), blobs=dict(blobs or {}))
        WATCHDOG.register(d.kill)
        self.procs.append(d)
        self.tags.add(d.tag)
        d.start()
        return d

    def holder(self) -> str:
        """Start an fd holder (fixtures/ondemand/holder.py); returns its socket path."""
        path = str(work_root() / f"{unique('h')}.sock")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "fixtures.ondemand.holder", "--socket", path], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        WATCHDOG.register(lambda: proc.kill())
        self.holders.append(proc)
        line = proc.stdout.readline()
        if not line.startswith(b"READY"):
            raise RuntimeError(f"fd holder did not start: {line!r}")
        return path

    def close(self) -> None:
        from fixtures.cache import wait_withdrawn

        for d in reversed(self.procs):
            d.stop()
        for h in self.holders:
            if h.poll() is None:
                h.send_signal(signal.SIGTERM)
                try:
                    h.wait(10)
                except subprocess.TimeoutExpired:
                    h.kill()
                    h.wait(5)
            if h.stdout:
                h.stdout.close()
        try:
            for tag in self.tags:
                wait_withdrawn(tag)
        finally:
            save_logs(self.work, self.artifacts)


@pytest.fixture
def daemons(cache_fs, artifacts):
    d = Daemons(Path(cache_fs.mountpoint), artifacts, work_dir("d-"))
    yield d
    d.close()


@pytest.fixture
def plain_mounts(daemons, kmsg):
    """A MountTable torn down before `daemons` (so mounts go before their daemons)."""
    from fixtures.mounts import MountTable

    table = MountTable(root=work_root() / "mnt" / unique("p"), kmsg=kmsg)
    yield table
    errors = table.close()
    if errors:
        pytest.fail("unmount failed at teardown:\n" + "\n".join(errors), pytrace=False)


def serve(control, image, fsid: str | None = None, devices: dict[str, str] | None = None) -> str:
    """`FaultEnv.serve` for a per-test daemon's control channel."""
    fsid = fsid or unique(image.name[:20] + "-")
    devices = devices or {}
    for name, blob in image.blobs.items():
        control.add_blob(fsid if name == image.fsid else devices.get(name, name), str(blob.path))
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




def wait_for(cond: Callable[[], object], timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def fscache_stats() -> dict[str, dict[str, int]]:
    from fixtures.observe import procfs

    try:
        return procfs.read_stats()
    except FileNotFoundError:
        return {}


def stat_delta(before: dict, after: dict, section: str, name: str) -> int:
    return after.get(section, {}).get(name, 0) - before.get(section, {}).get(name, 0)


def table(rows, headers) -> str:
    return tabulate(rows, headers=headers, disable_numparse=True)



