"""What the kernel does with bad or unlucky daemon replies (docs/protocol.md: copen, READ_COMPLETE,
anon fds, restore).

COPEN_CASES: the reply to OPEN (negative errnos, hex/octal sizes parsed with base 0, malformed
copens, unknown ids, the same id twice, the anon fd closed before the copen, EMFILE while the
OPEN's fd is installed) -> what mount(2) returns and what the daemon's writes got.
IO_CASES: READ_COMPLETE with wrong ids or ioctls, unaligned or DIO-misaligned anon-fd writes, a
READ answered without data, a slow READ, the anon fd closed right after the copen.

The daemon fills READs exactly (--fill-granularity 4096), so data stays uncached until read.
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from erofs_domains.base.proc import wait_for
from erofs_domains.guest.fscache.faults import (
    Reader,
    Row,
    errname,
    errnames,
    fscache_stats,
    stat_delta,
)
from erofs_domains.guest.kernel_features import detect
from erofs_domains.guest.mounts import MountError
from erofs_domains.guest.observe.cachedir import CacheDirListing, predict_path

SHARED_DAEMON_ARGS = ["--fill-granularity", "4096"]
SHARED_CACHE_MIB = 64

OPEN_FAILED = (errno.ENOBUFS, errno.EIO)  # racy between the two: docs/domains.md#when-a-mount-fails
BIG = "/large/large-0.bin"  # 300 KB of plain data blocks: READs happen only when it is read
CONTROL = "/deep/d1/d2/d3/d4/bottom.txt"


# --------------------------------------------------------------------------- copen

@dataclass(frozen=True)
class CopenCase:
    id: str
    what: str
    fault: Callable  # (control, cookie) -> None
    mount: tuple[int, ...] = ()  # () = the mount works; else the errnos allowed
    writes: tuple[int, ...] | None = (0,)  # errnos of the daemon's write()s for the OPEN; None: no OPEN
    object_size: str | int | None = None  # xattr object_size after umount ("blob" = the blob's size)
    retry: bool = False  # after the failure, the same fsid mounts fine
    rule: str = "fscache_backend"  # erofs_domains/guest/kernel_features.py RULES: where this case applies

    def expected(self) -> str:
        w = "" if self.writes is None else "write(copen) " + " then ".join(errname(e) for e in self.writes) + "; "
        m = "mount works" if not self.mount else f"mount fails {errnames(self.mount)}"
        if self.object_size is not None:
            m += f", object_size {self.object_size}"
        if self.retry:
            m += "; a retry of the same fsid mounts"
        return w + m


def raw(text: str, fallback: bool = True):
    return lambda c, cookie: c.copen_raw(text, cookie=cookie, once=True, fallback=fallback)


COPEN_CASES = [
    CopenCase("errno-enoent", "copen with -ENOENT", lambda c, k: c.fail_open("ENOENT", cookie=k, once=True),
              mount=OPEN_FAILED, retry=True),
    CopenCase("errno-4095", "copen with -4095 (the largest errno)", lambda c, k: c.fail_open(4095, cookie=k, once=True),
              mount=OPEN_FAILED),
    CopenCase("size-below-4095", "copen size -4096 (below the errno range)", raw("copen {id},-4096"),
              mount=OPEN_FAILED, writes=(errno.EINVAL,)),
    CopenCase("size-not-a-number", "copen size `abc`", raw("copen {id},abc"), mount=OPEN_FAILED,
              writes=(errno.EINVAL,)),
    CopenCase("size-hex", "copen size in hex (`0x...`)", raw("copen {id},0x{size:x}"), object_size="blob"),
    CopenCase("size-010", "`copen <id>,010` (base 0: octal 8)", raw("copen {id},010"), object_size=8),
    CopenCase("no-comma", "copen without `,<size>` (OPEN stays queued; the daemon answers again)",
              raw("copen {id}"), writes=(errno.EINVAL, 0)),
    CopenCase("unknown-id", "copen for an unknown msg_id (OPEN stays queued)", raw("copen 4000000000,{size}"),
              writes=(errno.EINVAL, 0)),
    CopenCase("id-not-a-number", "copen with msg_id `x1`", raw("copen x1,{size}"), writes=(errno.EINVAL, 0)),
    CopenCase("same-id-twice", "copen sent twice for one OPEN",
              lambda c, k: c.copen_twice(cookie=k), writes=(0, errno.EINVAL)),
    CopenCase("anon-fd-closed-first", "anon fd closed before the copen (OPEN fails EBADFD)",
              lambda c, k: c.close_anon_before_copen(cookie=k), mount=OPEN_FAILED, retry=True),
    CopenCase("emfile", "no free fd in the daemon when the OPEN is read (EMFILE)", lambda c, k: c.emfile(),
              mount=OPEN_FAILED, writes=None, retry=True),
]


@pytest.mark.parametrize("case", COPEN_CASES, ids=lambda c: c.id)
def test_copen(case: CopenCase, fault_env, tiny_images, kmsg, require):
    require.rule(case.rule)
    image = tiny_images.single("replies")
    fsid = fault_env.serve(image)
    if case.writes is None:
        fault_env.control.wait_idle(timeout=10, quiet=0.5)  # the fault hits the next read(): let stray CLOSEs pass
    case.fault(fault_env.control, fsid)
    try:
        m = fault_env.mounts.mount_erofs(fsid)
        err = 0
    except MountError as e:
        m, err = None, e.errno
        failure = str(e)
    fault_env.control.wait_idle(timeout=10)  # a failed OPEN returns mount(2) before the daemon logged it
    opens = [r for r in fault_env.requests("OPEN") if r["cookie_key"] == fsid]
    if case.mount:
        assert err in case.mount, (
            f"{case.id} ({case.what}): mount should fail with {errnames(case.mount)}, got {errname(err)}\n"
            + fault_env.render())
    else:
        assert not err, f"{case.id} ({case.what}): mount should work: {failure}\n{fault_env.render()}"
    if case.writes is None:
        assert not opens, f"{case.id}: the OPEN should never reach the daemon\n{fault_env.render()}"
        reads = [r for r in fault_env.requests("DEVICE_READ")]
        assert [r["errno"] for r in reads] == [errno.EMFILE], (
            f"{case.id}: expected one failed read() of the device with EMFILE\n{fault_env.render()}")
    else:
        assert opens, f"{case.id}: no OPEN for {fsid}\n{fault_env.render()}"
        got = tuple(opens[0].get("write_errnos") or ())
        assert got == case.writes, (
            f"{case.id} ({case.what}): the daemon's writes {opens[0]['reply']!r} should give "
            f"{[errname(e) for e in case.writes]}, got {[errname(e) for e in got]}\n{fault_env.render()}")
    if m is not None:
        mismatches = [p for p in (CONTROL, "/small/with space.txt")
                      if hashlib.sha256((m.path / p.lstrip("/")).read_bytes()).hexdigest() != image.manifest[p].sha256]
        assert not mismatches, f"{case.id}: wrong content in {mismatches}"
        fault_env.mounts.umount(m)
    if case.object_size is not None:
        fault_env.control.wait_idle(timeout=10)
        want = image.blobs[image.fsid].size if case.object_size == "blob" else case.object_size
        path = predict_path(f"erofs,{fsid}", fsid.encode())
        listing = CacheDirListing.scan(fault_env.cache_dir)
        f = listing.file(path)
        assert f is not None and f.xattr is not None, f"{case.id}: no committed cache file {path}\n{listing.render()}"
        assert f.xattr.object_size == want, (
            f"{case.id}: the copen {opens[0]['reply']!r} must store object_size {want} (kstrtol base 0), "
            f"the xattr says {f.xattr.object_size}\n{listing.render()}")
    if case.retry:
        m2 = fault_env.mounts.mount_erofs(fsid)
        assert (m2.path / CONTROL.lstrip("/")).read_bytes() == b"bottom\n"
        fault_env.mounts.umount(m2)


# --------------------------------------------------------------------------- READ / anon fd

@dataclass
class IoCtx:
    fault_env: object
    image: object
    fsid: str
    mount: object

    def expected(self, path: str) -> str:
        return self.image.manifest[path].sha256


def sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _held_read(ctx: IoCtx, fsid: str, path) -> tuple[Reader, int]:
    """Start a reader of an uncached file while the daemon holds its READ back."""
    ctx.fault_env.control.fail_read("ignore", cookie=fsid, once=True)
    r = Reader(path)
    r.start()
    ids = wait_for(lambda: ctx.fault_env.control.status()["ignored"], timeout=30, what="the daemon to hold a READ back")
    return r, ids[0]


def io_bad_ioctl(ctx: IoCtx) -> dict:
    reader, msg_id = _held_read(ctx, ctx.fsid, ctx.mount.path / BIG.lstrip("/"))
    c = ctx.fault_env.control
    got = {
        "READ_COMPLETE, unknown msg_id": c.probe_read_complete(ctx.fsid, msg_id + 100000),
        "other ioctl cmd (_IOW(0x98, 2, int))": c.probe_read_complete(ctx.fsid, msg_id, ioctl_cmd=0x40049802),
    }
    served = c.serve_ignored()["served"]
    assert served == [msg_id], (
        f"RULE BROKEN: bad READ_COMPLETE ioctls must fail and leave READ {msg_id} pending; got "
        + ", ".join(f"{k}: {errname(v)}" for k, v in got.items())
        + f"; the daemon found {served} still to serve\n{ctx.fault_env.render()}")
    reader.join(30)
    assert sha(reader.result.data) == ctx.expected(BIG), (
        f"after the bad ioctls the held READ must complete with the right data: {reader.result}")
    return got


def io_other_object(ctx: IoCtx) -> dict:
    other = ctx.fault_env.serve(ctx.image)
    m2 = ctx.fault_env.mounts.mount_erofs(other)
    reader, msg_id = _held_read(ctx, other, m2.path / BIG.lstrip("/"))
    c = ctx.fault_env.control
    got = {"READ_COMPLETE on another object's anon fd": c.probe_read_complete(ctx.fsid, msg_id)}
    served = c.serve_ignored()["served"]
    assert served == [msg_id], (
        f"RULE BROKEN: READ_COMPLETE on another object's anon fd must fail EINVAL and leave READ "
        f"{msg_id} of {other} pending (cachefiles_ondemand_fd_ioctl() checks req->object, "
        f"CVE-2024-41075); the ioctl gave {errname(got[next(iter(got))])} and the daemon found "
        f"{served} still to serve\n{ctx.fault_env.render()}")
    reader.join(30)
    assert sha(reader.result.data) == ctx.expected(BIG), f"held READ of {other}: {reader.result}"
    return got


def io_unaligned_pwrite(ctx: IoCtx) -> dict:
    before = fscache_stats()
    r = ctx.fault_env.control.probe_pwrite(ctx.fsid, 512, 4096)
    if detect().holds("unaligned_write_refused"):  # and counted as IO mis= (6.1 has neither)
        mis = stat_delta(before, fscache_stats(), "IO", "mis")
        assert mis >= 1, f"rule unaligned_write_refused: an unaligned anon-fd write counts in IO mis=, delta {mis}"
    return {"pwrite at offset 512": r["errno"]}


def io_misaligned_length(ctx: IoCtx) -> dict:
    r = ctx.fault_env.control.probe_pwrite(ctx.fsid, 64 << 10, 1000)
    return {"pwrite of 1000 bytes (direct I/O)": r["errno"]}


def io_no_data(ctx: IoCtx) -> dict:
    ctx.fault_env.control.fail_read("skip_data", cookie=ctx.fsid, once=True)
    big = ctx.mount.path / BIG.lstrip("/")
    first = Reader(big, 128 << 10, 4096)
    first.run()
    assert (ctx.mount.path / CONTROL.lstrip("/")).read_bytes() == b"bottom\n", "another file after the failed READ"
    again = Reader(big)
    again.run()
    assert sha(again.result.data) == ctx.expected(BIG), f"a re-read after the failed READ must succeed: {again.result}"
    return {"read of the range answered without data": first.result.errno or 0,
            "re-read of the whole file": again.result.errno or 0}


def io_slow_read(ctx: IoCtx) -> dict:
    ctx.fault_env.control.delay(2.0, op="READ", cookie=ctx.fsid, once=True)
    r = Reader(ctx.mount.path / BIG.lstrip("/"))
    r.run()
    assert r.result.seconds >= 1.9, f"the READ was delayed 2 s but the read took {r.result.seconds:.2f} s"
    assert sha(r.result.data) == ctx.expected(BIG)
    return {"read of a 2 s slow READ": r.result.errno or 0}


@dataclass(frozen=True)
class IoCase:
    id: str
    what: str
    run: Callable[[IoCtx], dict]
    expected: dict  # description -> errno (0 = success)
    rule: str = "fscache_backend"  # erofs_domains/guest/kernel_features.py RULES: where this case applies
    varies: str = ""  # a rule: `expected` where it holds, `otherwise` elsewhere
    otherwise: dict | None = None

    def expected_on(self, features) -> dict:
        return self.expected if not self.varies or features.holds(self.varies) else self.otherwise

    def text(self) -> str:
        out = "; ".join(f"{k}: {errname(v)}" for k, v in self.expected.items())
        if self.varies:
            out += f" (rule {self.varies}; elsewhere " + "; ".join(
                f"{k}: {errname(v)}" for k, v in self.otherwise.items()) + ")"
        return out


IO_CASES = [
    IoCase("read-complete-bad-ids", "READ_COMPLETE with an unknown msg_id, and another ioctl", io_bad_ioctl,
           {"READ_COMPLETE, unknown msg_id": errno.EINVAL, "other ioctl cmd (_IOW(0x98, 2, int))": errno.EINVAL}),
    IoCase("read-complete-other-object", "READ_COMPLETE for a READ of another object", io_other_object,
           {"READ_COMPLETE on another object's anon fd": errno.EINVAL},
           rule="read_complete_object_check"),
    IoCase("pwrite-unaligned", "anon-fd pwrite at offset 512", io_unaligned_pwrite,
           {"pwrite at offset 512": errno.ENOBUFS}, varies="unaligned_write_refused",
           otherwise={"pwrite at offset 512": 0}),
    IoCase("pwrite-1000-bytes", "anon-fd pwrite of 1000 bytes (not a multiple of the logical block size)",
           io_misaligned_length, {"pwrite of 1000 bytes (direct I/O)": errno.EINVAL}),
    IoCase("read-without-data", "READ completed without writing data", io_no_data,
           {"read of the range answered without data": errno.EIO, "re-read of the whole file": 0}),
    IoCase("read-slow", "READ answered after 2 s", io_slow_read, {"read of a 2 s slow READ": 0}),
]


@pytest.mark.parametrize("case", IO_CASES, ids=lambda c: c.id)
def test_read_faults(case: IoCase, fault_env, tiny_images, kmsg, require, features):
    require.rule(case.rule)
    image = tiny_images.single("replies")
    fsid = fault_env.serve(image)
    m = fault_env.mounts.mount_erofs(fsid)
    ctx = IoCtx(fault_env, image, fsid, m)
    got = case.run(ctx)
    want = case.expected_on(features)
    assert got == want, (
        f"{case.id} ({case.what}" + (f"; rule {case.varies} {'holds' if want is case.expected else 'does not hold'} "
                                     f"on {features.release}" if case.varies else "") + "):\n" + "\n".join(
            f"  {k}: expected {errname(v)}, got {errname(got.get(k))}" for k, v in want.items())
        + "\n" + fault_env.render())


# --------------------------------------------------------------------------- anon fd closed early

def test_anon_fd_closed_after_copen(fault_env, tiny_images, features, kmsg):
    """The daemon closes the anon fd right after its copen (one-shot). Where rule
    reopen_closed_object holds (6.8; 6.1.95, 6.6.35) the READ that follows makes the kernel re-open
    the object (a new OPEN, new object_id and fd) and the mount and reads work; elsewhere the
    READ fails (EIO, "anonymous fd closed prematurely")."""
    image = tiny_images.single("replies")
    fsid = fault_env.serve(image)
    fault_env.control.close_anon_early(cookie=fsid)
    if not features.reopens_closed_objects:
        with pytest.raises(MountError) as e:
            fault_env.mounts.mount_erofs(fsid)
        assert e.value.errno in OPEN_FAILED, str(e.value)
        return
    t0 = time.monotonic()
    m = fault_env.mounts.mount_erofs(fsid)
    opens = [r for r in fault_env.requests("OPEN") if r["cookie_key"] == fsid]
    assert len(opens) == 2 and opens[0]["object_id"] != opens[1]["object_id"], (
        f"expected the closed object to be re-opened once (two OPENs, new object_id)\n{fault_env.render()}")
    assert opens[0]["fault"] == "close_anon_early" and not opens[1]["fault"], fault_env.render()
    assert sha((m.path / BIG.lstrip("/")).read_bytes()) == image.manifest[BIG].sha256
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------------- README rows

OUTCOMES = (
    [Row("daemon replies", c.what, c.expected(), c.rule) for c in COPEN_CASES]
    + [Row("daemon replies", c.what, c.text(), c.rule) for c in IO_CASES]
    + [Row("daemon replies", "anon fd closed right after the copen",
           "a new OPEN (new object_id), mount and reads work (rule reopen_closed_object; elsewhere the mount "
           "fails EIO/ENOBUFS)")]
)

