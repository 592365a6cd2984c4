"""Lifetimes beyond the open file: a mapping kept after close(), after drop_caches, after a lazy
unmount, in a forked child after the parent unmounted; a pipe holding spliced pages after the
source is closed and unmounted. Each scenario runs on a shared file (the only member of its
domain, so its shared inode dies with it) and on its unshared twin, step by step; the steps
must read the same, the bytes must be the image's, and afterwards a new member of the domain
finds nothing resident (the shared inode did not outlive what held it). The kernel-log check
(oops, KASAN, WARN) and the leak check run after each test (tests/pagecache/conftest.py).

What keeps the shared inode alive here: erofs_ishare_mmap() puts the backing file (`realfile`)
in the vma (vma_set_file()); the backing file holds the member's path (backing_file_set_user_path()
with path_get()), so the member dentry, its inode and, through erofs_ishare_free_inode() not yet
run, the shared inode. A pipe holds page references only (page_cache_pipe_buf_confirm())."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os

import pytest
from tabulate import tabulate

from erofs_domains.base.proc import cmd
from erofs_domains.guest.mounts import MNT_DETACH, sys_umount
from erofs_domains.guest.pagecache import doors, probe

FILE = "ra-window+1"
MADV_DONTNEED = 4
LIFETIME_RULE = ("LIFETIME: pages and the shared inode stay valid while anything holds them (a mapping, "
                 "a pipe) and die after; a shared file behaves as its twin (erofs_ishare_mmap, "
                 "erofs_ishare_file_release, erofs_ishare_free_inode)")


def _check(addr, want: bytes) -> str:
    got = ctypes.string_at(addr, len(want))
    if got == want:
        return "= image"
    first = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
    return f"differs from the image at {first}"


def _map(path, size):
    fd = os.open(path, os.O_RDONLY)
    addr = doors._libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, doors.MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    return fd, addr


def _drop_ptes(addr, size):
    """Unmap the pages from this process (the page cache keeps them) so the next touch faults."""
    doors._libc.madvise(addr, -(-size // doors.PAGE) * doors.PAGE, MADV_DONTNEED)


def _umount(path, flags=0) -> str:
    try:
        sys_umount(path, flags)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _forget(pc_mounts, m) -> None:
    """The test unmounted `m` itself (lazily): drop it from the table, free its loop device."""
    pc_mounts.active.remove(m)
    try:
        m.path.rmdir()
    except OSError:
        pass
    if m.loopdev:
        cmd(["losetup", "-d", m.loopdev], check=False)


def _mapping_steps(pc_mounts, m, want) -> list[tuple[str, str]]:
    size, steps = len(want), []
    fd, addr = _map(m.path / FILE, size)
    try:
        steps.append(("read through the mapping", _check(addr, want)))
        os.close(fd)
        steps.append(("after close()", _check(addr, want)))
        probe.drop_caches(2)
        steps.append(("after drop_caches 2 (member inodes not held are evicted)", _check(addr, want)))
        _drop_ptes(addr, size)
        probe.drop_caches(1)
        steps.append(("refault after MADV_DONTNEED + drop_caches 1", _check(addr, want)))
        steps.append(("umount while mapped", _umount(m.path)))
        steps.append(("umount -l while mapped", _umount(m.path, MNT_DETACH)))
        _forget(pc_mounts, m)
        _drop_ptes(addr, size)
        probe.drop_caches(3)
        steps.append(("refault after the lazy umount + drop_caches 3", _check(addr, want)))
    finally:
        doors._libc.munmap(addr, size)
    return steps


def _fork_steps(pc_mounts, m, want) -> list[tuple[str, str]]:
    """The child keeps the mapping; the parent unmaps, closes and unmounts (lazily), then the child
    refaults every page."""
    size = len(want)
    fd, addr = _map(m.path / FILE, size)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: only simple calls, then _exit
        try:
            os.read(go_r, 1)
            _drop_ptes(addr, size)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            os.write(res_w, _check(addr, want).encode())
        finally:
            os._exit(0)
    steps = []
    try:
        doors._libc.munmap(addr, size)
        os.close(fd)
        steps.append(("parent: umount while the child maps it", _umount(m.path)))
        steps.append(("parent: umount -l", _umount(m.path, MNT_DETACH)))
        _forget(pc_mounts, m)
        os.write(go_w, b"x")
        steps.append(("child: refault after drop_caches 3", os.read(res_r, 200).decode() or "(child said nothing)"))
    finally:
        _, status = os.waitpid(pid, 0)
        for x in (go_r, go_w, res_r, res_w):
            os.close(x)
    steps.append(("child exit", f"status {status}"))
    return steps


def _pipe_steps(pc_mounts, m, want) -> list[tuple[str, str]]:
    """Splice the whole file into a pipe, close it, unmount the mount (not lazily: a pipe holds
    pages, not the file), drop every cache, then read the pipe."""
    size = len(want)
    r, w = os.pipe()
    fcntl.fcntl(w, doors.F_SETPIPE_SZ, 1 << 20)
    fd = os.open(m.path / FILE, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            n = os.splice(fd, w, size - off, offset_src=off)
            if not n:
                break
            off += n
        steps = [("spliced", f"{off} bytes")]
        os.close(fd)
        fd = -1
        pc_mounts.umount(m)
        steps.append(("umount with the pages in a pipe", "ok"))
        probe.drop_caches(3)
        got = doors._drain(r, size)
        steps.append(("read the pipe after umount + drop_caches 3",
                      "= image" if got == want else f"{len(got)} bytes, differ from the image"))
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(r)
        os.close(w)
    return steps


SCENARIOS = {"mapping": _mapping_steps, "fork": _fork_steps, "pipe": _pipe_steps}


@pytest.mark.parametrize("layout", ["plain", "lz4"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_held_pages_outlive_the_file_and_the_mount(pc_mounts, pc_images, domain, artifacts, scenario, layout):
    image = pc_images[f"shapes-{layout}"]
    want = image.files[FILE]
    d = domain()
    shared = pc_mounts.mount(image, domain_id=d)
    twin = pc_mounts.mount(image, inode_share=False)
    assert probe.file_ops(shared.path / FILE) == "shared", "the shapes image's file is not shared"
    got_s = SCENARIOS[scenario](pc_mounts, shared, want)
    got_t = SCENARIOS[scenario](pc_mounts, twin, want)
    rows = [(step, s, t) for (step, s), (_, t) in zip(got_s, got_t)]
    bad = [r for r in rows if r[1] != r[2] or ("image" in r[1] and r[1] != "= image")]
    # LIFETIME: with its only member gone, a new member of the domain starts cold
    probe.drop_caches(2)
    fresh = pc_mounts.mount(image, domain_id=d)
    left = doors.runs(doors.resident(fresh.path / FILE))
    (artifacts / "lifetime.json").write_text(json.dumps({"scenario": scenario, "layout": layout, "steps": rows,
                                                        "resident_for_a_new_member": left}, indent=1))
    if bad or len(got_s) != len(got_t) or left != "none":
        pytest.fail(f"door {scenario} ({layout} image), rule {LIFETIME_RULE}\n\n"
                    + tabulate(rows, headers=["step", "shared file", "twin"])
                    + f"\n\nresident for a new member of the domain afterwards: {left} (want none)",
                    pytrace=False)
