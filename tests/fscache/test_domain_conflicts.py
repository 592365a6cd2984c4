"""Which mounts collide (docs/domains.md#conflicts): an fsid must be unique in its domain, among the
domain's blob names too (EEXIST); a volume key `erofs,<x>` is taken by a non-domain fsid x or
by a live domain x (EBUSY); the same fsid in two domains is fine; `device=` naming another
member's fsid shares that member's primary cookie; remount cannot move a mount to another
fsid or domain.  A refused mount changes nothing: no OPEN, no Acquire, the first mount
still reads correctly.

Never use fsid/domain/blob names of 249-255 bytes or with `/` here: 253-255-byte cookie keys
in a domain hit a BUG_ON in cachefiles_cook_key() and hang the mount (docs/domains.md#key-lengths).
"""

import errno
import re

import pytest

from erofs_domains.guest.fscache.rig import layer_sample

SAMPLE = ["/etc/os-release", "/shared/from-base.bin"]


def refused(rig, out, err, log_rx, rule):
    """`out` failed with `err` and the kernel logged why (`log_rx`)."""
    if out.errno != err:
        rig.fail(f"{rule}: expected {errno.errorcode[err]}, got {out.errname}",
                 str(out.error) if out.error else "(mounted)")
    if not any(re.search(log_rx, line) for line in out.error.log):
        rig.fail(f"{rule}: the kernel must say why ({log_rx!r})", str(out.error))


def test_same_fsid_twice_in_domain_is_eexist(rig, tiny_images):
    img = tiny_images.layered("base", "app1")
    dom = rig.name("d")
    first = rig.must_mount(img, dom, rule="conflict: first mount")
    s0 = rig.expect_state("conflict: one member")
    out = rig.mount(img, dom, rule="conflict: same fsid twice in one domain -> EEXIST")
    refused(rig, out, errno.EEXIST, rf"{re.escape(img.fsid)} already exists in domain {dom}",
            "conflict: same fsid twice in one domain")
    s1 = rig.expect_state("conflict: a refused member changes no fscache object")
    rig.expect_stat("conflict: a refused member acquires no cookie", s0.diff(s1),
                    {("Acquire", "n"): 0, ("Cookies", "n"): 0})
    rig.expect_opens("conflict: a refused member sends no OPEN")
    rig.expect_content("conflict: the first mount still reads correctly", img, first,
                       SAMPLE + layer_sample(img, "app1"))


def test_fsid_equal_to_a_blob_of_the_domain_is_eexist(rig, tiny_images):
    img = tiny_images.layered("base", "app1")
    base = img.device_cookies[0]
    dom = rig.name("d")
    first = rig.must_mount(img, dom, rule="conflict: first mount")
    rig.expect_state("conflict: one member")
    other = tiny_images.layer("base")  # a real image behind the name, were it ever opened
    out = rig.mount(other, dom, fsid=base, rule="conflict: fsid = a blob name of the domain -> EEXIST")
    refused(rig, out, errno.EEXIST, rf"{base} already exists in domain {dom}",
            "conflict: fsid equal to a device blob of the domain")
    rig.expect_state("conflict: a refused member changes no fscache object")
    rig.expect_opens("conflict: a refused member sends no OPEN")
    rig.expect_content("conflict: the first mount still reads correctly", img, first, SAMPLE)


def test_same_fsid_twice_without_domain_is_ebusy(rig, tiny_images):
    img = tiny_images.layered("base", "app1")
    fsid = rig.name("f")
    first = rig.must_mount(img, fsid=fsid, rule="conflict: first mount")
    s0 = rig.expect_state("conflict: one mount")
    out = rig.mount(img, fsid=fsid, rule="conflict: same fsid twice without domain -> EBUSY")
    refused(rig, out, errno.EBUSY, rf"failed to register volume for erofs,{fsid}",
            "conflict: same fsid twice without domain")
    s1 = rig.expect_state("conflict: a refused mount changes no fscache object")
    rig.expect_stat("conflict: a refused mount acquires nothing", s0.diff(s1), {("Acquire", "n"): 0})
    rig.expect_opens("conflict: a refused mount sends no OPEN")
    rig.expect_content("conflict: the first mount still reads correctly", img, first, SAMPLE)


@pytest.mark.parametrize("first", ["domain", "fsid"])
def test_fsid_equal_to_a_live_domain_is_ebusy(rig, tiny_images, first):
    """`fsid=D` without domain while domain D is live, and domain D while `fsid=D` is
    mounted without domain: both want the volume `erofs,D` -> EBUSY for the second."""
    a, b = tiny_images.layered("base", "app1"), tiny_images.layered("base", "app2")
    d = rig.name("d")
    if first == "domain":
        m = rig.must_mount(a, d, rule="conflict: domain member mounts")
        out = rig.mount(b, fsid=d, rule="conflict: fsid=D without domain while domain D is live -> EBUSY")
    else:
        m = rig.must_mount(a, fsid=d, rule="conflict: fsid=D mounts without domain")
        out = rig.mount(b, d, rule="conflict: domain D while fsid=D is mounted without domain -> EBUSY")
    refused(rig, out, errno.EBUSY, rf"failed to register volume for erofs,{d}",
            f"conflict: volume erofs,{d} taken ({first} first)")
    rig.expect_state("conflict: a refused mount changes no fscache object")
    rig.expect_opens("conflict: a refused mount sends no OPEN")
    rig.expect_content("conflict: the first mount still reads correctly", a, m, SAMPLE)


def test_same_fsid_in_two_domains(rig, tiny_images):
    """Same fsid in D1 and D2: both mount, two volumes, the fsid's cookie in each."""
    img = tiny_images.layered("base", "app1")
    d1, d2 = rig.name("d"), rig.name("d")
    ms = [rig.must_mount(img, d, rule="conflict: same fsid in two domains mounts") for d in (d1, d2)]
    snap = rig.expect_state("conflict: same fsid in two domains: two volumes, a primary cookie in each")
    for d in (d1, d2):
        if snap.cookie(f"erofs,{d}", img.fsid) is None:
            rig.fail(f"conflict: cookie {img.fsid} in erofs,{d}", snap=snap)
    rig.expect_opens("conflict: each domain opens its own copy of every blob")
    for m in ms:
        rig.expect_content("conflict: both read correctly", img, m, SAMPLE)


def test_device_naming_a_member_fsid_shares_its_primary_cookie(rig, tiny_images, require):
    """Member 1 mounts the base layer image as fsid=L; member 2 (base+app1) says
    `device=L,device=<app1>`: its first device is member 1's primary cookie, shared (no
    OPEN, no Acquire), and stays when member 1 leaves. On 6.1.y that cookie's inode belongs to
    member 1's superblock and the guest dies (rule bug_shared_primary_inode): tests/host probes it."""
    require.not_bug("bug_shared_primary_inode")
    layer = tiny_images.layer("base")
    img = tiny_images.layered("base", "app1")
    dom = rig.name("d")
    name_l = rig.name("l")
    vol = f"erofs,{dom}"
    m1 = rig.must_mount(layer, dom, fsid=name_l, rule="device=fsid: the layer mounts as fsid=L")
    s0 = rig.expect_state("device=fsid: one member")
    m2 = rig.must_mount(img, dom, devices=[name_l, img.device_cookies[1]],
                        rule="device=fsid: a member naming L as its device mounts")
    s1 = rig.expect_state(f"device=fsid: cookie {name_l} shared, not duplicated")
    rig.expect_stat("device=fsid: member 2 acquires only its primary and app cookies", s0.diff(s1),
                    {("Acquire", "n"): 2, ("Acquire", "ok"): 2})
    rig.expect_opens(f"device=fsid: no second OPEN for {name_l} (oracle: one)")
    rig.expect_content("device=fsid: the layer reads correctly", layer, m1, ["/base/small/s008-4096.dat"])
    rig.expect_content("device=fsid: member 2 reads base data through the shared cookie", img, m2,
                       layer_sample(img, "base") + layer_sample(img, "app1"))
    rig.umount(m1)
    snap = rig.expect_state(f"device=fsid: {name_l} stays while member 2 uses it")
    if snap.cookie(vol, name_l) is None:
        rig.fail(f"device=fsid: {name_l} stays while member 2 uses it", snap=snap)
    rig.expect_content("device=fsid: member 2 still reads", img, m2, ["/base/large/large-0.bin"])
    rig.umount_all()
    rig.expect_state("device=fsid: all released")
    rig.expect_closes("device=fsid: one CLOSE per cookie")


def test_remount_cannot_change_fsid_or_domain(rig, tiny_images, kmsg):
    """`mount -o remount,fsid=X` / `domain_id=Y` succeed but change nothing: mountinfo,
    sysfs and fscache objects stay; the kernel logs "ignoring reconfiguration"."""
    img = tiny_images.layered("base", "app1")
    dom = rig.name("d")
    loner = rig.name("f")
    md = rig.must_mount(img, dom, rule="remount: domain member mounts")
    mf = rig.must_mount(img, fsid=loner, rule="remount: non-domain mount")
    before = {m.path: (m.mountinfo["options"], m.sysfs_dir) for m in (md, mf)}
    s0 = rig.expect_state("remount: two mounts")
    mark = kmsg.mark()
    asks = [(md, f"fsid={rig.name('x')}"), (md, f"domain_id={rig.name('y')}"), (mf, f"domain_id={rig.name('y')}"),
            (mf, f"fsid={rig.name('x')},domain_id={rig.name('y')}")]
    for m, opts in asks:
        try:
            rig.mounts.remount(m, opts)
        except OSError as e:
            rig.fail(f"remount: `remount,{opts}` is accepted (and ignored)", f"{m.path}: {e}")
    ignored = [line for line in kmsg.since(mark) if "ignoring reconfiguration for fsid|domain_id" in line.text]
    if len(ignored) != len(asks):
        rig.fail(f"remount: the kernel logs \"ignoring reconfiguration\" once per remount ({len(asks)}), "
                 f"got {len(ignored)}")
    after = {m.path: (m.mountinfo["options"], m.sysfs_dir) for m in (md, mf)}
    if after != before:
        rig.fail("remount: mountinfo options and sysfs directory unchanged",
                 "\n".join(f"{p}: {before[p]} -> {after[p]}" for p in before))
    for m in (md, mf):
        opts = after[m.path][0]
        if opts.get("fsid") != m.fsid or opts.get("domain_id") != m.domain_id or not after[m.path][1].is_dir():
            rig.fail("remount: mountinfo shows the mount's own fsid/domain_id", f"{m.path}: {opts}")
    s1 = rig.expect_state("remount: fscache objects unchanged")
    rig.expect_stat("remount: nothing acquired or relinquished", s0.diff(s1),
                    {("Acquire", "n"): 0, ("Relinqs", "n"): 0})
    rig.expect_opens("remount: no OPEN")
    rig.expect_content("remount: still reads", img, md, SAMPLE)
