"""A cache too small for the blob (docs/protocol.md#read-and-read_complete for the anon-fd writes,
docs/observables.md#culling for cull and inuse).

An 8 MiB ext4 cache serves a 12 MiB file: once the cache is full the daemon's writes through
the anon fd fail (ENOBUFS below `bstop`, or ENOSPC from ext4), its READs complete without
data and the reader gets EIO. Whatever is returned must be the right data, never zeros or
another range. Culling the committed cache file (what cachefilesd would do) gives the space
back at once (a culled file is unlinked; only directories go to the graveyard); a remount then
fetches the data again.

CULL_STEPS: what `inuse` and `cull` answer along an object's life: an unlinked tmpfile while
first mounted (ENOENT), committed and idle (0), open again (EBUSY), culled (0, unlinked),
gone (ENOENT), a name with '/' (EINVAL).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from erofs_domains.base.names import unique
from erofs_domains.guest.fscache.faults import (
    Row,
    errname,
    fscache_stats,
    mkfs_tree,
    serve,
    stat_delta,
    table,
)
from erofs_domains.guest.observe.cachedir import CacheDirListing, predict_path

CACHE_MIB = 8
BIG_MIB = 12
CHUNK = 1 << 20


@pytest.fixture
def cache_size_mib() -> int:
    return CACHE_MIB


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """An image with one 12 MiB incompressible file (plus a small one); returns (path, data)."""
    tree = tmp_path_factory.mktemp("big-tree")
    data = random.Random("cache-space").randbytes(BIG_MIB << 20)
    (tree / "big.bin").write_bytes(data)
    (tree / "small.txt").write_bytes(b"small file\n")
    path = mkfs_tree(tmp_path_factory.mktemp("big") / "big.erofs", tree)
    return path, data


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def read_chunks(path: Path, data: bytes) -> list[tuple[int, int, int | None, bool]]:
    """(offset, bytes read, errno or None, right data?) for every 1 MiB chunk of `path`. A
    read(2) may return short (up to the first page it could not get); the rest of the chunk
    is read on until an error or the end."""
    out = []
    with open(path, "rb", buffering=0) as f:
        for off in range(0, len(data), CHUNK):
            want = data[off:off + CHUNK]
            got, err = b"", None
            while len(got) < len(want):
                try:
                    f.seek(off + len(got))
                    part = f.read(len(want) - len(got))
                except OSError as e:
                    err = e.errno
                    break
                if not part:
                    break
                got += part
            out.append((off, len(got), err, got == want[:len(got)]))
    return out


def test_small_cache_never_returns_wrong_data(daemons, plain_mounts, big_image, kmsg):
    """12 MiB through an 8 MiB cache: reads fail (EIO) once it is full, and never return wrong
    data; culling the committed file frees the space; a remount fetches again."""
    path, data = big_image
    d = daemons.start()
    fsid = unique("big")
    d.control.add_blob(fsid, str(path))
    cache_dir = Path(daemons.cache_dir)
    free0 = free_bytes(cache_dir)
    stats0 = fscache_stats()
    m = plain_mounts.mount_erofs(fsid)
    chunks = read_chunks(m.path / "big.bin", data)
    rows = [(f"{off >> 20} MiB", f"{n >> 10} KiB", errname(err), "ok" if right else "WRONG DATA")
            for off, n, err, right in chunks]
    report = table(rows, ["chunk", "read", "then", "data"]) + f"\ncache free before: {free0 >> 10} KiB, " \
        f"now {free_bytes(cache_dir) >> 10} KiB\n" + d.render(20)
    (daemons.artifacts / "chunks.txt").write_text(report + "\n")
    assert all(right for *_, right in chunks), f"a read returned wrong data:\n{report}"
    errs = {err for _, _, err, _ in chunks if err}
    assert errs == {errno.EIO}, f"a full cache must turn reads into EIO (and only that):\n{report}"
    ok = sum(1 for _, n, err, _ in chunks if err is None and n == CHUNK)
    assert 0 < ok < len(chunks), f"expected some chunks to fit and some not:\n{report}"
    d.control.wait_idle(timeout=10)   # requests are logged after their answer (docs/protocol.md#waiting)
    writes = [r for r in d.requests() if r["op"] == "READ" and r.get("errno")]
    assert writes and {r["errno"] for r in writes} <= {errno.ENOBUFS, errno.ENOSPC}, (
        f"the daemon's anon-fd writes must fail ENOBUFS (below bstop) or ENOSPC:\n{report}")
    assert stat_delta(stats0, fscache_stats(), "NoSpace", "nwr") >= 1, "stats NoSpace nwr= must count"
    assert (small := (m.path / "small.txt").read_bytes()) == b"small file\n", small

    plain_mounts.umount(m)
    d.control.wait_idle(timeout=10)
    rel = predict_path(f"erofs,{fsid}", fsid.encode())
    listing = CacheDirListing.scan(cache_dir)
    f = listing.file(rel)
    assert f is not None and f.xattr and f.xattr.object_size == len(path.read_bytes()), listing.render()
    directory, name = rel.rsplit("/", 1)
    before_cull = free_bytes(cache_dir)
    assert d.control.cull(name, directory) == 0, f"cull {rel} (committed, idle) failed\n{listing.render()}"
    freed = free_bytes(cache_dir) - before_cull
    assert freed >= f.allocated // 2, (
        f"culling (a file is unlinked at once; only directories go to the graveyard) should free the "
        f"file's {f.allocated >> 10} KiB, freed {freed >> 10} KiB")

    m2 = plain_mounts.mount_erofs(fsid)
    again = read_chunks(m2.path / "big.bin", data[: 4 * CHUNK])
    assert all(err is None and n == CHUNK and right for _, n, err, right in again), f"after cull + remount: {again}"
    d.control.wait_idle(timeout=10)   # requests are logged after their answer (docs/protocol.md#waiting)
    opens = [r for r in d.requests() if r["op"] == "OPEN" and r["cookie_key"] == fsid]
    assert len(opens) == 2, f"one OPEN per mount expected\n{d.render()}"
    refetched = [r for r in d.requests() if r["op"] == "READ" and r["object_id"] == opens[1]["object_id"]]
    assert refetched, f"the culled data must be fetched again (READs after the remount)\n{d.render()}"


# --------------------------------------------------------------------------- cull / inuse

# The object's life, in the order the test walks it; every step of CULL_STEPS names the phase
# it is asked in, so the table's order does not matter. "culled" is reached by the step that
# culls (the one expected to succeed), after the other steps of its phase were asked.
PHASES = ("tmpfile", "committed", "in use", "idle again", "culled")
ANY = "any"  # a step asked in every phase


@dataclass(frozen=True)
class CullStep:
    phase: str    # one of PHASES, or ANY
    state: str    # what the phase is, for the report
    command: str  # inuse | cull | cull-slash
    errno: int

    @property
    def culls(self) -> bool:
        """The step that removes the file (a cull that succeeds)."""
        return self.command == "cull" and self.errno == 0


CULL_STEPS = [
    CullStep("tmpfile", "first mount: the object is an unlinked tmpfile", "inuse", errno.ENOENT),
    CullStep("committed", "unmounted: the file is committed, nobody uses it", "inuse", 0),
    CullStep("in use", "mounted again: the cache holds the file (S_KERNEL_FILE)", "inuse", errno.EBUSY),
    CullStep("in use", "mounted again: the cache holds the file (S_KERNEL_FILE)", "cull", errno.EBUSY),
    CullStep("idle again", "unmounted again", "cull", 0),
    CullStep("culled", "culled (a file is unlinked; only directories go to the graveyard)", "inuse", errno.ENOENT),
    CullStep(ANY, "any state: a name with '/'", "cull-slash", errno.EINVAL),
]


def steps_of(phase: str, steps: list[CullStep] = CULL_STEPS) -> list[CullStep]:
    """The steps asked in `phase`: its own and the ANY steps, the cull that ends it last."""
    mine = [st for st in steps if st.phase in (phase, ANY)]
    return sorted(mine, key=lambda st: st.culls)


def test_cull_and_inuse(daemons, plain_mounts, tiny_images, kmsg):
    image = tiny_images.single("cull")
    d = daemons.start()
    fsid = serve(d.control, image)
    rel = predict_path(f"erofs,{fsid}", fsid.encode())
    directory, name = rel.rsplit("/", 1)
    cache_dir = Path(daemons.cache_dir)
    stats0 = fscache_stats()
    got: list[tuple[str, str, str, str, str]] = []
    asked: set[CullStep] = set()

    def ask(phase: str) -> None:
        for step in steps_of(phase):
            asked.add(step)
            if step.command == "cull-slash":
                err = d.control.cull(f"x/{name}", directory)
            else:
                err = getattr(d.control, step.command)(name, directory)
            got.append((phase, step.state, step.command, errname(step.errno), errname(err)))

    m = plain_mounts.mount_erofs(fsid)
    ask("tmpfile")
    plain_mounts.umount(m)
    d.control.wait_idle(timeout=10)
    ask("committed")
    m = plain_mounts.mount_erofs(fsid)
    ask("in use")
    plain_mounts.umount(m)
    d.control.wait_idle(timeout=10)
    ask("idle again")
    after_cull = CacheDirListing.scan(cache_dir)
    ask("culled")
    report = table(got, ["phase", "state", "command", "expected", "got"])
    assert asked == set(CULL_STEPS), f"steps in no phase of {PHASES}: {set(CULL_STEPS) - asked}"
    assert all(g[3] == g[4] for g in got), f"cull/inuse answers differ:\n{report}"
    assert rel not in after_cull.paths() and not after_cull.graveyard, (
        f"a culled file must be gone (unlinked, not in the graveyard)\n{after_cull.render()}")
    assert stat_delta(stats0, fscache_stats(), "NoSpace", "cull") == 1, "stats NoSpace cull= must count the cull"

    reads_before = len([r for r in d.requests() if r["op"] == "READ"])
    m = plain_mounts.mount_erofs(fsid)
    assert hashlib.sha256((m.path / "deep/d1/d2/d3/d4/bottom.txt").read_bytes()).hexdigest() == \
        image.manifest["/deep/d1/d2/d3/d4/bottom.txt"].sha256
    d.control.wait_idle(timeout=10)
    assert len([r for r in d.requests() if r["op"] == "READ"]) > reads_before, (
        f"after the cull the data must be fetched again (READs)\n{d.render()}")


# --------------------------------------------------------------------------- README rows

OUTCOMES = [
    Row("cache space", f"a {BIG_MIB} MiB file through an {CACHE_MIB} MiB cache",
        "daemon writes fail ENOBUFS/ENOSPC, readers get EIO for what does not fit, never wrong data; "
        "cull frees the space at once; a remount fetches again"),
] + [Row("cache space", f"`{s.command.replace('-slash', '')}` — {s.state}", errname(s.errno))
     for s in CULL_STEPS]
