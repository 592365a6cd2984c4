"""Every door a process has to a file's bytes, each run on a shared file and on its unshared twin.

A *door* is one system call path to a regular file's data or metadata (read, pread, preadv2,
mmap, splice, sendfile, copy_file_range, lseek, readahead, fadvise, O_DIRECT, fstat/statx,
ioctls). `run(door, path)` returns what a process sees through it as a JSON-able dict: file
bytes as `pieces` [(offset, requested, bytes)], return values, errno names. The twin oracle
(`compare()`) says, per door, where a shared file (erofs_ishare_fops) and its twin, the same file
of the same image mounted without inode_share (erofs_file_fops), saw different things, and
whether a documented rule of the kernel (`TWIN_RULES`, each with its kernel function) explains
it. `manifest_errors()` checks every piece of data against the image's own bytes.

Which page cache holds the pages, and who does the I/O, is allowed to differ: that is what
sharing is. `fills` marks the doors after which the shared page cache must hold what the door
touched (tests/pagecache/test_doors.py checks it through another member, and that the other
member's identical call does no I/O)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.guest.pagecache import probe

PAGE = probe.PAGE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value

SYS_READAHEAD = 187          # x86_64
SYS_STATX = 332
AT_FDCWD = -100
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
STATX_DIOALIGN = 0x2000
F_SETPIPE_SZ = 1031
MADV_WILLNEED = 3
POSIX_FADV_NOREUSE = 5

FS_IOC_GETFLAGS = 0x80086601          # _IOR('f', 1, long): do_vfs_ioctl() -> vfs_fileattr_get()
FS_IOC_GETFSLABEL = 0x81009431        # _IOR(0x94, 49, char[256]): the filesystem's ->unlocked_ioctl
FS_IOC_GETFSSYSFSPATH = 0x80811501    # _IOR(0x15, 1, struct fs_sysfs_path): do_vfs_ioctl()
FS_IOC_FIEMAP = 0xC020660B            # _IOWR('f', 11, struct fiemap): ioctl_fiemap() -> i_op->fiemap


def ename(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def _oserr(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


# ------------------------------------------------------------------ residency
resident = probe.page_residency


def settled(path, bound: float = 3.0) -> list[int]:
    """Residency once asynchronous readahead has stopped adding pages (unchanged for 0.2 s)."""
    last, end = resident(path), time.monotonic() + bound
    while time.monotonic() < end:
        time.sleep(0.2)
        now = resident(path)
        if now == last:
            return now
        last = now
    return last


def runs(vec: list[int]) -> str:
    """[1,1,0,1] -> '0-1,3' (the resident pages, as ranges)."""
    out, i = [], 0
    while i < len(vec):
        if vec[i]:
            j = i
            while j + 1 < len(vec) and vec[j + 1]:
                j += 1
            out.append(f"{i}" if i == j else f"{i}-{j}")
            i = j + 1
        else:
            i += 1
    return ",".join(out) or "none"


# ------------------------------------------------------------------ the doors
def _offsets(size: int) -> list[int]:
    return sorted({o for o in (0, 1, PAGE - 1, PAGE, size // 2, size - 1, size, size + PAGE) if o >= 0})


def _pieces_read(fd: int, size: int) -> list:
    out, off = [], 0
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        out.append(b)
        off += len(b)
    return [(0, size, b"".join(out))]


def d_read(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = _pieces_read(fd, size)
        return {"pieces": pieces, "pos": os.lseek(fd, 0, os.SEEK_CUR)}
    finally:
        os.close(fd)


def d_pread(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"pieces": [(o, PAGE + 1, os.pread(fd, PAGE + 1, o)) for o in _offsets(size)],
                "pos": os.lseek(fd, 0, os.SEEK_CUR)}
    finally:
        os.close(fd)


def _preadv(fd, off, lens, flags):
    bufs = [bytearray(n) for n in lens]
    try:
        n = os.preadv(fd, bufs, off, flags)
    except OSError as e:
        return (off, sum(lens), ename(e.errno))
    return (off, sum(lens), b"".join(bytes(b) for b in bufs)[:n])


def d_preadv2(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"pieces": [_preadv(fd, o, (100, 2 * PAGE), 0) for o in _offsets(size)]}
    finally:
        os.close(fd)


def d_preadv2_nowait(path, size, scratch):
    """Cold (nothing cached): RWF_NOWAIT must not wait for I/O; warm (after a read): the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cold = _preadv(fd, 0, (size or 1,), os.RWF_NOWAIT)
        cold_seen = cold[2] if isinstance(cold[2], str) else f"{len(cold[2])} bytes"
        _pieces_read(fd, size)
        warm = [_preadv(fd, o, (100, 2 * PAGE), os.RWF_NOWAIT) for o in _offsets(size)]
        return {"cold": cold_seen, "pieces": warm}
    finally:
        os.close(fd)


def _map_read(path, size, flags):
    """Map the whole last page too: the bytes past EOF in it must read as zeros."""
    if not size:
        return {"skipped": "empty file"}
    fd = os.open(path, os.O_RDONLY)
    try:
        length = -(-size // PAGE) * PAGE
        addr = _libc.mmap(None, length, mmap.PROT_READ, flags, fd, 0)
        if addr in (None, MAP_FAILED):
            return {"mmap": ename(ctypes.get_errno())}
        try:
            data = ctypes.string_at(addr, length)
        finally:
            _libc.munmap(addr, length)
        return {"pieces": [(0, size, data[:size])], "past_eof_zero": data[size:] == bytes(length - size)}
    finally:
        os.close(fd)


def d_mmap_shared(path, size, scratch):
    return _map_read(path, size, mmap.MAP_SHARED)


def d_mmap_private(path, size, scratch):
    return _map_read(path, size, mmap.MAP_PRIVATE)


def d_madvise_willneed(path, size, scratch):
    if not size:
        return {"skipped": "empty file"}
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            return {"mmap": ename(ctypes.get_errno())}
        try:
            rc = _libc.madvise(addr, -(-size // PAGE) * PAGE, MADV_WILLNEED)
            got = {"madvise": 0 if rc == 0 else ename(ctypes.get_errno()),
                   "resident_after": runs(settled(path))}
            got["pieces"] = [(0, size, ctypes.string_at(addr, size))]
            return got
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def d_fault_after_dontneed(path, size, scratch):
    """Fill, drop with fadvise(DONTNEED), then fault every page in through a mapping."""
    if not size:
        return {"skipped": "empty file"}
    fd = os.open(path, os.O_RDONLY)
    try:
        _pieces_read(fd, size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        after_drop = runs(resident(path))
    finally:
        os.close(fd)
    got = _map_read(path, size, mmap.MAP_SHARED)
    got["resident_after_dontneed"] = after_drop
    return got


def _pipe(size=1 << 20):
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w


def _drain(fd_or_sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        left = n - len(out)
        b = fd_or_sock.recv(left) if isinstance(fd_or_sock, socket.socket) else os.read(fd_or_sock, left)
        if not b:
            break
        out += b
    return bytes(out)


def _loop(size, step, one):
    """Call one(off, count) -> bytes until it returns nothing; an errno ends it too."""
    out, off, calls = bytearray(), 0, 0
    while True:
        try:
            b = one(off, step)
        except OSError as e:
            return {"error": ename(e.errno), "pieces": [(0, size, bytes(out))] if out else []}
        calls += 1
        if not b:
            break
        out += b
        off += len(b)
    return {"pieces": [(0, size, bytes(out))]}


SYS_CACHESTAT = 451           # x86_64, Linux 6.5+


def cached_pages(fd: int) -> int | str:
    """cachestat(2) of the whole file: pages in the page cache of the fd's own mapping
    (file->f_mapping: for a shared file the member inode's, not the shared one)."""
    rng = struct.pack("<QQ", 0, 0)
    out = ctypes.create_string_buffer(40)
    rc = _libc.syscall(SYS_CACHESTAT, ctypes.c_uint(fd), ctypes.c_char_p(rng), out, ctypes.c_uint(0))
    if rc != 0:
        return ename(ctypes.get_errno())
    return struct.unpack_from("<Q", out.raw, 0)[0]


def d_splice_pipe(path, size, scratch):
    """Splice the file into a pipe; then fadvise(DONTNEED) and ask cachestat(2) what the fd's
    own mapping still caches."""
    fd = os.open(path, os.O_RDONLY)
    r, w = _pipe()
    try:
        got = _loop(size, 65536, lambda off, n: _drain(r, os.splice(fd, w, n, offset_src=off)))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got["cached_after_dontneed"] = cached_pages(fd)
        return got
    finally:
        for x in (fd, r, w):
            os.close(x)


def d_splice_socket(path, size, scratch):
    """file -> pipe -> socket (splice needs a pipe on one end), read from the socket's peer."""
    fd = os.open(path, os.O_RDONLY)
    r, w = _pipe()
    a, b = socket.socketpair()
    try:
        def one(off, n):
            got = os.splice(fd, w, n, offset_src=off)
            left = got
            while left:
                left -= os.splice(r, a.fileno(), left)
            return _drain(b, got)
        return _loop(size, 32768, one)
    finally:
        for x in (fd, r, w):
            os.close(x)
        a.close()
        b.close()


def d_sendfile_pipe(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    r, w = _pipe()
    try:
        return _loop(size, 65536, lambda off, n: _drain(r, os.sendfile(w, fd, off, n)))
    finally:
        for x in (fd, r, w):
            os.close(x)


def d_sendfile_socket(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    a, b = socket.socketpair()
    try:
        return _loop(size, 32768, lambda off, n: _drain(b, os.sendfile(a.fileno(), fd, off, n)))
    finally:
        os.close(fd)
        a.close()
        b.close()


def d_copy_file_range(path, size, scratch: Path):
    """Out of the file into a file on another filesystem (erofs is read-only: there is no
    other place to copy to)."""
    fd = os.open(path, os.O_RDONLY)
    out_path = scratch / "cfr.out"
    out = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            n = os.copy_file_range(fd, out, max(size, 1), 0, 0)
        except OSError as e:
            return {"copy_file_range": ename(e.errno)}
        return {"copy_file_range": n, "pieces": [(0, size, os.pread(out, n, 0))]}
    finally:
        os.close(fd)
        os.close(out)
        out_path.unlink()


def _seek(fd, off, whence):
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return ename(e.errno)


def d_lseek(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        got = {"SET 5": _seek(fd, 5, os.SEEK_SET), "CUR +7": _seek(fd, 7, os.SEEK_CUR),
               "END -3": _seek(fd, -3, os.SEEK_END), "END +10": _seek(fd, 10, os.SEEK_END),
               "SET -1": _seek(fd, -1, os.SEEK_SET)}
        for o in _offsets(size):
            got[f"DATA {o}"] = _seek(fd, o, os.SEEK_DATA)
            got[f"HOLE {o}"] = _seek(fd, o, os.SEEK_HOLE)
        return got
    finally:
        os.close(fd)


def d_readahead(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        rc = _libc.syscall(SYS_READAHEAD, ctypes.c_int(fd), ctypes.c_long(0), ctypes.c_size_t(max(size, 1)))
        return {"readahead": 0 if rc == 0 else ename(ctypes.get_errno()), "resident_after": runs(settled(path))}
    finally:
        os.close(fd)


def _fadvise(fd, advice):
    try:
        os.posix_fadvise(fd, 0, 0, advice)
        return 0
    except OSError as e:
        return ename(e.errno)


def d_fadvise_willneed(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"fadvise": _fadvise(fd, os.POSIX_FADV_WILLNEED), "resident_after": runs(settled(path))}
    finally:
        os.close(fd)


def d_fadvise_dontneed(path, size, scratch):
    """Fill, then DONTNEED: nothing may stay resident (no page is mapped or dirty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _pieces_read(fd, size)
        before = runs(resident(path))
        rc = _fadvise(fd, os.POSIX_FADV_DONTNEED)
        return {"resident_before": before, "fadvise": rc, "resident_after": runs(resident(path))}
    finally:
        os.close(fd)


def d_fadvise_noreuse(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        rc = _fadvise(fd, POSIX_FADV_NOREUSE)
        got = {"fadvise": rc, "pieces": _pieces_read(fd, size)}
        got["resident_after"] = runs(resident(path))
        return got
    finally:
        os.close(fd)


def d_o_direct(path, size, scratch):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return {"open": ename(e.errno)}
    try:
        length = max(-(-size // PAGE) * PAGE, PAGE)
        buf = mmap.mmap(-1, length)             # page-aligned for direct I/O
        try:
            n = os.preadv(fd, [buf], 0)
            return {"open": 0, "pieces": [(0, size, bytes(buf[:n]))]}
        except OSError as e:
            return {"open": 0, "read": ename(e.errno)}
        finally:
            buf.close()
    finally:
        os.close(fd)


def d_fstat(path, size, scratch):
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                                         "st_blocks", "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}


_STATX_FIELDS = (("mask", 0, "I"), ("blksize", 4, "I"), ("attributes", 8, "Q"), ("nlink", 16, "I"),
                 ("uid", 20, "I"), ("gid", 24, "I"), ("mode", 28, "H"), ("ino", 32, "Q"), ("size", 40, "Q"),
                 ("blocks", 48, "Q"), ("attributes_mask", 56, "Q"), ("btime", 80, "q"), ("mtime", 112, "q"),
                 ("dev_major", 136, "I"), ("dev_minor", 140, "I"), ("mnt_id", 144, "Q"),
                 ("dio_mem_align", 152, "I"), ("dio_offset_align", 156, "I"))
PER_MOUNT = frozenset({"dev_major", "dev_minor", "mnt_id"})   # differ between any two mounts


def statx(path, mask=STATX_BASIC_STATS | STATX_BTIME | STATX_DIOALIGN) -> dict:
    buf = ctypes.create_string_buffer(256)
    rc = _libc.syscall(SYS_STATX, ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(path)), ctypes.c_int(0),
                       ctypes.c_uint(mask), buf)
    if rc != 0:
        raise _oserr(f"statx {path}")
    return {name: struct.unpack_from("<" + f, buf.raw, off)[0] for name, off, f in _STATX_FIELDS}


def d_statx(path, size, scratch):
    return {k: v for k, v in statx(path).items() if k not in PER_MOUNT}


def _ioctl(path, req, arg):
    fd = os.open(path, os.O_RDONLY)
    try:
        return fcntl.ioctl(fd, req, arg)
    finally:
        os.close(fd)


def d_ioctl_getflags(path, size, scratch):
    try:
        return {"flags": hex(struct.unpack("<q", _ioctl(path, FS_IOC_GETFLAGS, bytes(8)))[0])}
    except OSError as e:
        return {"flags": ename(e.errno)}


def d_ioctl_getfslabel(path, size, scratch):
    try:
        return {"label": _ioctl(path, FS_IOC_GETFSLABEL, bytes(256)).rstrip(b"\0").decode(errors="replace")}
    except OSError as e:
        return {"label": ename(e.errno)}


def d_ioctl_getfssysfspath(path, size, scratch):
    """The name is per mount (the loop device): the test replaces it with <dev>."""
    try:
        out = _ioctl(path, FS_IOC_GETFSSYSFSPATH, bytes(129))
    except OSError as e:
        return {"sysfs_path": ename(e.errno)}
    return {"sysfs_path": out[1:1 + out[0]].decode(errors="replace")}


def d_ioctl_fiemap(path, size, scratch):
    count = 64
    req = bytearray(struct.pack("<QQIIII", 0, 0xFFFFFFFFFFFFFFFF, 0, 0, count, 0) + bytes(56 * count))
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, req, True)
        finally:
            os.close(fd)
    except OSError as e:
        return {"fiemap": ename(e.errno)}
    n = struct.unpack_from("<I", req, 20)[0]
    ext = []
    for i in range(n):
        logical, physical, length = struct.unpack_from("<QQQ", req, 32 + 56 * i)
        flags = struct.unpack_from("<I", req, 32 + 56 * i + 40)[0]
        ext.append(f"{logical}+{length}@{physical} {flags:#x}")
    return {"extents": ext}


F_SETLEASE, F_GETLEASE = 1024, 1025


def d_setlease(path, size, scratch):
    """A read lease (fcntl F_SETLEASE F_RDLCK), as root on a file opened read-only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            return {"setlease": ename(e.errno)}
        got = {"setlease": 0, "getlease": {fcntl.F_RDLCK: "F_RDLCK"}.get(fcntl.fcntl(fd, F_GETLEASE), "other")}
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return got
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Door:
    name: str
    fops: str                     # the file_operations entry (or VFS path) it reaches
    run: Callable                 # (path, size, scratch dir) -> what a process sees
    fills: bool = False           # leaves what it touched in the page cache: sharing applies


DOORS = [
    Door("read", "read_iter: erofs_file_read_iter / erofs_ishare_file_read_iter", d_read, True),
    Door("pread", "read_iter (positioned)", d_pread, True),
    Door("preadv2", "read_iter (vectored, positioned)", d_preadv2, True),
    Door("preadv2-nowait", "read_iter with IOCB_NOWAIT (kiocb_clone() keeps ki_flags)", d_preadv2_nowait, True),
    Door("mmap-shared", "mmap_prepare: erofs_file_mmap_prepare / mmap: erofs_ishare_mmap", d_mmap_shared, True),
    Door("mmap-private", "mmap (MAP_PRIVATE)", d_mmap_private, True),
    Door("madvise-willneed", "madvise(WILLNEED) -> vfs_fadvise on the vma's file", d_madvise_willneed, True),
    Door("fault-after-dontneed", "fadvise(DONTNEED), then page faults through mmap", d_fault_after_dontneed, True),
    Door("splice-pipe", "splice_read: filemap_splice_read (both)", d_splice_pipe, True),
    Door("splice-socket", "splice_read, then pipe -> socket", d_splice_socket, True),
    Door("sendfile-pipe", "splice_read via do_splice_direct()", d_sendfile_pipe, True),
    Door("sendfile-socket", "splice_read via do_splice_direct()", d_sendfile_socket, True),
    Door("copy_file_range", "vfs_copy_file_range() (no ->copy_file_range in either)", d_copy_file_range),
    Door("lseek", "llseek: erofs_file_llseek / generic_file_llseek", d_lseek),
    Door("readahead", "readahead(2) -> vfs_fadvise(WILLNEED) -> fadvise", d_readahead, True),
    Door("fadvise-willneed", "fadvise: generic_fadvise / erofs_ishare_fadvise", d_fadvise_willneed, True),
    Door("fadvise-dontneed", "fadvise (DONTNEED)", d_fadvise_dontneed),
    Door("fadvise-noreuse", "fadvise (NOREUSE), then read", d_fadvise_noreuse, True),
    Door("o-direct", "open: (none) / erofs_ishare_file_open; read_iter IOCB_DIRECT", d_o_direct),
    Door("fstat", "i_op->getattr: erofs_getattr (the member inode)", d_fstat),
    Door("statx", "i_op->getattr: erofs_getattr (the member inode)", d_statx),
    Door("ioctl-getflags", "FS_IOC_GETFLAGS: do_vfs_ioctl() -> vfs_fileattr_get()", d_ioctl_getflags),
    Door("ioctl-getfslabel", "unlocked_ioctl: erofs_ioctl / (none)", d_ioctl_getfslabel),
    Door("ioctl-getfssysfspath", "FS_IOC_GETFSSYSFSPATH: do_vfs_ioctl()", d_ioctl_getfssysfspath),
    Door("ioctl-fiemap", "FS_IOC_FIEMAP: ioctl_fiemap() -> i_op->fiemap: erofs_fiemap", d_ioctl_fiemap),
    Door("setlease", "setlease: generic_setlease / (none)", d_setlease),
]
BY_NAME = {d.name: d for d in DOORS}

# erofs_file_fops vs erofs_ishare_fops (fs/erofs/data.c, ishare.c of 7.2): each entry of either,
# and the doors that go through it (tests/unit checks every entry has one).
FOPS_ENTRIES = {
    "open": ("o-direct", "read"),
    "release": ("read",),
    "llseek": ("lseek",),
    "read_iter": ("read", "pread", "preadv2", "preadv2-nowait", "o-direct"),
    "mmap": ("mmap-shared", "mmap-private", "madvise-willneed", "fault-after-dontneed"),
    "get_unmapped_area": ("mmap-shared",),
    "splice_read": ("splice-pipe", "splice-socket", "sendfile-pipe", "sendfile-socket", "copy_file_range"),
    "fadvise": ("fadvise-willneed", "fadvise-dontneed", "fadvise-noreuse", "readahead", "madvise-willneed"),
    "unlocked_ioctl": ("ioctl-getfslabel", "ioctl-getflags", "ioctl-getfssysfspath", "ioctl-fiemap"),
    "compat_ioctl": ("ioctl-getfslabel",),
    "setlease": ("setlease",),
}
# Paths that reach the member inode, not a file_operations entry.
INODE_PATHS = {"i_op->getattr": ("fstat", "statx")}


# ------------------------------------------------------------------ comparing
def summary(value) -> str:
    """A short, comparable text of one observed value (bytes by length and digest)."""
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()[:12]}"
    if isinstance(value, list):
        return "[" + ", ".join(summary(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(summary(v) for v in value) + ")"
    return str(value)


def manifest_errors(seen: dict, want: bytes) -> list[str]:
    """Each piece (offset, requested, bytes) against the image's bytes of that file."""
    out = []
    for off, req, got in seen.get("pieces", []):
        if isinstance(got, str):
            continue                       # an errno; the twin comparison judges it
        exp = want[off:off + req]
        if got != exp:
            first = next((i for i, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp)))
            out.append(f"at offset {off}: {len(got)} bytes, the image has {len(exp)}; first difference at "
                       f"+{first}")
    if seen.get("past_eof_zero") is False:
        out.append("bytes past EOF in the last mapped page are not zero")
    return out


RA_PAGES = 32     # VM_READAHEAD_PAGES: the default bdi's ra_pages (128 KiB)


def _generic_seek(key: str, value, size: int) -> bool:
    """generic_file_llseek()'s answer: the whole file is data, the only hole is at EOF."""
    what, off = key.split()
    off = int(off)
    if off >= size:
        return value == "ENXIO"
    return value == (off if what == "DATA" else size)


def _head_only(key: str, value, size: int) -> bool:
    """Resident: the first min(pages, RA_PAGES) pages, nothing else."""
    n = min(-(-size // PAGE), RA_PAGES)
    return value == ("0" if n == 1 else f"0-{n - 1}")


@dataclass(frozen=True)
class TwinRule:
    """A difference between a shared file and its twin that a rule of the kernel explains. It
    applies to keys matching `keys` of the doors named, and only where `holds(key, shared value,
    size)` says the shared side shows exactly what the rule predicts."""

    name: str
    says: str
    kernel: str                   # the kernel function that makes the difference
    doors: tuple[str, ...]
    keys: str                     # the observed keys it explains (a regular expression)
    holds: Callable               # (key, shared value, file size) -> bool
    suspect: str = ""             # why it may be a kernel bug rather than design


TWIN_RULES = (
    TwinRule("NO_DIRECT_IO", "open(O_DIRECT) of a shared file is EINVAL; the twin opens it and reads",
             "erofs_ishare_file_open", ("o-direct",), "open|pieces|read",
             lambda k, v, n: (v == "EINVAL") if k == "open" else v == "(absent)"),
    TwinRule("NO_IOCTL", "erofs_ishare_fops has no unlocked_ioctl: FS_IOC_GETFSLABEL is ENOTTY on a shared "
             "file, erofs_ioctl answers the twin", "erofs_ishare_fops (no .unlocked_ioctl)",
             ("ioctl-getfslabel",), "label", lambda k, v, n: v == "ENOTTY"),
    TwinRule("NO_SETLEASE", "erofs_ishare_fops has no setlease: F_SETLEASE is EINVAL on a shared file, "
             "generic_setlease grants the twin its lease", "kernel_setlease (no .setlease in erofs_ishare_fops)",
             ("setlease",), "setlease|getlease",
             lambda k, v, n: (v == "EINVAL") if k == "setlease" else v == "(absent)",
             suspect="erofs_file_fops got .setlease = generic_setlease when leases became opt-in; "
                     "erofs_ishare_fops did not, so a shared file refuses leases its twin grants"),
    TwinRule("GENERIC_SEEK", "SEEK_DATA/SEEK_HOLE on a shared file are generic_file_llseek's (all data, the "
             "only hole at EOF); the twin's erofs_file_llseek asks iomap and finds the holes of a "
             "chunk-indexed file", "erofs_ishare_fops.llseek = generic_file_llseek",
             ("lseek",), r"(DATA|HOLE) \d+", _generic_seek,
             suspect="holes of a shared chunk-indexed file are invisible to SEEK_HOLE/SEEK_DATA"),
    TwinRule("RA_BDI", "fadvise/madvise WILLNEED and readahead(2) on a shared file read ahead at most "
             "ra_pages (128 KiB): force_page_cache_ra() takes its limit from the shared inode's bdi, the "
             "anonymous superblock's (super_setup_bdi() in erofs_init_ishare(): io_pages 0), not the "
             "member's device", "force_page_cache_ra, erofs_init_ishare",
             ("madvise-willneed", "readahead", "fadvise-willneed"), "resident_after|resident", _head_only,
             suspect="WILLNEED on a shared file brings in 128 KiB where the twin's device brings in "
                     "up to its io_pages (here 1.25 MiB)"),
    TwinRule("SPLICE_OWN_CACHE", "splice, sendfile and copy through erofs_ishare_fops.splice_read = "
             "filemap_splice_read on the member file: it reads through the member inode's own mapping "
             "(erofs_fill_inode() gives every member the real aops), so nothing lands in the shared page "
             "cache (the bytes are right)", "filemap_splice_read, erofs_fill_inode",
             ("splice-pipe", "splice-socket", "sendfile-pipe", "sendfile-socket"), "resident|cached_after_dontneed",
             lambda k, v, n: v == "none" if k == "resident" else v == -(-n // PAGE),
             suspect="every member splices through a private page cache: I/O once per member, and "
                     "pages fadvise(DONTNEED) on the shared file cannot drop (cached_after_dontneed: "
                     "cachestat(2) of the member's own mapping still counts every page)"),
)


def twin_rule(door: str, key: str, shared_value, size: int) -> TwinRule | None:
    for r in TWIN_RULES:
        if door in r.doors and re.fullmatch(r.keys, key) and r.holds(key, shared_value, size):
            return r
    return None


@dataclass
class Verdict:
    """One door on one file shape: what the shared file and its twin saw, and the judgement."""

    door: str
    shape: str
    layout: str
    shared_file: bool             # the file has erofs_ishare_fops
    shared: dict
    twin: dict
    differs: list                 # [(key, shared summary, twin summary, rule name or None)]
    manifest: list                # [(who, error)]
    sharing: str = ""             # the sharing check's result ("" when not meaningful)

    @property
    def unexplained(self) -> list:
        return [d for d in self.differs if d[3] is None]

    def result(self) -> str:
        """The table cell: what the door did on the shared file."""
        if self.manifest:
            return "WRONG DATA: " + "; ".join(f"{w}: {e}" for w, e in self.manifest)
        if self.unexplained:
            return "DIFFERS from twin: " + "; ".join(f"{k}: {s} / twin {t}" for k, s, t, _ in self.unexplained)
        parts = [headline(self.door, self.shared)]
        parts += [f"{k}: {s} (twin: {t}; rule {r})" for k, s, t, r in self.differs
                  if not (self.sharing.startswith("NOT SHARED (rule") and k == "resident")]
        if self.sharing:
            parts.append(self.sharing)
        if not self.shared_file:
            parts.append("own (no digest)")
        return "; ".join(parts)


def headline(door: str, seen: dict) -> str:
    if "skipped" in seen:
        return f"(not called: {seen['skipped']})"
    errs = [p[2] for p in seen.get("pieces", []) if isinstance(p[2], str)]
    if errs:
        return f"{'/'.join(sorted(set(errs)))} ({len(errs)} of {len(seen['pieces'])} calls)"
    if "pieces" in seen and "error" not in seen:
        return "= image"
    for k in ("open", "setlease", "fadvise", "readahead", "madvise", "copy_file_range", "label", "flags",
              "sysfs_path", "error"):
        if k in seen:
            return f"{k} {seen[k]}"
    return "= twin"


def compare(door: str, shape: str, layout: str, shared_file: bool, shared: dict, twin: dict,
            want: bytes, normalize: Callable[[str, object, str], object] | None = None) -> Verdict:
    """The twin oracle: every key either saw, equal after `normalize(key, value, who)` (per-mount
    names), or explained by a TWIN_RULES rule; and every piece of data equal to the image's."""
    differs = []
    for key in sorted(set(shared) | set(twin)):
        s, t = shared.get(key, "(absent)"), twin.get(key, "(absent)")
        if normalize:
            s, t = normalize(key, s, "shared"), normalize(key, t, "twin")
        if summary(s) != summary(t) or s != t:
            r = twin_rule(door, key, s, len(want)) if shared_file else None
            differs.append((key, summary(s), summary(t), r.name if r else None))
    manifest = [(who, e) for who, seen in (("shared", shared), ("twin", twin)) for e in manifest_errors(seen, want)]
    return Verdict(door, shape, layout, shared_file, shared, twin, differs, manifest)
