"""Concurrency, bounded in time and iterations (then the autouse leak check).

* Mount churn in one domain: K threads mount and unmount members of a domain (all sharing one
  data blob) while reader threads keep reading the shared data through an anchor member.
* The last member leaves while another joins (prior art: "relinquish volume with mutex held"):
  two threads alternate in a domain with no anchor, so the domain and its volume are torn
  down and re-created under each other's feet.
* Parallel readers of one uncached range: N threads read the same file while its READ is
  slow; all get identical, correct bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.names import unique
from erofs_domains.base.scratch import work_root
from erofs_domains.guest.fscache.faults import (
    Reader,
    Row,
    errname,
    table,
)
from erofs_domains.guest.mounts import MS_RDONLY, build_options, sys_mount, umount_when_idle
from erofs_domains.guest.race import Attempts, Span, Timeline, overlaps

SHARED_DAEMON_ARGS: list[str] = []
SHARED_CACHE_MIB = 64

CHURN_THREADS = 3
CHURN_ITERATIONS = 8  # per thread
READER_THREADS = 2
HANDOVER_ITERATIONS = 8  # per thread
PARALLEL_READERS = 6
PARALLEL_ROUNDS = 3
RACE_ATTEMPTS = 3  # runs of a churn phase to get its threads to overlap
SLOW_READ = 1.0  # seconds the daemon holds the parallel readers' READ
TIME_LIMIT = 60.0  # seconds per phase; a mount slower than SLOW_MOUNT is reported
SLOW_MOUNT = 15.0
CONTROL = "/deep/d1/d2/d3/d4/bottom.txt"
FILES = ("/links/hard-a", "/small/s003-1000.dat", "/large/large-0.bin")


def fscache_tables() -> str:
    """/proc/fs/fscache volumes and cookies of erofs, for failure messages."""
    from erofs_domains.guest.observe.snapshot import FscacheSnapshot

    return FscacheSnapshot.take().erofs().render()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    mounts: int = 0
    reads: int = 0
    slow: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                if isinstance(v, list):
                    getattr(self, k).extend(v)
                else:
                    setattr(self, k, getattr(self, k) + v)


def check_files(root: Path, image, tally: Tally, who: str, timeline: Timeline | None = None) -> None:
    for p in FILES:
        try:
            with timeline.span(who, f"read {p}") if timeline else contextlib.nullcontext():
                got = (root / p.lstrip("/")).read_bytes()
        except OSError as e:
            tally.add(problems=[f"{who}: read {p}: {errname(e.errno)}"])
            continue
        if sha(got) != image.manifest[p].sha256:
            tally.add(problems=[f"{who}: {p}: WRONG DATA ({len(got)} bytes)"])
        tally.add(reads=1)


def member(root: Path, fsid: str, domain: str, blob: str, image, tally: Tally, who: str,
           timeline: Timeline) -> None:
    """Mount one member, check its files, unmount it; the two system calls go on `timeline`."""
    path = root / fsid
    path.mkdir(parents=True, exist_ok=True)
    try:
        with timeline.span(who, f"mount {fsid}"):
            sys_mount("none", path, "erofs", MS_RDONLY, build_options(fsid, domain, [blob]))
    except OSError as e:
        tally.add(problems=[f"{who}: mount {fsid}: {errname(e.errno)}"])
        path.rmdir()
        return
    (span,) = [s for s in timeline.of("mount") if s.what == f"mount {fsid}"]
    if span.end - span.start > SLOW_MOUNT:
        tally.add(slow=[f"{who}: mount {fsid} took {span.end - span.start:.1f} s"])
    tally.add(mounts=1)
    try:
        check_files(path, image, tally, who)
    finally:
        try:
            with timeline.span(who, f"umount {fsid}"):
                umount_when_idle(path)
        except OSError as e:  # WaitTimeout too: still EBUSY
            tally.add(problems=[f"{who}: umount {fsid}: {e}"])
        else:
            path.rmdir()


def serve_members(fault_env, image, blob: str, names: list[str]) -> None:
    """Every member is the same metadata blob under its own fsid, with the shared data blob."""
    (dev,) = image.devices
    fault_env.control.add_blob(blob, str(image.blobs[dev].path))
    for n in names:
        fault_env.control.add_blob(n, str(image.path))


def run_threads(threads: list[threading.Thread], limit: float) -> list[str]:
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def test_domain_mount_churn_with_readers(fault_env, tiny_images, kmsg, artifacts):
    image = tiny_images.blobdev("stress")
    domain, blob = unique("sdom"), unique("sblob")
    anchor = unique("anchor")
    serve_members(fault_env, image, blob, [anchor])
    a = fault_env.mounts.mount_erofs(anchor, domain_id=domain, devices=[blob])
    root = work_root() / "mnt" / unique("churn")
    race = Attempts("member mounts/umounts of different threads overlapping each other and the anchor's "
                    "readers", wanted=1, limit=RACE_ATTEMPTS)
    report = []
    while race.more():
        names = {k: [unique(f"m{k}-") for _ in range(CHURN_ITERATIONS)] for k in range(CHURN_THREADS)}
        serve_members(fault_env, image, blob, [n for v in names.values() for n in v])
        tally, timeline = Tally(), Timeline()
        stop = threading.Event()

        def reader(i: int, tally=tally, timeline=timeline, stop=stop) -> None:
            while not stop.is_set():
                check_files(a.path, image, tally, f"reader {i}", timeline)

        def churner(k: int, names=names, tally=tally, timeline=timeline) -> None:
            for n in names[k]:
                member(root, n, domain, blob, image, tally, f"mounter {k}", timeline)

        readers = [threading.Thread(target=reader, args=(i,), name=f"reader {i}", daemon=True)
                   for i in range(READER_THREADS)]
        for r in readers:
            r.start()
        t0 = time.monotonic()
        stuck = run_threads([threading.Thread(target=churner, args=(k,), name=f"mounter {k}", daemon=True)
                             for k in range(CHURN_THREADS)], TIME_LIMIT)
        stop.set()
        for r in readers:
            r.join(30)
        took = time.monotonic() - t0
        calls = timeline.of("mount") + timeline.of("umount")
        between = overlaps(calls, calls)
        with_reads = overlaps(calls, timeline.of("read"))
        summary = (f"attempt {race.tried + 1}: {tally.mounts} member mounts by {CHURN_THREADS} threads, "
                   f"{tally.reads} file reads ({READER_THREADS} readers on the anchor), {took:.1f} s; "
                   f"{len(between) // 2} overlapping mount/umount pairs of different threads, "
                   f"{len(with_reads)} (mount or umount, read) pairs in flight together")
        report += [summary, *tally.problems, *tally.slow]
        (artifacts / "stress.txt").write_text("\n".join(report) + "\n\n" + timeline.render(limit=400) + "\n")
        assert not stuck, (f"threads still running after {TIME_LIMIT:.0f} s: {stuck}\n{summary}\n{fault_env.render()}\n"
                           + fscache_tables())
        assert not tally.problems, (f"{summary}\n" + "\n".join(tally.problems[:30]) + "\n" + fault_env.render() + "\n"
                                    + fscache_tables())
        assert tally.mounts == CHURN_THREADS * CHURN_ITERATIONS, summary
        assert not tally.slow, "slow mounts (volume collision wait?):\n" + "\n".join(tally.slow)
        race.record(bool(between) and bool(with_reads), summary + "\n" + timeline.render())
    race.check()
    fault_env.window.wait_idle()   # requests are logged after their answer (docs/protocol.md#waiting)
    blob_opens = [r for r in fault_env.requests("OPEN") if r["cookie_key"] == blob]
    assert len(blob_opens) == 1, (
        f"the shared blob stays one cookie while the anchor lives: expected 1 OPEN, got {len(blob_opens)}\n"
        + fault_env.render())
    fault_env.mounts.umount(a)


def test_last_member_leaves_while_another_joins(fault_env, tiny_images, kmsg, artifacts):
    """Two threads alternate in a domain without an anchor, so the domain (and its fscache
    volume) is torn down by one while the other re-creates it. The race is there when one
    thread's umount (of the domain's last member: the other thread has unmounted its own)
    is in flight together with the other thread's mount; a run without such a pair is
    reported and repeated."""
    image = tiny_images.blobdev("stress")
    domain, blob = unique("hdom"), unique("hblob")
    root = work_root() / "mnt" / unique("handover")
    race = Attempts("one thread's umount of the last member in flight with the other's mount",
                    wanted=1, limit=RACE_ATTEMPTS)
    report = []
    while race.more():
        names = {k: [unique(f"h{k}-") for _ in range(HANDOVER_ITERATIONS)] for k in range(2)}
        serve_members(fault_env, image, blob, [n for v in names.values() for n in v])
        tally, timeline = Tally(), Timeline()

        def worker(k: int, names=names, tally=tally, timeline=timeline) -> None:
            for n in names[k]:
                member(root, n, domain, blob, image, tally, f"thread {k}", timeline)

        t0 = time.monotonic()
        stuck = run_threads([threading.Thread(target=worker, args=(k,), name=f"thread {k}", daemon=True)
                             for k in range(2)], TIME_LIMIT)
        handovers = overlaps(timeline.of("umount"), timeline.of("mount"))
        summary = (f"attempt {race.tried + 1}: {tally.mounts} mounts, {tally.reads} reads in "
                   f"{time.monotonic() - t0:.1f} s; {len(handovers)} umount/mount pairs of the two threads "
                   f"in flight together")
        report += [summary, *tally.problems, *tally.slow]
        (artifacts / "stress.txt").write_text("\n".join(report) + "\n\n" + timeline.render(limit=400) + "\n")
        assert not stuck, f"threads still running after {TIME_LIMIT:.0f} s: {stuck}\n{summary}\n" + fscache_tables()
        assert not tally.problems, (f"{summary}\n" + "\n".join(tally.problems[:30]) + "\n" + fault_env.render() + "\n"
                                    + fscache_tables())
        assert not tally.slow, ("slow mounts (fscache volume collision?):\n" + "\n".join(tally.slow) + "\n"
                                + fscache_tables())
        assert tally.mounts == 2 * HANDOVER_ITERATIONS, summary
        race.record(bool(handovers), summary + "\n" + timeline.render())
    race.check()
    collisions = kmsg.grep(r"Potential volume collision")
    assert not collisions, "volume collisions logged:\n" + "\n".join(map(str, collisions))


def test_parallel_readers_of_one_uncached_range(fault_env, tiny_images, kmsg, artifacts):
    """N threads read the same uncached file while its READ is slow: identical, right bytes.
    A round races when the daemon's log shows the delayed READ and at least two readers were
    blocked while it was outstanding; a round without it is reported and repeated."""
    image = tiny_images.blobdev("stress")
    rows = []
    race = Attempts(f"{PARALLEL_READERS} readers blocked on one slow READ", wanted=PARALLEL_ROUNDS,
                    limit=2 * PARALLEL_ROUNDS)
    headers = ["round", "file", "readers", "digests", "READs", "slow READ", "readers blocked on it"]
    while race.more():
        rnd = race.tried
        fsid, blob = unique("pr"), unique("pblob")
        serve_members(fault_env, image, blob, [fsid])
        m = fault_env.mounts.mount_erofs(fsid, devices=[blob])
        path = FILES[rnd % len(FILES)]
        fault_env.control.delay(SLOW_READ, op="READ", cookie=blob, once=True)
        mark = len(fault_env.requests())
        readers = [Reader(m.path / path.lstrip("/")) for _ in range(PARALLEL_READERS)]
        stuck = run_threads(readers, 30)
        assert not stuck, f"readers still blocked: {stuck}\n{fault_env.render()}"
        digests = {sha(r.result.data) if r.result.data is not None else errname(r.result.errno) for r in readers}
        fault_env.window.wait_idle()
        reads = [r for r in fault_env.requests()[mark:] if r["op"] == "READ" and r["cookie_key"] == blob]
        slow = [r for r in reads if "delay" in (r.get("fault") or "").split(",")]
        # the daemon logs a READ when it completed it; it received it SLOW_READ s earlier
        pending = Span("daemon", "slow READ", slow[0]["t"] - SLOW_READ, slow[0]["t"]) if slow else None
        blocked = [r for r in readers if pending and pending.overlap(
            Span(r.name, "read", r.started_at, r.started_at + r.result.seconds)) > 0]
        rows.append((rnd, path, len(readers), ", ".join(sorted(d[:12] for d in digests)), len(reads),
                     f"msg {slow[0]['msg_id']} off {slow[0]['off']}" if slow else "none (no READ was delayed)",
                     len(blocked)))
        report = table(rows, headers)
        (artifacts / "parallel.txt").write_text(report + "\n" + "\n".join(race.notes) + "\n")
        assert digests == {image.manifest[path].sha256}, (
            f"round {rnd}: {PARALLEL_READERS} readers of {path} got {digests}, expected "
            f"{image.manifest[path].sha256}\n{report}\n{fault_env.render()}")
        if not slow:
            fault_env.control.clear_faults()  # the delay was never taken: it must not hit a later READ
        race.record(len(blocked) >= 2, report + "\n" + fault_env.render())
        fault_env.mounts.umount(m)
    race.check()


OUTCOMES = [
    Row("stress", f"{CHURN_THREADS} threads x {CHURN_ITERATIONS} member mounts in one domain (shared blob) "
        f"while {READER_THREADS} threads read the anchor member",
        "every mount and read succeeds with the right data; one OPEN for the shared blob; no leak"),
    Row("stress", f"last member leaves while another joins (2 threads x {HANDOVER_ITERATIONS})",
        f"every mount works in < {SLOW_MOUNT:.0f} s, no volume collision, no leak"),
    Row("stress", f"{PARALLEL_READERS} readers of one uncached range while its READ is slow "
        f"({PARALLEL_ROUNDS} rounds)", "identical, correct data for all"),
]
