"""How long shared domain objects live: the volume `erofs,<D>` and a shared blob cookie stay
while any member uses them, go (Relinqs, CLOSE, committed cache files) with the last one,
and are found again in the cache by a later mount; racing the last umount of a domain with a
new mount into it; a cache file whose size no longer matches is replaced."""

import threading

import pytest
from tabulate import tabulate

from erofs_domains.guest.fscache.rig import layer_sample, overlapping_reads, reads, render_reads
from erofs_domains.guest.observe.cachedir import predict_path
from erofs_domains.guest.race import Attempts, Timeline

ORDERS = {"first": [0, 1, 2], "middle": [1, 0, 2], "last": [2, 1, 0]}


def layered_set(tiny_images, n):
    return [tiny_images.layered("base", f"app{i}") for i in range(1, n + 1)]


def large_base_file(img):
    return [p for p in img.manifest.files() if p.startswith("/base/large/")]


@pytest.mark.parametrize("leaves_first", sorted(ORDERS))
def test_unmount_order_keeps_shared_objects(rig, tiny_images, leaves_first):
    """Three members share the base blob; the first, middle or last mounted leaves first.
    After every umount: the volume and the base cookie stay while a member remains, the
    cookies the oracle releases are relinquished (stats Relinqs n=) and CLOSEd; after the
    last one nothing is left and the cache files sit at the predicted paths."""
    imgs = layered_set(tiny_images, 3)
    base = imgs[0].device_cookies[0]
    dom = rig.name("d")
    vol = f"erofs,{dom}"
    ms = [rig.must_mount(img, dom, rule="lifecycle: members mount") for img in imgs]
    for k, (img, m) in enumerate(zip(imgs, ms)):
        rig.expect_content("lifecycle: content", img, m, layer_sample(img, f"app{k + 1}")[:2] + ["/etc/layer-base"])
    start = rig.expect_state("lifecycle: three members, one base cookie")
    for step, k in enumerate(ORDERS[leaves_first]):
        s0 = rig.snapshot()
        released = rig.umount(ms[k])
        remaining = 2 - step
        rule = (f"lifecycle: volume {vol} and the base cookie stay while {remaining} member(s) remain"
                if remaining else "lifecycle: after the last umount the volume and every cookie are released")
        s1 = rig.expect_state(rule)
        if remaining and (s1.volume(vol) is None or s1.cookie(vol, base) is None):
            rig.fail(rule, snap=s1, since=s0)
        rig.expect_stat(f"lifecycle: umount of member {k + 1} relinquishes {len(released)} cookie(s) "
                        f"({', '.join(c for _, c in released)})", s0.diff(s1), {("Relinqs", "n"): len(released)})
        rig.expect_closes(f"lifecycle: CLOSE for exactly the released cookies after umount of member {k + 1}")
    rig.expect_stat("lifecycle: 7 cookies and 1 volume released in all", start.diff(rig.snapshot()),
                    {("Relinqs", "n"): 7, ("Cookies", "v"): -1, ("Cookies", "n"): -7})
    rig.expect_cache_files("lifecycle: committed cache files at the predicted paths, object size = copen size")


def test_remount_finds_the_cache(rig, tiny_images):
    """Mount, read, unmount two members; mounting them again sends OPEN for every cookie
    again (cachefiles opens the committed file) but no READ for data already cached."""
    imgs = layered_set(tiny_images, 2)
    dom = rig.name("d")
    samples = [layer_sample(img, "base") + layer_sample(img, f"app{k + 1}") for k, img in enumerate(imgs)]
    ms = [rig.must_mount(img, dom, rule="remount: first round mounts") for img in imgs]
    for img, m, sample in zip(imgs, ms, samples):
        rig.expect_content("remount: content, first round", img, m, sample)
    rig.umount_all()
    rig.expect_state("remount: all released after the first round")
    rig.expect_closes("remount: CLOSE for every cookie")
    rig.expect_cache_files("remount: cache files committed at the predicted paths")
    first = rig.daemon.requests()
    pos = rig.daemon.position()

    ms = [rig.must_mount(img, dom, rule="remount: second round mounts") for img in imgs]
    for img, m, sample in zip(imgs, ms, samples):
        rig.expect_content("remount: content from the cache", img, m, sample)
    rig.expect_state("remount: the same objects again")
    rig.expect_opens("remount: OPEN again for every cookie (two per cookie in all)")
    again = reads(rig.daemon.requests(pos))
    cached = overlapping_reads(reads(first) + again)
    if cached:
        rig.fail(f"remount: no READ for data already in the cache, got {len(cached)} READ(s) of cached ranges",
                 render_reads([b for _, b in cached]), requests_since=pos)


def test_creator_leaves_first(rig, tiny_images):
    """The member whose mount created the shared base cookie leaves first; the others keep
    using the cookie (no new OPEN) and fetch base ranges nobody read yet, correctly."""
    imgs = layered_set(tiny_images, 3)
    base = imgs[0].device_cookies[0]
    dom = rig.name("d")
    vol = f"erofs,{dom}"
    creator = rig.must_mount(imgs[0], dom, rule="creator: mounts")
    rig.expect_content("creator: content", imgs[0], creator, layer_sample(imgs[0], "base")[:2])
    others = [rig.must_mount(img, dom, rule="creator: members mount") for img in imgs[1:]]
    released = rig.umount(creator)
    if any(c == base for _, c in released):
        raise AssertionError(f"oracle: base released with members left: {released}")
    rig.expect_state("creator: the base cookie stays after its creator left")
    pos = rig.daemon.position()
    large = large_base_file(imgs[1])
    rig.expect_content("creator: a member reads uncached base data after the creator left", imgs[1], others[0], large)
    rig.daemon.wait_idle()
    fetched = reads(rig.daemon.requests(pos), vol, base)
    if not fetched:
        rig.fail("creator: base data nobody had read must be fetched through the shared cookie", requests_since=pos)
    rig.expect_opens("creator: no new OPEN for the base blob after its creator left")
    pos = rig.daemon.position()
    rig.expect_content("creator: the third member reads the same data", imgs[2], others[1], large)
    rig.daemon.wait_idle()
    refetched = reads(rig.daemon.requests(pos), vol, base)
    if refetched:
        rig.fail("creator: data fetched by one member is cached for the others", render_reads(refetched),
                 requests_since=pos)
    rig.umount_all()
    rig.expect_state("creator: all released")
    rig.expect_closes("creator: one CLOSE per cookie")


ITERATIONS = 6       # iterations in which the umount and the mount overlapped
MAX_ATTEMPTS = 18    # iterations tried to get them


def test_last_umount_races_new_mount(rig, tiny_images, kmsg):
    """The last member of domain D unmounts while a new member mounts into D, in two threads,
    until ITERATIONS iterations raced (the two system calls were in flight together): every
    mount succeeds quickly and reads its files, and fscache never waits on a volume collision
    (stats vcol= stays, no "Potential volume collision"). An iteration whose calls did not
    overlap proves nothing; it is reported and another one is run."""
    imgs = layered_set(tiny_images, 2)
    dom = rig.name("d")
    members = [rig.member(img, dom) for img in imgs]
    for m in members:
        rig.serve(m)
    before = rig.snapshot()
    cur = rig.mounts.mount_erofs(members[0].fsid, dom)
    timings = []
    headers = ("iteration", "new member", "umount s", "mount s", "overlap s", "OPEN in umount", "error")
    race = Attempts("the last umount of D and a new mount into D", wanted=ITERATIONS, limit=MAX_ATTEMPTS)
    while race.more():
        i = race.tried
        new = members[(i + 1) % 2]
        barrier = threading.Barrier(2, timeout=30)
        result = {}
        timeline = Timeline()
        pos = rig.daemon.position()

        def leave(old=cur, barrier=barrier, result=result, timeline=timeline):
            barrier.wait()
            try:
                with timeline.span("leave", f"umount {old.fsid}"):
                    rig.mounts.umount(old)
            except OSError as e:
                result["umount_error"] = e

        def join(new=new, barrier=barrier, result=result, timeline=timeline):
            barrier.wait()
            try:
                with timeline.span("join", f"mount {new.fsid}"):
                    result["mount"] = rig.mounts.mount_erofs(new.fsid, dom)
            except OSError as e:
                result["mount_error"] = e

        threads = [threading.Thread(target=leave), threading.Thread(target=join)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        (um,), (mo,) = timeline.of("umount") or [None], timeline.of("mount") or [None]
        both = um is not None and mo is not None
        overlap = um.overlap(mo) if both else 0.0
        # the kernel asked the daemon to OPEN the new member's cookie while the umount ran
        rig.daemon.wait_idle()   # requests are logged after their answer (docs/protocol.md#waiting)
        opens = [r for r in rig.daemon.requests(pos) if r["op"] == "OPEN" and r["cookie_key"] == new.fsid]
        open_in_umount = bool(both and any(um.contains(r["t"]) for r in opens))
        timings.append((i + 1, new.fsid, f"{um.end - um.start:.2f}" if um else "-",
                        f"{mo.end - mo.start:.2f}" if mo else "-", f"{overlap:.3f}",
                        "yes" if open_in_umount else "no",
                        result.get("umount_error") or result.get("mount_error") or "ok"))
        table = tabulate(timings, headers=headers) + "\n\n" + timeline.render()
        race.record(overlap > 0, table)
        (rig.artifacts / "race.txt").write_text(race.summary() + "\n" + "\n".join(race.notes) + "\n\n" + table + "\n")
        if any(t.is_alive() for t in threads):
            rig.fail("race: umount and mount of domain D must finish (a volume collision wait?)", table)
        if "mount" not in result or "umount_error" in result:
            rig.fail("race: a new mount into D racing the last umount of D must succeed", table)
        if mo.end - mo.start > 10:
            rig.fail("race: the new mount must not wait for the old volume (20 s collision timeout)", table)
        cur = result["mount"]
        rig.expect_content("race: the new member reads its files", new.image, cur,
                           ["/etc/os-release", f"/shared/from-{new.image.layers[1]}.bin"])
    rig.mounts.umount(cur)
    table = tabulate(timings, headers=headers)
    race.check()
    after = rig.expect_state("race: nothing left after the last umount")
    rig.expect_stat("race: no volume collision wait (stats Cookies vcol=)", before.diff(after),
                    {("Cookies", "vcol"): 0})
    collisions = kmsg.grep("Potential volume collision")
    if collisions:
        rig.fail("race: no volume collision wait", table + "\n" + "\n".join(map(str, collisions)))


def test_stale_object_is_replaced(rig, tiny_images):
    """A committed cache file whose size differs from the new `copen` size is stale: the
    mount gets the same single OPEN, the data are fetched again, and after the umount the
    file at the same path has the new size and object size; the old file is unlinked
    (cachefiles buries only directories in the graveyard, namei.c cachefiles_bury_object())."""
    img = tiny_images.layered("base", "app1")
    base = img.device_cookies[0]
    dom = rig.name("d")
    vol = f"erofs,{dom}"
    path = predict_path(vol, base)
    sample = layer_sample(img, "base")
    m = rig.must_mount(img, dom, rule="stale: first mount")
    rig.expect_content("stale: content", img, m, sample)
    rig.umount(m)
    rig.expect_closes("stale: CLOSE after umount")
    old = rig.expect_cache_files("stale: the base file is committed")
    old_grave = {g.name for g in old.graveyard}
    new_size = img.blobs[base].size + 3 * 4096 + 100
    pos = rig.daemon.position()
    rig.daemon.control.size_override(base, new_size)
    try:
        m = rig.must_mount(img, dom, rule="stale: mount with a different copen size")
        rig.expect_content("stale: content after the stale file was replaced", img, m, sample)
        rig.umount(m)
        rig.expect_closes("stale: CLOSE after the second umount")
    finally:
        rig.daemon.control.size_override(base, None)
    reqs = rig.daemon.requests(pos)
    base_opens = [r for r in reqs if r["op"] == "OPEN" and r["cookie_key"] == base]
    if [r.get("size") for r in base_opens] != [new_size]:
        rig.fail(f"stale: one OPEN of the base blob answered with size {new_size}", requests_since=pos)
    if not reads(reqs, vol, base):
        rig.fail("stale: the data of a stale object are fetched again (its file was replaced)", requests_since=pos)
    sizes = {**rig.served_sizes(), path: new_size}
    new = rig.expect_cache_files("stale: the base file has the new size and xattr object size",
                                 sizes={p: s for p, s in sizes.items() if p in rig.oracle.committed_files()})
    grave = [g for g in new.graveyard if g.name not in old_grave]
    if grave:
        rig.fail("stale: a replaced regular cache file is unlinked, not moved to the graveyard",
                 tabulate([(g.name, g.is_dir, g.size) for g in grave], headers=("graveyard", "dir", "size")),
                 listing=new)
