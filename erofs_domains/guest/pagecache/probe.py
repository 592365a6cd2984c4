"""What one file of an erofs mount shows: its page cache (mmap + mincore), whether it got the
sharing file operations, its data; and the erofs I/O tracepoints.

Residency is read through mmap, not through a plain fd: erofs_ishare_mmap() switches the
mapping to the shared inode's file (vma_set_file()), while cachestat/fincore on the opened fd
look at the mount's own inode, whose mapping a shared file never fills."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.guest.observe.tracefs import TraceEvents

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PROT_READ = 1
MAP_SHARED = 1
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = os.sysconf("SC_PAGE_SIZE")
FS_IOC_GETFSLABEL = 0x81009431   # _IOR(0x94, 49, char[256]): erofs_ioctl(), not in erofs_ishare_fops


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def page_residency(path: str | os.PathLike) -> list[int]:
    """Per page, 1 if the page cache an mmap of `path` maps holds it (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return []
        pages = -(-size // PAGE)
        addr = _libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            raise _err(f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise _err(f"mincore {path}")
            return [b & 1 for b in vec.raw[:pages]]
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_pages(path: str | os.PathLike) -> tuple[int, int]:
    """(pages resident, pages of the file) of the page cache an mmap of `path` maps."""
    pages = page_residency(path)
    return sum(pages), len(pages)


def file_ops(path: str | os.PathLike) -> str:
    """"shared" if the file has erofs_ishare_fops (no ioctl: ENOTTY), "own" for erofs_file_fops."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSLABEL, bytes(256))
        return "own"
    except OSError as e:
        if e.errno == errno.ENOTTY:
            return "shared"
        raise
    finally:
        os.close(fd)


def open_direct(path: str | os.PathLike) -> int:
    """0 if open(O_DIRECT) works, else its errno."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return e.errno
    os.close(fd)
    return 0


def read(path: str | os.PathLike) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def dontneed(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_caches(what: int = 3) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{what}\n")


# ---------------------------------------------------------------- tracepoints
@dataclass(frozen=True)
class IoEvent:
    """One erofs_read_folio / erofs_readahead event: which inode (device, nid) did the I/O."""

    event: str
    dev: tuple[int, int]
    nid: int
    first_page: int
    pages: int
    directory: bool = False

    def __str__(self):
        return f"{self.event} dev {self.dev[0]}:{self.dev[1]} nid {self.nid} pages {self.first_page}+{self.pages}"


_EVENT = re.compile(r"(erofs_read_folio|erofs_readahead): dev = \((\d+),(\d+)\), nid = (\d+), "
                    r"(?:([\w ]+?), index = (\d+), order = (\d+)|start = (\d+) nrpage = (\d+))")


def parse_trace(text: str) -> list[IoEvent]:
    """Lines of tracefs `trace` (TP_printk of include/trace/events/erofs.h) -> events."""
    out = []
    for line in text.splitlines():
        m = _EVENT.search(line)
        if not m:
            continue
        name, major, minor, nid = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        if name == "erofs_read_folio":
            first, pages = int(m.group(6)), 1 << int(m.group(7))
        else:
            first, pages = int(m.group(8)), int(m.group(9))
        out.append(IoEvent(name, (major, minor), nid, first, pages, directory=m.group(5) == "DIR"))
    return out


class IoTrace:
    """Enable the two erofs data tracepoints; `take()` returns and clears what they logged."""

    EVENTS = (("erofs", "erofs_read_folio"), ("erofs", "erofs_readahead"))

    def __init__(self):
        self.trace = TraceEvents(self.EVENTS)

    def take(self) -> list[IoEvent]:
        return parse_trace(self.trace.take())

    def close(self) -> None:
        self.trace.close()
