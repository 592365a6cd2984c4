"""Mount options around inode_share, against erofs_domains/guest/pagecache/rules.py, and O_DIRECT."""

import errno
import re

import pytest

from erofs_domains.guest.mounts import MountError, mountinfo
from erofs_domains.guest.pagecache import probe
from erofs_domains.guest.pagecache.rules import RULE_TEXT, KernelSide, mount_outcome


@pytest.fixture
def kernel_side(features):
    return KernelSide(
        page_cache_share=features.option("CONFIG_EROFS_FS_PAGE_CACHE_SHARE") == "y",
        fs_dax=features.option("CONFIG_FS_DAX") == "y",
        fscache_backend=features.why_no_ondemand() is None or features.version < (7, 2),
        share_word=features.pick("inode_share_log_wording", "inode_share", "inode_ishare"),
    )


def try_mount(pc_mounts, kmsg, image, options, backing="bdev"):
    mark = kmsg.mark()
    try:
        m = pc_mounts.mount(image, backing=backing, options=options)
        return 0, m, [x.text for x in kmsg.since(mark)]
    except MountError as e:
        return e.errno, None, [x.text for x in kmsg.since(mark)]


def check_outcome(pc_mounts, kmsg, image, options, want, backing="bdev"):
    from tabulate import tabulate

    err, m, log = try_mount(pc_mounts, kmsg, image, options, backing)
    missing = [rx for rx in want.log if not any(re.search(rx, line) for line in log)]
    # erofs_show_options() prints inode_share only when the superblock has it on
    info = mountinfo(m.path) if m else None
    shown = bool(info and "inode_share" in info["options"])
    if err != want.err or missing or (m and shown != want.shares):
        rows = [("mount -o " + options, errno.errorcode.get(err, "success") if err else "success", want.errname)]
        if m:
            rows.append(("inode_share in mountinfo", "yes" if shown else "no", "yes" if want.shares else "no"))
        pytest.fail(
            f"rule {want.rule} broken: {RULE_TEXT[want.rule]}\n\n"
            + tabulate(rows, headers=["what", "seen", "expected"])
            + f"\nmountinfo options: {info['raw'] if info else '(not mounted)'}"
            + "\n\nlog lines expected (regex): " + (", ".join(want.log) or "(none)")
            + "\nmissing: " + (", ".join(missing) or "(none)")
            + "\nkernel log of the mount:\n" + ("\n".join(f"  {x}" for x in log) or "  (none)"),
            pytrace=False)
    return m


@pytest.mark.pagecache_options  # also on a 7.0+ kernel without CONFIG_EROFS_FS_PAGE_CACHE_SHARE
@pytest.mark.parametrize("options", [
    "inode_share",                      # no domain_id
    "inode_share,dax",
    "inode_share,domain_id=D,dax",
    "inode_share,domain_id=D,dax=always",
    "fsid=F,domain_id=D",
    "domain_id=D",                      # a domain without inode_share: a plain mount
    "inode_share,domain_id=D",          # sharing on; without the option: logged, a plain mount
], ids=["share-without-domain", "share-dax-without-domain", "share-dax", "share-dax-always", "fsid",
        "domain-without-share", "share-with-domain"])
def test_rejected_or_plain(pc_mounts, pc_images, kmsg, kernel_side, domain, options):
    options = options.replace("D", domain())
    want = mount_outcome(options, kernel_side)
    for rx in want.log:
        kmsg.expect(rx)
    check_outcome(pc_mounts, kmsg, pc_images["base"], options, want)


@pytest.mark.parametrize("backing", ["bdev", "file"])
def test_dax_never_is_allowed_with_inode_share(sharing, pc_images, kmsg, kernel_side, require, domain, backing):
    require.fs_dax()
    d = domain()
    want = mount_outcome(f"inode_share,domain_id={d},dax=never", kernel_side)
    assert want.err == 0 and want.shares
    m1 = sharing.mount(pc_images["base"], backing=backing, domain_id=d, extra=("dax=never",))
    m2 = sharing.mount(pc_images["twin"], backing=backing, domain_id=d, extra=("dax=never",))
    sharing.read(m1, "a")
    sharing.check("reading a through the first dax=never mount")
    table = sharing.mounts.table()
    assert all("dax=never" in row[3] and "inode_share" in row[3] for row in table), (
        f"rule SHARE_ON broken: {RULE_TEXT['SHARE_ON']} (with dax=never); mountinfo: {table}")
    assert m2


def test_image_without_digests_mounts_with_sharing_off(sharing, pc_images, kmsg, kernel_side, domain):
    d = domain()
    want = mount_outcome(f"inode_share,domain_id={d}", kernel_side, image_has_digests=False)
    mark = kmsg.mark()
    m1 = sharing.mount(pc_images["base-nodigest"], domain_id=d)
    m2 = sharing.mount(pc_images["base-nodigest"], domain_id=d)
    log = [x.text for x in kmsg.since(mark)]
    assert all(any(re.search(rx, x) for x in log) for rx in want.log), (
        f"rule {want.rule} broken: {RULE_TEXT[want.rule]}; expected {want.log} in:\n" + "\n".join(log))
    table = sharing.mounts.table()
    assert all("inode_share" not in row[3] for row in table), (
        f"rule {want.rule} broken: {RULE_TEXT[want.rule]}; mountinfo still shows inode_share: {table}")
    sharing.read_all(m1)
    sharing.check(f"reading everything through {m1.name}")
    assert m2


def test_o_direct_is_refused_on_shared_files_only(sharing, pc_images, domain):
    """erofs_ishare_file_open(): EINVAL; the same plain file unshared on a block device opens."""
    from tabulate import tabulate

    d = domain()
    shared = sharing.mount(pc_images["base"], domain_id=d)
    plain = sharing.mount(pc_images["base"], inode_share=False)
    rows = []
    for m, want in ((shared, errno.EINVAL), (plain, 0)):
        for p in ("a", "b"):
            got = probe.open_direct(m.path / p)
            rows.append((m.describe(), p, errno.errorcode.get(got, "ok") if got else "ok",
                         errno.errorcode.get(want, "ok") if want else "ok"))
    bad = [r for r in rows if r[2] != r[3]]
    assert not bad, (f"rule NO_DIRECT_IO broken: {RULE_TEXT['NO_DIRECT_IO']}\n"
                     + tabulate(rows, headers=["mount", "file", "open(O_DIRECT)", "expected"]))


def test_remount_keeps_the_domain(sharing, pc_images, kmsg, domain):
    """A remount with another domain_id logs that it is ignored; the files still share with the
    old domain and not with the new one."""
    old, new = domain("old"), domain("new")
    kmsg.expect(r"ignoring reconfiguration for domain_id")
    m1 = sharing.mount(pc_images["base"], domain_id=old)
    m2 = sharing.mount(pc_images["twin"], domain_id=old)
    mark = kmsg.mark()
    sharing.remount(m2, f"inode_share,domain_id={new}")
    log = [x.text for x in kmsg.since(mark)]
    assert any("ignoring reconfiguration for domain_id." in x for x in log), (
        f"rule REMOUNT_KEEPS_DOMAIN broken: {RULE_TEXT['REMOUNT_KEEPS_DOMAIN']}; log of the remount:\n"
        + "\n".join(log))
    m3 = sharing.mount(pc_images["base"], domain_id=new)
    sharing.read_all(m2)
    sharing.check(f"remounting {m2.name} with domain_id={new}, reading everything through it")
    sharing.dontneed(m1, "a")
    sharing.check(f"DONTNEED of a through {m1.name}")
    assert m3
