"""What erofs mounts share through fscache: nothing without a domain, one volume and the
cookies (cache files, fetched data) of equally named blobs inside one `domain_id`, nothing
across domains.  Expectations come from erofs_domains/guest/fscache/oracle.py; every channel is checked:
/proc/fs/fscache volumes, cookies and stats, the daemon's requests, the cache directory,
and the files read through the mounts.

Images are tiny (tests/fscache/conftest.py `tiny_images`); names are unique per test, so
every volume starts with a cold cache (docs/observables.md#the-cache-directory).
"""

import pytest
from tabulate import tabulate

from erofs_domains.guest.fscache.rig import (
    layer_large,
    layer_sample,
    overlapping_reads,
    read_bytes,
    reads,
    render_reads,
    round_up,
)
from erofs_domains.guest.observe.cachedir import predict_path

N_VALUES = [2, 3, 8]


def layered_set(tiny_images, n):
    """n merged images base+app<i>: a common base layer, one app layer each."""
    return [tiny_images.layered("base", f"app{i}") for i in range(1, n + 1)]


# Files whose data sit in the blobdev image's data blob: a few chunks, read by every mount.
BLOBDEV_SAMPLE = ["/small/s008-4096.dat", "/small/s009-4097.dat", "/links/hard-a"]


@pytest.mark.parametrize("n", N_VALUES)
def test_no_domain_same_blob_name_is_not_shared(rig, tiny_images, n):
    """N mounts without domain_id, all naming their data blob `device=sharedblob`: N volumes
    `erofs,<fsid>`, 2N cookies, N OPENs and N cache files for the blob, its data fetched N times."""
    img = tiny_images.blobdev("nd", blob_name="sharedblob")
    blob = "sharedblob"
    before = rig.snapshot()
    ms = []
    for _ in range(n):
        fsid = rig.name("nd")
        ms.append((fsid, rig.must_mount(img, fsid=fsid, devices=[blob], rule="no domain: every fsid mounts")))

    rule = f"no domain: {n} mounts give {n} volumes erofs,<fsid> and {2 * n} cookies"
    during = rig.expect_state(rule)
    rig.expect_stat("no domain: Acquire n=/ok= +1 per cookie (2 per mount)", before.diff(during),
                    {("Acquire", "n"): 2 * n, ("Acquire", "ok"): 2 * n, ("Cookies", "v"): n})
    rig.expect_opens(f"no domain: the blob is opened once per volume ({n} OPENs)")

    for _, m in ms:
        rig.expect_content("no domain: every mount reads its files", img, m, BLOBDEV_SAMPLE)
    rig.daemon.wait_idle()
    reqs = rig.daemon.requests()
    fetched = {fsid: read_bytes(reqs, f"erofs,{fsid}", blob) for fsid, _ in ms}
    if len(set(fetched.values())) != 1 or not all(fetched.values()):
        rig.fail(f"no domain: the blob's data must be fetched once per volume ({n} times), same ranges each",
                 tabulate(sorted(fetched.items()), headers=("fsid", f"READ bytes of {blob}")))

    rig.umount_all()
    after = rig.expect_state("no domain: after umount no erofs volume or cookie is left")
    rig.expect_closes("no domain: one CLOSE per opened cookie")
    rig.expect_stat("no domain: every cookie relinquished", during.diff(after),
                    {("Relinqs", "n"): 2 * n, ("Cookies", "v"): -n})
    listing = rig.expect_cache_files("no domain: cache files at the predicted paths")
    blob_files = [f.path for f in listing.files if f.name == f"D{blob}"]
    if len(blob_files) != n:
        rig.fail(f"no domain: {n} cache files for {blob}, got {len(blob_files)}", "\n".join(blob_files),
                 listing=listing)


@pytest.mark.parametrize("n", N_VALUES)
def test_shared_domain_fetches_base_once(rig, tiny_images, n):
    """N layered images sharing a base layer in one domain: one volume erofs,<D>, one cookie,
    one OPEN and one cache file for the base blob; its bytes are fetched once; Acquire counts
    only new cookie names; a later member reads what an earlier one fetched without READ."""
    imgs = layered_set(tiny_images, n)
    base = imgs[0].device_cookies[0]
    assert all(img.device_cookies[0] == base for img in imgs), "images must share the base layer's tag"
    dom = rig.name("d")
    vol = f"erofs,{dom}"
    before = rig.snapshot()
    ms = []
    for k, img in enumerate(imgs):
        s0 = rig.snapshot()
        m = rig.must_mount(img, dom, rule="shared domain: every member mounts")
        ms.append(m)
        rig.daemon.wait_idle()
        new = rig.outcomes[-1].predicted.opened
        rig.expect_stat(f"shared domain: Acquire n=/ok= delta = new cookie names ({len(new)}) for member {k + 1}",
                        s0.diff(rig.snapshot()), {("Acquire", "n"): len(new), ("Acquire", "ok"): len(new)})
        pos = rig.daemon.position()
        rig.expect_content("shared domain: members read their files", img, m,
                           layer_sample(img, "base") + layer_sample(img, f"app{k + 1}"))
        rig.daemon.wait_idle()
        base_reads = reads(rig.daemon.requests(pos), vol, base)
        if k == 0 and not base_reads:
            rig.fail("shared domain: the first member must fetch the base data it reads", requests_since=pos)
        if k > 0 and base_reads:
            rig.fail(f"shared domain: no READ when member {k + 1} reads a base range already fetched, "
                     f"got {len(base_reads)}", render_reads(base_reads), requests_since=pos)

    during = rig.expect_state(f"shared domain: one volume {vol} with {2 * n + 1} cookies (base once)")
    rig.expect_stat("shared domain: one volume, 2N+1 cookies acquired", before.diff(during),
                    {("Acquire", "n"): 2 * n + 1, ("Acquire", "ok"): 2 * n + 1, ("Cookies", "v"): 1})
    got = rig.expect_opens("shared domain: base blob must be opened once")
    if got[(vol, base)] != 1:
        rig.fail(f"shared domain: base blob must be opened once, got {got[(vol, base)]} OPENs")

    # A large base file through the first member (everything, for N=2), then through the last.
    large = [p for p in layer_large(imgs[0], "base") if "/large/" in p]
    rig.expect_content("shared domain: content of the first member", imgs[0], ms[0], None if n == 2 else large)
    pos = rig.daemon.position()
    rig.expect_content("shared domain: base files through another member", imgs[-1], ms[-1], large)
    rig.daemon.wait_idle()
    again = reads(rig.daemon.requests(pos), vol, base)
    if again and n > 1:
        rig.fail(f"shared domain: member {n} re-fetched base data member 1 had read ({len(again)} READs)",
                 render_reads(again), requests_since=pos)
    base_reads = reads(rig.daemon.requests(), vol, base)
    size = imgs[0].blobs[base].size
    dup = overlapping_reads(base_reads)
    total = sum(r["len"] for r in base_reads)
    if dup or total > round_up(size):
        rig.fail(f"shared domain: base bytes must be fetched once: {total} bytes READ for a {size}-byte blob, "
                 f"{len(dup)} overlapping READ pairs", render_reads([r for pair in dup for r in pair][:40]))

    rig.umount_all()
    after = rig.expect_state("shared domain: after the last umount no volume or cookie is left")
    rig.expect_closes("shared domain: one CLOSE per cookie (base once)")
    rig.expect_stat("shared domain: every cookie relinquished once", during.diff(after),
                    {("Relinqs", "n"): 2 * n + 1, ("Cookies", "v"): -1})
    listing = rig.expect_cache_files("shared domain: cache files at the predicted paths, one per cookie")
    base_file = predict_path(vol, base)
    if [f.path for f in listing.files if f.name == f"D{base}"] != [base_file]:
        rig.fail(f"shared domain: one cache file for the base blob, at {base_file}", listing=listing)


def test_separate_domains_share_nothing(rig, tiny_images):
    """The same two images in D1 and in D2: two volumes, a base cookie (OPEN, cache file) in
    each, and each domain fetches the base data itself."""
    imgs = layered_set(tiny_images, 2)
    base = imgs[0].device_cookies[0]
    d1, d2 = rig.name("d"), rig.name("d")
    ms = {(d, i): rig.must_mount(img, d, rule="separate domains: every member mounts")
          for d in (d1, d2) for i, img in enumerate(imgs)}
    rig.expect_state("separate domains: one volume per domain, one base cookie per domain")
    got = rig.expect_opens("separate domains: one OPEN of the base blob per domain")
    assert got[(f"erofs,{d1}", base)] == got[(f"erofs,{d2}", base)] == 1
    for d in (d1, d2):
        pos = rig.daemon.position()
        rig.expect_content("separate domains: content", imgs[0], ms[(d, 0)], layer_sample(imgs[0], "base"))
        rig.daemon.wait_idle()
        if not reads(rig.daemon.requests(pos), f"erofs,{d}", base):
            rig.fail(f"separate domains: domain {d} must fetch the base data itself (its own cache file)",
                     requests_since=pos)
    rig.umount_all()
    rig.expect_state("separate domains: all released")
    rig.expect_closes("separate domains: one CLOSE per cookie")
    rig.expect_cache_files("separate domains: a base cache file in each domain's volume")


def test_domain_ids_are_compared_exactly(rig, tiny_images):
    """Domains `d`, `d1`, `d10` (one a prefix of the next) are three domains: three volumes,
    the same fsid in each, their own base cookie, three sysfs entries."""
    img = tiny_images.layered("base", "app1")
    p = rig.name("x")
    doms = [f"{p}d", f"{p}d1", f"{p}d10"]
    ms = [rig.must_mount(img, d, rule="domain names: same fsid in d, d1, d10 mounts") for d in doms]
    snap = rig.expect_state("domain names: d, d1, d10 are separate volumes with their own cookies")
    vols = sorted(v.key for v in snap.volumes)
    assert vols == sorted(f"erofs,{d}" for d in doms), rig.report("domain names: three volumes", str(vols))
    rig.expect_opens("domain names: each domain opens its own blobs")
    sysfs = [m.sysfs_dir for m in ms]
    if len(set(sysfs)) != 3 or not all(s.is_dir() for s in sysfs):
        rig.fail("domain names: one sysfs directory <domain>,<fsid> per mount", "\n".join(map(str, sysfs)))
    for m in ms:
        rig.expect_content("domain names: content", img, m, ["/etc/os-release", "/shared/from-app1.bin"])
    rig.umount_all()
    rig.expect_state("domain names: all released")
    rig.expect_closes("domain names: one CLOSE per cookie")


# Mixed topologies: (image, domain label, fsid) per mount, in mount order; the expected
# volumes, cookies, OPENs, errnos and cache files come from the oracle.
#   image: A/B/C = base+app1/2/3, N = blobdev "nd" (device=sharedblob)
#   domain label: D1/D2 (fresh names per test) or None
#   fsid: None = the image's own name in a domain, a fresh name without one; "=D1" = the
#         name of domain D1 (a non-domain fsid colliding with the domain's volume)
TOPOLOGIES = {
    "two-domains-and-none": [("A", "D1", None), ("B", "D1", None), ("C", "D2", None), ("N", None, None)],
    "one-image-three-ways": [("A", "D1", None), ("B", "D1", None), ("A", "D2", None), ("A", None, None),
                             ("B", None, None)],
    "fsid-named-like-a-domain": [("A", "D1", None), ("B", None, "=D1"), ("C", "D2", None), ("B", "D2", None)],
}


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_mixed_topology(rig, tiny_images, topology):
    """Mount a table of images into domains and none; after every mount and umount, volumes,
    cookies and OPEN/CLOSE counts are the oracle's; content is right; cache files predicted."""
    images = {"A": tiny_images.layered("base", "app1"), "B": tiny_images.layered("base", "app2"),
              "C": tiny_images.layered("base", "app3"), "N": tiny_images.blobdev("nd", blob_name="sharedblob")}
    doms = {"D1": rig.name("d"), "D2": rig.name("d")}
    rows = TOPOLOGIES[topology]
    outs = []
    for letter, dlabel, fsid in rows:
        img = images[letter]
        dom = doms[dlabel] if dlabel else None
        if fsid and fsid.startswith("="):
            fsid = doms[fsid[1:]]
        elif fsid is None and dom is None:
            fsid = rig.name(letter.lower())
        devices = ["sharedblob"] if letter == "N" else []
        outs.append(rig.mount(img, dom, fsid=fsid, devices=devices, rule=f"topology {topology}: errno"))
        rig.expect_state(f"topology {topology}: objects after mounting {outs[-1].member.describe()}")
    rig.expect_opens(f"topology {topology}: OPENs per cookie")
    for o in outs:
        if o.mount is not None:
            sample = BLOBDEV_SAMPLE[1:] if o.member.image.layout == "blobdev" else ["/etc/os-release",
                                                                                    "/shared/from-base.bin"]
            rig.expect_content(f"topology {topology}: content", o.member.image, o.mount, sample)
    for o in outs:  # in mount order, not LIFO: the first members go first
        if o.mount is not None:
            rig.umount(o.mount)
            rig.expect_state(f"topology {topology}: objects after unmounting {o.member.describe()}")
    rig.expect_closes(f"topology {topology}: CLOSEs per cookie")
    rig.expect_cache_files(f"topology {topology}: cache files at the predicted paths")
