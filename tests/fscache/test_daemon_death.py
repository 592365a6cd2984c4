"""The daemon dies (docs/protocol.md#daemon-death, #restore): nothing may hang, nothing may return wrong data.

DEATH_CASES: killed (SIGKILL, SIGTERM, os._exit at the next request) with READs or an OPEN in
flight -> the blocked readers/mount get an error within DEATH_BOUND seconds; uncached data of
the surviving mount then fails (ENOBUFS or EIO: rule death_read_enobufs). The first case goes on:
a new daemon without `restore` does not revive the old mount (the same errno even after it
bound), a remount does.
Then a daemon restart while a shared domain is live (a new member sharing a blob cookie of the
dead cache), and the failover path: an fd holder keeps /dev/cachefiles open, the daemon is
killed with READs in flight, a new one adopts the fd and writes `restore`, and the readers
complete with the right data (rule restore: 6.8, backported to 6.1.95 and 6.6.35).

Every test starts its own daemons on its own cache (they get killed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass

import pytest

from erofs_domains.base.names import unique
from erofs_domains.base.proc import wait_for
from erofs_domains.guest.fscache.cache import wait_withdrawn
from erofs_domains.guest.fscache.faults import (
    Reader,
    Row,
    errname,
    errnames,
    serve,
    table,
)
from erofs_domains.guest.mounts import MountError
from erofs_domains.guest.observe import procfs

FILL = ("--fill-granularity", "4096")  # exact READs: data stays uncached until read
DEATH_BOUND = 15.0  # seconds from the death to the blocked callers' return (TCG is slow)
BIG = "/large/large-0.bin"
CONTROL = "/deep/d1/d2/d3/d4/bottom.txt"
HELD_FILES = (BIG, "/sparse/sparse-0.img", "/links/hard-a")


def sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DeathCase:
    id: str
    what: str
    inflight: str  # read | open
    how: str  # sigkill | sigterm | exit
    expected: tuple[int, ...]  # errnos of the blocked callers
    restart: bool = False  # then: a new daemon without restore, the old mount, a remount
    rule: str = "fscache_backend"  # erofs_domains/guest/kernel_features.py RULES: where this case applies

    def text(self) -> str:
        who = "blocked readers get" if self.inflight == "read" else "the blocked mount gets"
        out = f"{who} {errnames(self.expected)} within {DEATH_BOUND:.0f} s"
        if self.inflight == "read":
            out += "; uncached reads then ENOBUFS (rule death_read_enobufs; before it EIO for folios of the failed " \
                   "readahead)"
        if self.restart:
            out += ("; a new daemon without `restore`: the old mount still gets that errno, "
                    "a remount works (ids restart at 0/1)")
        return out


# The held READs complete with EIO when the dev fd is released (cachefiles_flush_reqs()), but a
# reader usually sees ENOBUFS: after the failed readahead the page cache retries the folio
# through ->read_folio, and by then the cache is gone (fscache_begin_read_operation() on a
# withdrawn cookie). Observed on 6.12.117: SIGKILL and SIGTERM -> ENOBUFS for every reader,
# os._exit at the READ -> EIO. Both are errors within the bound, which is the rule here.
DIED = (errno.EIO, errno.ENOBUFS)

DEATH_CASES = [
    DeathCase("sigkill-reads", "daemon SIGKILLed with three READs held", "read", "sigkill", DIED, restart=True),
    DeathCase("sigterm-reads", "daemon stopped (SIGTERM, closes its fds) with a READ held", "read", "sigterm", DIED),
    DeathCase("exit-at-read", "daemon exits (os._exit) on receiving a READ", "read", "exit", DIED),
    DeathCase("sigkill-open", "daemon SIGKILLed with the mount's OPEN in flight", "open", "sigkill", DIED),
]


def _die(d, how: str) -> None:
    if how == "sigkill":
        d.kill()
    elif how == "sigterm":
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(10)


@pytest.mark.parametrize("case", DEATH_CASES, ids=lambda c: c.id)
def test_daemon_death(case: DeathCase, daemons, plain_mounts, tiny_images, kmsg, features):
    image = tiny_images.single("death")
    d = daemons.start(*FILL)
    fsid = serve(d.control, image)

    if case.inflight == "open":
        d.control.delay(60, op="OPEN", cookie=fsid, once=True)
        box: dict = {}

        def mount():
            try:
                box["mount"] = plain_mounts.mount_erofs(fsid)
            except MountError as e:
                box["error"] = e
            box["t"] = time.monotonic()

        t = threading.Thread(target=mount, daemon=True)
        t.start()
        wait_for(lambda: d.control.status()["counts"]["OPEN"] >= 1, timeout=30, what="the OPEN to reach the daemon")
        t0 = time.monotonic()
        _die(d, case.how)
        t.join(DEATH_BOUND + 5)
        assert not t.is_alive(), f"mount(2) still blocked {DEATH_BOUND + 5:.0f} s after the daemon died"
        assert "error" in box, f"the mount worked although its OPEN was never answered: {box}"
        took = box["t"] - t0
        assert box["error"].errno in case.expected and took <= DEATH_BOUND, (
            f"{case.id}: expected {errnames(case.expected)} within {DEATH_BOUND:.0f} s, got "
            f"{errname(box['error'].errno)} after {took:.1f} s\n{box['error']}")
        return

    m = plain_mounts.mount_erofs(fsid)
    if case.how == "exit":
        d.control.exit_abruptly()
        readers = [Reader(m.path / BIG.lstrip("/"))]
        readers[0].start()
        d.proc.wait(30)
        t0 = time.monotonic()
    else:
        n = 3 if case.id == "sigkill-reads" else 1
        for p in HELD_FILES[:n]:
            os.stat(m.path / p.lstrip("/"))  # metadata first: then each reader holds a READ of its own
        d.control.fail_read("ignore", cookie=fsid)
        readers = [Reader(m.path / p.lstrip("/")) for p in HELD_FILES[:n]]
        for r in readers:
            r.start()
        wait_for(lambda: len(d.control.status()["ignored"]) >= n, timeout=30, what=f"{n} READs held by the daemon")
        time.sleep(0.2)
        assert all(r.is_alive() for r in readers), "a reader returned although its READ is held"
        t0 = time.monotonic()
        _die(d, case.how)
    for r in readers:
        r.join(DEATH_BOUND + 5)
    rows = [(r.path.rsplit("/", 1)[1], "blocked" if r.is_alive() else errname(r.result.errno),
             "-" if r.is_alive() else f"{r.started_at + r.result.seconds - t0:.2f}") for r in readers]
    report = table(rows, ["file", "result", "s after death"])
    assert not any(r.is_alive() for r in readers), f"readers still blocked after the daemon died:\n{report}"
    assert all(r.result.errno in case.expected for r in readers), (
        f"{case.id}: every blocked reader must get {errnames(case.expected)}:\n{report}")
    assert all(r.started_at + r.result.seconds - t0 <= DEATH_BOUND for r in readers), report

    # The cache is dead: the surviving mount cannot fetch anything new (its cookie is gone).
    wait_withdrawn(d.tag)
    dead = features.pick("death_read_enobufs", (errno.ENOBUFS,), (errno.EIO, errno.ENOBUFS))
    err = _read_errno(m.path / "small" / "s008-4096.dat")  # one plain data block nobody read
    assert err in dead, (f"uncached read after the daemon died: expected {errnames(dead)} (rule death_read_enobufs "
                         f"{'holds' if len(dead) == 1 else 'does not hold'} on {features.release}), "
                         f"got {errname(err)}")
    if not case.restart:
        return

    # A new daemon without restore: binds, but the old mount's cookie is never looked up again.
    d2 = daemons.start(*FILL, tag=d.tag)
    serve(d2.control, image, fsid=fsid)
    err = _read_errno(m.path / BIG.lstrip("/"), 256 << 10)
    assert err in dead, (
        f"the old mount after a new daemon bound (no restore): expected {errnames(dead)} (rule death_read_enobufs), "
        f"got {errname(err)}; "
        f"erofs only uses its cookie at mount time\n{d2.render()}")
    assert not d2.requests(), f"the new daemon got requests for the old mount:\n{d2.render()}"
    plain_mounts.umount(m)
    m2 = plain_mounts.mount_erofs(fsid)
    assert sha((m2.path / BIG.lstrip("/")).read_bytes()) == image.manifest[BIG].sha256
    first = d2.requests()[0]
    assert (first["op"], first["msg_id"], first["object_id"]) == ("OPEN", 0, 1), (
        f"a new daemon's first request should be OPEN msg_id 0 object_id 1\n{d2.render()}")


def _read_errno(path, offset: int = 0) -> int:
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            f.read(4096 if offset else -1)
    except OSError as e:
        return e.errno
    return 0


# --------------------------------------------------------------------------- shared domain, restart

# The daemon dies while member A (fsid a, device=X) of domain D is mounted; a new daemon binds
# with the same tag (the fscache cache record is re-used); a new member B (fsid b, device=X) of D
# then *mounts*: its primary cookie b is new and gets an OPEN from the new daemon (the domain's
# volume is re-created in the cache on lookup; docs/protocol.md#daemon-death), but X is the dead
# cache's cookie, shared through the domain (erofs_domain_register_cookie() finds it), never
# looked up again: B's data reads of X fail, as do A's uncached reads, and the new daemon never
# sees an OPEN for X. Once every member is unmounted the domain is torn down and a fresh mount of
# B works end to end. The errno of the failing reads is rule restart_member_reads_fail's
# (erofs_domains/guest/kernel_features.py).


def domain_restart_expected(features) -> dict[str, str]:
    failed = errname(features.pick("restart_member_reads_fail", errno.ENOBUFS, errno.EIO))
    return {
        "new member mount": "ok",
        "new member: metadata (ls /)": "ok",
        "new member: data in the shared blob": failed,
        "old member: uncached data": failed,
        "daemon 2 OPENs": "fsid",
        "domain volumes": "1",
        "after the domain is recreated": "ok",
    }


def test_domain_restart_shared_blob(daemons, plain_mounts, tiny_images, kmsg, artifacts, features):
    """Daemon restart while a domain is live, then a new member sharing a blob of the dead cache."""
    image = tiny_images.blobdev("death-dom")
    domain, blob = unique("dom"), unique("blob")
    (dev,) = image.devices
    d1 = daemons.start(*FILL)
    fa = serve(d1.control, image, devices={dev: blob})
    a = plain_mounts.mount_erofs(fa, domain_id=domain, devices=[blob])
    assert (a.path / CONTROL.lstrip("/")).read_bytes() == b"bottom\n"
    d1.kill()
    wait_withdrawn(d1.tag)
    d2 = daemons.start(*FILL, tag=d1.tag)
    fb = serve(d2.control, image, devices={dev: blob})
    seen: dict[str, str] = {}
    try:
        b = plain_mounts.mount_erofs(fb, domain_id=domain, devices=[blob])
        seen["new member mount"] = "ok"
    except MountError as e:
        b = None
        seen["new member mount"] = errname(e.errno)
    if b is not None:
        seen["new member: metadata (ls /)"] = "ok" if _listdir_errno(b.path) == 0 else errname(_listdir_errno(b.path))
        seen["new member: data in the shared blob"] = errname(_read_errno(b.path / BIG.lstrip("/")))
    seen["old member: uncached data"] = errname(_read_errno(a.path / BIG.lstrip("/"), 128 << 10))
    seen["daemon 2 OPENs"] = ",".join(sorted({"fsid" if r["cookie_key"] == fb else "blob"
                                              for r in d2.requests() if r["op"] == "OPEN"})) or "none"
    vols = [v for v in procfs.read_volumes() if v.key == f"erofs,{domain}"]
    seen["domain volumes"] = str(len(vols))
    if b is not None:
        plain_mounts.umount(b)
    plain_mounts.umount(a)
    # With the domain gone, the same member mounts and reads through the new daemon.
    c = plain_mounts.mount_erofs(fb, domain_id=domain, devices=[blob])
    seen["after the domain is recreated"] = "ok" if sha((c.path / BIG.lstrip("/")).read_bytes()) == \
        image.manifest[BIG].sha256 else "wrong data"
    report = table(sorted(seen.items()), ["what", "observed"])
    (artifacts / "observed.txt").write_text(report + "\n")
    assert seen["after the domain is recreated"] == "ok", report
    want = domain_restart_expected(features)
    diff = [(k, want.get(k), seen.get(k)) for k in sorted(set(want) | set(seen)) if want.get(k) != seen.get(k)]
    assert not diff, (f"daemon restart in a live domain (rule restart_member_reads_fail: "
                      f"{'holds' if features.holds('restart_member_reads_fail') else 'does not hold'} on "
                      f"{features.release}):\n{table(diff, ['what', 'expected', 'observed'])}\n\n{report}")


def _listdir_errno(path) -> int:
    try:
        os.listdir(path)
    except OSError as e:
        return e.errno
    return 0


# --------------------------------------------------------------------------- failover

def test_failover_restore(require, daemons, plain_mounts, tiny_images, kmsg):
    """An fd holder keeps /dev/cachefiles open; the daemon is SIGKILLed with READs in flight; a
    new daemon adopts the fd and writes `restore`: every reader completes with the right data,
    the held READs are re-delivered with their msg_ids after a re-OPEN of the object (6.8+)."""
    require.restore()
    image = tiny_images.single("failover")
    fsid = unique("fo")
    sock = daemons.holder()
    d1 = daemons.start(*FILL, "--hold-socket", sock, blobs={fsid: image.path})
    m = plain_mounts.mount_erofs(fsid)
    for p in HELD_FILES:
        os.stat(m.path / p.lstrip("/"))  # metadata first: each reader then holds a READ of its own
    d1.control.fail_read("ignore", cookie=fsid)
    readers = [Reader(m.path / p.lstrip("/")) for p in HELD_FILES]
    for r in readers:
        r.start()
    held = wait_for(lambda: d1.control.status()["ignored"] if len(d1.control.status()["ignored"]) >= 3 else None,
                    timeout=30, what="3 READs held by the daemon")
    d1.kill()
    time.sleep(1.0)
    early = [r.path for r in readers if not r.is_alive()]
    assert not early, f"readers returned while the holder kept the device open (requests must stay queued): {early}"
    d2 = daemons.start(*FILL, "--adopt-socket", sock, "--hold-socket", sock, tag=d1.tag, blobs={fsid: image.path})
    for r in readers:
        r.join(60)
    rows = [(p, "blocked" if r.is_alive() else errname(r.result.errno),
             "ok" if sha(r.result.data) == image.manifest[p].sha256 else "WRONG")
            for p, r in zip(HELD_FILES, readers)]
    report = table(rows, ["file", "result", "data"])
    assert all(row[1] == "ok" and row[2] == "ok" for row in rows), (
        f"after restore every in-flight read must complete with the right data:\n{report}\n{d2.render()}")
    opens = [r for r in d2.requests() if r["op"] == "OPEN"]
    assert opens and opens[0]["cookie_key"] == fsid, f"restore must re-open the object (new OPEN)\n{d2.render()}"
    redelivered = {r["msg_id"] for r in d2.requests() if r["op"] == "READ"}
    assert set(held) <= redelivered, (
        f"the held READs {held} must be re-delivered with the same msg_ids after restore\n{d2.render()}")


# --------------------------------------------------------------------------- README rows

OUTCOMES = [Row("daemon death", c.what, c.text(), c.rule) for c in DEATH_CASES] + [
    Row("daemon death", "daemon restarted (same tag) while a domain is live; new member shares a blob cookie "
        "of the dead cache", "the new member mounts (its fsid is OPENed by the new daemon) but reads of the "
        "shared blob fail ENOBUFS (rule restart_member_reads_fail; EIO before it), like the old member's "
        "uncached reads; no OPEN for the blob until every member is unmounted, then a remount works"),
    Row("daemon death", "failover: holder keeps /dev/cachefiles, daemon SIGKILLed with READs held, new daemon "
        "adopts the fd and writes `restore`",
        "object re-opened, held READs re-delivered (same msg_ids), readers get the right data", "restore"),
]
