# ruff: noqa: F811  (fixtures imported from helpers_faults are redefined as arguments)
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

import errno
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers_faults import (  # noqa: F401  (fixtures are used by name)
    Reader,
    Row,
    env,
    errname,
    shared_daemon,
    table,
)

from fixtures.mounts import MS_RDONLY, build_options, sys_mount, sys_umount
from fixtures.paths import work_root
from fixtures.plugin import unique

SHARED_DAEMON_ARGS: list[str] = []
SHARED_CACHE_MIB = 64

CHURN_THREADS = 3
CHURN_ITERATIONS = 8  # per thread
READER_THREADS = 2
HANDOVER_ITERATIONS = 8  # per thread
PARALLEL_READERS = 6
PARALLEL_ROUNDS = 3
TIME_LIMIT = 60.0  # seconds per phase; a mount slower than SLOW_MOUNT is reported
SLOW_MOUNT = 15.0
CONTROL = "/deep/d1/d2/d3/d4/bottom.txt"
FILES = ("/links/hard-a", "/small/s003-1000.dat", "/large/large-0.bin")


def fscache_tables() -> str:
    """/proc/fs/fscache volumes and cookies of erofs, for failure messages."""
    from fixtures.observe.snapshot import FscacheSnapshot

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


def check_files(root: Path, image, tally: Tally, who: str) -> None:
    for p in FILES:
        try:
            got = (root / p.lstrip("/")).read_bytes()
        except OSError as e:
            tally.add(problems=[f"{who}: read {p}: {errname(e.errno)}"])
            continue
        if sha(got) != image.manifest[p].sha256:
            tally.add(problems=[f"{who}: {p}: WRONG DATA ({len(got)} bytes)"])
        tally.add(reads=1)


def member(root: Path, fsid: str, domain: str, blob: str, image, tally: Tally, who: str) -> None:
    """Mount one member, check its files, unmount it."""
    path = root / fsid
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        sys_mount("none", path, "erofs", MS_RDONLY, build_options(fsid, domain, [blob]))
    except OSError as e:
        tally.add(problems=[f"{who}: mount {fsid}: {errname(e.errno)}"])
        path.rmdir()
        return
    took = time.monotonic() - t0
    if took > SLOW_MOUNT:
        tally.add(slow=[f"{who}: mount {fsid} took {took:.1f} s"])
    tally.add(mounts=1)
    try:
        check_files(path, image, tally, who)
    finally:
        for _ in range(100):
            try:
                sys_umount(path)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    tally.add(problems=[f"{who}: umount {fsid}: {errname(e.errno)}"])
                    break
                time.sleep(0.05)
        path.rmdir()


def serve_members(env, image, blob: str, names: list[str]) -> None:
    """Every member is the same metadata blob under its own fsid, with the shared data blob."""
    (dev,) = image.devices
    env.control.add_blob(blob, str(image.blobs[dev].path))
    for n in names:
        env.control.add_blob(n, str(image.path))


def run_threads(threads: list[threading.Thread], limit: float) -> list[str]:
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def test_domain_mount_churn_with_readers(env, tiny_images, kmsg, artifacts):
    image = tiny_images.blobdev("stress")
    domain, blob = unique("sdom"), unique("sblob")
    anchor = unique("anchor")
    names = {k: [unique(f"m{k}-") for _ in range(CHURN_ITERATIONS)] for k in range(CHURN_THREADS)}
    serve_members(env, image, blob, [anchor] + [n for v in names.values() for n in v])
    a = env.mounts.mount_erofs(anchor, domain_id=domain, devices=[blob])
    root = work_root() / "mnt" / unique("churn")
    tally = Tally()
    stop = threading.Event()

    def reader(i: int) -> None:
        while not stop.is_set():
            check_files(a.path, image, tally, f"reader {i}")

    def churner(k: int) -> None:
        for n in names[k]:
            member(root, n, domain, blob, image, tally, f"mounter {k}")

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
    summary = (f"{tally.mounts} member mounts by {CHURN_THREADS} threads, {tally.reads} file reads "
               f"({READER_THREADS} readers on the anchor), {took:.1f} s")
    (artifacts / "stress.txt").write_text(summary + "\n" + "\n".join(tally.problems + tally.slow) + "\n")
    assert not stuck, (f"threads still running after {TIME_LIMIT:.0f} s: {stuck}\n{summary}\n{env.render()}\n"
                       + fscache_tables())
    assert not tally.problems, (f"{summary}\n" + "\n".join(tally.problems[:30]) + "\n" + env.render() + "\n"
                                + fscache_tables())
    assert tally.mounts == CHURN_THREADS * CHURN_ITERATIONS, summary
    assert not tally.slow, "slow mounts (volume collision wait?):\n" + "\n".join(tally.slow)
    blob_opens = [r for r in env.requests("OPEN") if r["cookie_key"] == blob]
    assert len(blob_opens) == 1, (
        f"the shared blob stays one cookie while the anchor lives: expected 1 OPEN, got {len(blob_opens)}\n"
        + env.render())
    env.mounts.umount(a)


def test_last_member_leaves_while_another_joins(env, tiny_images, kmsg, artifacts):
    """Two threads alternate in a domain without an anchor, so the domain (and its fscache
    volume) is torn down by one while the other re-creates it."""
    image = tiny_images.blobdev("stress")
    domain, blob = unique("hdom"), unique("hblob")
    names = {k: [unique(f"h{k}-") for _ in range(HANDOVER_ITERATIONS)] for k in range(2)}
    serve_members(env, image, blob, [n for v in names.values() for n in v])
    root = work_root() / "mnt" / unique("handover")
    tally = Tally()

    def worker(k: int) -> None:
        for n in names[k]:
            member(root, n, domain, blob, image, tally, f"thread {k}")

    t0 = time.monotonic()
    stuck = run_threads([threading.Thread(target=worker, args=(k,), name=f"thread {k}", daemon=True)
                         for k in range(2)], TIME_LIMIT)
    summary = f"{tally.mounts} mounts, {tally.reads} reads in {time.monotonic() - t0:.1f} s"
    (artifacts / "stress.txt").write_text(summary + "\n" + "\n".join(tally.problems + tally.slow) + "\n")
    assert not stuck, f"threads still running after {TIME_LIMIT:.0f} s: {stuck}\n{summary}\n" + fscache_tables()
    assert not tally.problems, (f"{summary}\n" + "\n".join(tally.problems[:30]) + "\n" + env.render() + "\n"
                                + fscache_tables())
    assert not tally.slow, ("slow mounts (fscache volume collision?):\n" + "\n".join(tally.slow) + "\n"
                            + fscache_tables())
    assert tally.mounts == 2 * HANDOVER_ITERATIONS, summary
    collisions = kmsg.grep(r"Potential volume collision")
    assert not collisions, "volume collisions logged:\n" + "\n".join(map(str, collisions))


def test_parallel_readers_of_one_uncached_range(env, tiny_images, kmsg, artifacts):
    """N threads read the same uncached file while its READ is slow: identical, right bytes."""
    image = tiny_images.blobdev("stress")
    rows = []
    for rnd in range(PARALLEL_ROUNDS):
        fsid, blob = unique("pr"), unique("pblob")
        serve_members(env, image, blob, [fsid])
        m = env.mounts.mount_erofs(fsid, devices=[blob])
        path = FILES[rnd % len(FILES)]
        env.control.delay(1.0, op="READ", cookie=blob, once=True)
        mark = len(env.requests())
        readers = [Reader(m.path / path.lstrip("/")) for _ in range(PARALLEL_READERS)]
        stuck = run_threads(readers, 30)
        assert not stuck, f"readers still blocked: {stuck}\n{env.render()}"
        digests = {sha(r.result.data) if r.result.data is not None else errname(r.result.errno) for r in readers}
        reads = [r for r in env.requests()[mark:] if r["op"] == "READ" and r["cookie_key"] == blob]
        rows.append((rnd, path, len(readers), ", ".join(sorted(d[:12] for d in digests)), len(reads)))
        assert digests == {image.manifest[path].sha256}, (
            f"round {rnd}: {PARALLEL_READERS} readers of {path} got {digests}, expected "
            f"{image.manifest[path].sha256}\n{env.render()}")
        env.mounts.umount(m)
    (artifacts / "parallel.txt").write_text(table(rows, ["round", "file", "readers", "digests", "READs"]) + "\n")


OUTCOMES = [
    Row("stress", f"{CHURN_THREADS} threads x {CHURN_ITERATIONS} member mounts in one domain (shared blob) "
        f"while {READER_THREADS} threads read the anchor member",
        "every mount and read succeeds with the right data; one OPEN for the shared blob; no leak", "6.12"),
    Row("stress", f"last member leaves while another joins (2 threads x {HANDOVER_ITERATIONS})",
        f"every mount works in < {SLOW_MOUNT:.0f} s, no volume collision, no leak", "6.12"),
    Row("stress", f"{PARALLEL_READERS} readers of one uncached range while its READ is slow "
        f"({PARALLEL_ROUNDS} rounds)", "identical, correct data for all", "6.12"),
]
