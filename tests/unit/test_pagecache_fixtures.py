"""Pure parts of erofs_domains/guest/pagecache: digest patching, option rules, trace parsing, kernel rules."""

import errno
import subprocess
from pathlib import Path

import pytest

from erofs_domains.guest.kernel_features import KernelFeatures
from erofs_domains.guest.pagecache import images, probe
from erofs_domains.guest.pagecache.rules import KernelSide, mount_outcome

OLD = b"sha256:" + bytes(range(32))


def image_with(value: bytes) -> bytearray:
    """An inline entry head, the value, its slot's zero padding, then other bytes."""
    pad = images.slot(len(value)) - images.ENTRY_HEAD - len(value)
    return bytearray(b"\x11" * 100 + b"\x00\x80" + len(value).to_bytes(2, "little") + value + b"\0" * pad
                     + b"\x22" * 50)


@pytest.mark.parametrize("new_len", [37, 38, 39, 40])
def test_patch_value_in_place(new_len):
    img = image_with(OLD)
    new = b"N" * new_len
    at = images.patch_value(img, OLD, new)
    assert at == 104 and len(img) == 100 + 44 + 50
    assert int.from_bytes(img[at - 2 : at], "little") == new_len
    assert img[at : at + new_len] == new and img[at + new_len : at + 40] == b"\0" * (40 - new_len)
    assert img[-50:] == b"\x22" * 50


@pytest.mark.parametrize("bad,why", [
    (b"N" * 36, "slot"), (b"N" * 41, "slot"), (b"", "empty"),
])
def test_patch_value_refuses_another_slot(bad, why):
    with pytest.raises(ValueError, match=why):
        images.patch_value(image_with(OLD), OLD, bad)


def test_patch_value_needs_one_entry_head():
    img = image_with(OLD) + image_with(OLD)
    with pytest.raises(ValueError, match="2 times"):
        images.patch_value(img, OLD, b"N" * 39)
    img = bytearray(b"\x00" * 10 + OLD)
    with pytest.raises(ValueError, match="entry head"):
        images.patch_value(img, OLD, b"N" * 39)


def test_crc32c_is_the_kernels():
    # standard CRC-32C("123456789") = 0xE3069283 = ~crc32c(~0, ...)
    assert images.crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def test_mkfs_digest():
    assert images.mkfs_digest(b"") is None
    assert len(images.mkfs_digest(b"x")) == 39


SIDE_72 = KernelSide(page_cache_share=True, fs_dax=True, fscache_backend=False)


@pytest.mark.parametrize("options,side,err,rule", [
    ("inode_share,domain_id=d", SIDE_72, 0, "SHARE_ON"),
    ("inode_share", SIDE_72, errno.EINVAL, "SHARE_NEEDS_DOMAIN"),
    ("inode_share,domain_id=d,dax", SIDE_72, errno.EINVAL, "SHARE_EXCLUDES_DAX"),
    ("inode_share,domain_id=d,dax=always", SIDE_72, errno.EINVAL, "SHARE_EXCLUDES_DAX"),
    ("inode_share,domain_id=d,dax=never", SIDE_72, 0, "SHARE_ON"),
    ("inode_share,domain_id=d,dax=never", KernelSide(True, False, False), errno.EINVAL, "DAX_NEEDS_FS_DAX"),
    ("fsid=f,domain_id=d", SIDE_72, errno.EINVAL, "FSID_GONE"),
    ("domain_id=d", SIDE_72, 0, "SHARE_OFF"),
    ("inode_share,domain_id=d", KernelSide(False, False, False), 0, "NO_PAGE_CACHE_SHARE"),
])
def test_mount_outcome(options, side, err, rule):
    out = mount_outcome(options, side)
    assert (out.err, out.rule) == (err, rule)


def test_kernel_without_the_option_logs_both_not_supported():
    out = mount_outcome("inode_share,domain_id=d", KernelSide(False, False, False))
    assert out.log == (r"erofs: domain_id option not supported", r"erofs: inode_share option not supported")
    assert not out.shares


def test_image_without_digests_turns_sharing_off():
    out = mount_outcome("inode_share,domain_id=d", SIDE_72, image_has_digests=False)
    assert (out.err, out.shares, out.rule) == (0, False, "SHARE_NEEDS_DIGESTS")


def test_parse_trace():
    text = """
 python3-80 [001] ..... 12.5: erofs_readahead: dev = (7,1), nid = 42, start = 0 nrpage = 16 raw = 1
 python3-80 [001] ..... 12.6: erofs_read_folio: dev = (0,40), nid = 768, FILE, index = 3, order = 2, raw = 1
 python3-80 [001] ..... 12.7: erofs_lookup: dev = (7,1), pnid = 36, name = a
"""
    evs = probe.parse_trace(text)
    assert [(e.event, e.dev, e.nid, e.first_page, e.pages) for e in evs] == [
        ("erofs_readahead", (7, 1), 42, 0, 16), ("erofs_read_folio", (0, 40), 768, 3, 4)]
    assert not evs[1].directory


def features(release, config=None, mkfs="1.9.4"):
    return KernelFeatures(release=release, config=config, has_cachefiles_dev=False, mkfs_version=mkfs)


FULL = {o: "y" for o in ("CONFIG_EROFS_FS", "CONFIG_EROFS_FS_XATTR", "CONFIG_EROFS_FS_PAGE_CACHE_SHARE",
                         "CONFIG_EROFS_FS_BACKED_BY_FILE", "CONFIG_EROFS_FS_ZIP", "CONFIG_EXT4_FS",
                         "CONFIG_BLK_DEV_LOOP", "CONFIG_IKCONFIG_PROC", "CONFIG_FS_DAX",
                         "CONFIG_EVENT_TRACING")}


def test_pagecache_rules_by_version_and_config():
    assert features("7.2.13-amd64", FULL).why_no_pagecache_share() is None
    assert "does not apply to kernel 6.12.117" in features("6.12.117", FULL).why_no_pagecache_share()
    no = dict(FULL, CONFIG_EROFS_FS_PAGE_CACHE_SHARE="n")
    assert "CONFIG_EROFS_FS_PAGE_CACHE_SHARE" in features("7.2.13", no).why_no_pagecache_share()
    assert "no /proc/config.gz" in features("7.2.13", None).why_no_pagecache_share()
    assert "1.9" in features("7.2.13", FULL, mkfs="1.8.10").why_no_digest_mkfs()
    assert features("7.2.13", FULL).why_no_digest_mkfs() is None
    assert "FS_DAX" in features("7.2.13", dict(FULL, CONFIG_FS_DAX="n")).why_no_fs_dax()
    assert "removed in 7.2" in features("7.2.13", FULL).why_no_ondemand()


def test_build_marks_compressed_files_and_crafts(tmp_path, erofs_utils):
    from erofs_domains.guest.pagecache import image_set

    mkfs = erofs_utils.mkfs
    z = images.build(tmp_path / "z.erofs", image_set.BASE, compress=True, mkfs=mkfs)
    assert {p: s.compressed for p, s in z.specs.items()} == {
        "a": True, "b": True, "copy-of-a": True, "empty": False, "sub/d": True}
    assert z.specs["empty"].digest is None
    c = images.build(tmp_path / "c.erofs", **image_set.recipes()["crafted-value-first"], mkfs=mkfs)
    data = c.path.read_bytes()
    assert image_set.CRAFTED["value-first"][1] in data
    assert images.mkfs_digest(c.files["p"]) not in data
    fsck = Path(mkfs).with_name("fsck.erofs")
    if fsck.exists():  # the superblock checksum was recomputed: the image is sound
        r = subprocess.run([str(fsck), str(c.path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_pagecache_suite_is_a_declared_skip_before_7_0_even_under_strict():
    from fixtures.requirements import Requirements

    req = Requirements(features("6.12.117", dict(FULL, CONFIG_EROFS_FS_PAGE_CACHE_SHARE="n")), strict=True)
    with pytest.raises(pytest.skip.Exception, match="rule pagecache_share .*does not apply to kernel 6.12"):
        req.pagecache_share()
    req = Requirements(features("7.2.13", dict(FULL, CONFIG_EROFS_FS_PAGE_CACHE_SHARE="n")), strict=True)
    with pytest.raises(pytest.fail.Exception, match="CONFIG_EROFS_FS_PAGE_CACHE_SHARE"):
        req.pagecache_share()
    Requirements(features("7.2.13", FULL), strict=True).pagecache_share()


def test_option_tests_run_on_7_0_without_the_option_and_skip_before():
    """`pagecache_options` tests (test_options.py's mount outcomes) need a 7.0+ kernel only: the
    options are parsed there with the option built in or not (erofs_fc_parse_param())."""
    from fixtures.requirements import Requirements

    no = dict(FULL, CONFIG_EROFS_FS_PAGE_CACHE_SHARE="n")
    assert features("7.2.13", no).why_no_pagecache_options() is None
    assert features("7.2.13", FULL).why_no_pagecache_options() is None
    assert "no /proc/config.gz" in features("7.2.13", None).why_no_pagecache_options()
    Requirements(features("7.2.13", no), strict=True).pagecache_options()
    req = Requirements(features("6.12.117", no), strict=True)
    with pytest.raises(pytest.skip.Exception, match="rule pagecache_share .*does not apply to kernel 6.12"):
        req.pagecache_options()
    req = Requirements(features("7.2.13", FULL, mkfs="1.8.10"), strict=True)
    with pytest.raises(pytest.fail.Exception, match="1.9"):
        req.pagecache_options()


def test_fill_super_refusals_follow_the_wording_rule():
    """7.3 names the option `inode_share` in erofs_fc_fill_super()'s refusals, 7.0 - 7.2 `inode_ishare`
    (rule inode_share_log_wording): the expected log line follows the kernel side."""
    from erofs_domains.guest.kernel_features import KernelFeatures

    for release, word in (("7.2.13", "inode_ishare"), ("7.3.4", "inode_share")):
        k = KernelFeatures(release=release, config={}, has_cachefiles_dev=False)
        side = KernelSide(True, True, False, share_word=k.pick("inode_share_log_wording", "inode_share",
                                                               "inode_ishare"))
        assert mount_outcome("inode_share", side).log == (f"erofs: domain_id is needed when {word} is on",)
        assert mount_outcome("inode_share,domain_id=d,dax=always", side).log == (
            f"erofs: FSDAX is not allowed when {word} is on",)
