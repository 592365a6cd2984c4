"""Every door to a shared file's bytes against its unshared twin (the same image mounted without
inode_share) and the image's manifest, then, where the door leaves pages behind, sharing: the
other member sees them resident, as the twin's own page cache holds them, and the other
member's identical call does no I/O for them.

Each test is one door on one image layout (plain, chunk-indexed with holes, lz4), over every
file shape of erofs_domains/guest/pagecache/image_set.py SHAPES. Each (door, shape, layout) row goes to
the test's results directory (`doors.jsonl`); `tools/outcome-table --pagecache-doors RESULTS`
renders them as the table in docs/pagecache.md."""

from __future__ import annotations

import json
import os

import pytest
from tabulate import tabulate

from erofs_domains.guest.pagecache import doors, probe
from erofs_domains.guest.pagecache.image_set import SHAPE_LAYOUTS, SHAPES
from erofs_domains.guest.pagecache.images import layout_of

# Doors whose own work re-reads what it dropped: "no I/O in the second member" does not apply.
IO_AGAIN = {"fault-after-dontneed"}
TWIN_RULE = "TWIN: everything a process observes through a shared file equals its unshared twin"
MANIFEST_RULE = "DATA: every byte a door returns is the image's byte at that offset"
SHARING_RULE = ("RESIDENT: what a door leaves in the page cache through one member is resident for the "
                "other members (as the twin's own page cache holds it), and their identical call does "
                "no I/O for it (erofs_ishare_file_read_iter, erofs_ishare_mmap, erofs_ishare_fadvise)")


def _cold(*paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _normalizer(a, twin):
    """FS_IOC_GETFSSYSFSPATH names the mount's own device: `<dev>` on both sides."""
    names = {"shared": os.path.basename(a.loopdev or ""), "twin": os.path.basename(twin.loopdev or "")}

    def normalize(key, value, who):
        if key == "sysfs_path" and isinstance(value, str) and names[who]:
            value = value.replace(names[who], "<dev>")
        return value
    return normalize


def _overlap(events, before: list[int]) -> list:
    """I/O events covering pages that were resident before the call."""
    return [e for e in events if any(before[i] for i in range(e.first_page, min(e.first_page + e.pages, len(before))))]


# Doors that read scattered pieces: how far around them readahead or a compressed cluster
# brings pages in is timing, not behaviour (lz4, cache_strategy=readaround, differed run to run).
PARTIAL = {"pread", "preadv2"}


def _residency(d, seen, res) -> str:
    if d.name not in PARTIAL:
        return doors.runs(res)
    touched = {(off + i) // doors.PAGE for off, _, got in seen.get("pieces", []) if not isinstance(got, str)
               for i in (0, max(len(got) - 1, 0)) if got}
    missing = sorted(p for p in touched if p >= len(res) or not res[p])
    return "every page read resident" if not missing else f"pages read but not resident: {missing}"


def sharing_check(d, a, b, fb, res_a, size, want, scratch, io_trace, *, explained, problems, shape) -> str:
    """After the door through member `a`: member `b` maps the same pages resident, and `b`'s
    identical call does no I/O for them. Returns the table's words for it."""
    res_b = doors.resident(fb)
    if explained and not any(res_a):
        return f"NOT SHARED (rule {explained[0]})"
    notes = []
    if res_b != res_a or not any(res_b):
        notes.append(f"resident through {b.name}: {doors.runs(res_b)}, through {a.name}: {doors.runs(res_a)}")
    if d.name not in IO_AGAIN:
        nid = os.stat(fb).st_ino
        io_trace.take()
        seen_b = d.run(fb, size, scratch)
        io = [e for e in io_trace.take() if not e.directory and e.nid == nid and e.dev in (a.dev, b.dev)]
        again = _overlap(io, res_b)
        if again:
            notes.append(f"{b.name}'s own {d.name} re-read pages already resident: " + ", ".join(map(str, again)))
        for err in doors.manifest_errors(seen_b, want):
            problems.append((shape, MANIFEST_RULE, b.name, err, ""))
    for n in notes:
        problems.append((shape, SHARING_RULE, "sharing", n, ""))
    if notes:
        return "NOT SHARED: " + "; ".join(notes)
    return "shared" if d.name not in IO_AGAIN else "shared (refaults)"


@pytest.mark.parametrize("layout", list(SHAPE_LAYOUTS))
@pytest.mark.parametrize("door", [d.name for d in doors.DOORS])
def test_door_matches_the_twin(sharing, pc_images, domain, io_trace, artifacts, door, layout):
    d = doors.BY_NAME[door]
    image = pc_images[f"shapes-{layout}"]
    dom = domain()
    a, b = sharing.members(dom, image, image)
    twin = sharing.mount(image, inode_share=False)
    normalize = _normalizer(a, twin)
    scratch = artifacts
    rows, problems = [], []
    for shape in SHAPES:
        want = image.files[shape]
        size = len(want)
        fa, fb, ft = a.path / shape, b.path / shape, twin.path / shape
        shared_file = probe.file_ops(fa) == "shared"
        _cold(fa, ft)
        seen_a = d.run(fa, size, scratch)
        seen_t = d.run(ft, size, scratch)
        fills = d.fills and shared_file and size
        if fills:   # what the door left in the page cache each side's mapping shows
            res_a = doors.resident(fa)
            seen_a["resident"] = _residency(d, seen_a, res_a)
            seen_t["resident"] = _residency(d, seen_t, doors.resident(ft))
        v = doors.compare(door, shape, layout, shared_file, seen_a, seen_t, want, normalize)
        for key, s, t, rule in v.differs:
            if rule is None:
                problems.append((shape, TWIN_RULE, key, s, t))
        for who, err in v.manifest:
            problems.append((shape, MANIFEST_RULE, who, err, ""))
        if fills:
            v.sharing = sharing_check(d, a, b, fb, res_a, size, want, scratch, io_trace,
                                      explained=[r for *_, r in v.differs if r],
                                      problems=problems, shape=shape)
        rows.append({"door": door, "fops": d.fops, "kernel": os.uname().release, "layout": layout,
                     "shape": shape, "size": size, "datalayout": layout_of(image, shape) if size else None,
                     "shared_file": shared_file,
                     "result": v.result(), "ok": not [p for p in problems if p[0] == shape],
                     "shared": {k: doors.summary(x) for k, x in seen_a.items()},
                     "twin": {k: doors.summary(x) for k, x in seen_t.items()}})
    with open(artifacts / "doors.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if problems:
        rules = sorted({p[1] for p in problems})
        pytest.fail(f"door {door} ({d.fops}), {layout} image: a shared file and its twin differ\n"
                    + "\n".join(f"rule {r}" for r in rules) + "\n\n"
                    + tabulate([(s, r.split(":")[0], k, x, t) for s, r, k, x, t in problems],
                               headers=["shape", "rule", "what", "shared file (member " + a.name + ")", "twin"])
                    + "\n\nmounts:\n"
                    + tabulate(sharing.mounts.table(), headers=["mount", "source", "backing", "options", "dev"]),
                    pytrace=False)
