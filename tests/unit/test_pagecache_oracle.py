"""The page-cache sharing oracle (erofs_domains/guest/pagecache/oracle.py), on the host."""

import pytest

from erofs_domains.guest.pagecache.oracle import (
    COMPRESSED,
    PLAIN_BDEV,
    PLAIN_FILE,
    FileSpec,
    MountSpec,
    Oracle,
    aops_of,
    sharing_key,
)

A = FileSpec("a", 8192, b"sha256:" + b"A" * 32)
A2 = FileSpec("copy-of-a", 8192, b"sha256:" + b"A" * 32)
B = FileSpec("b", 5000, b"sha256:" + b"B" * 32)
E = FileSpec("empty", 0, None)
AZ = FileSpec("a", 8192, b"sha256:" + b"A" * 32, compressed=True)
A_SIZE = FileSpec("a", 4096, b"sha256:" + b"A" * 32)
FILES = (A, A2, B, E)


def mount(o, name, files=FILES, backing="bdev", share=True, domain="d", digests=True):
    o.mount(name, MountSpec(tuple(files), backing, share, domain, digests))
    for f in files:
        o.lookup(name, f.path)


def test_key_is_domain_nul_value():
    assert sharing_key("d1", b"X") == b"d1\0X"
    # the NUL keeps a domain that is a prefix of another apart from a value that starts with the rest
    assert sharing_key("d", b"1X") != sharing_key("d1", b"X")


def test_aops_follow_layout_and_backing():
    assert aops_of(A, "bdev") == PLAIN_BDEV
    assert aops_of(A, "file") == PLAIN_FILE
    assert aops_of(AZ, "bdev") == aops_of(AZ, "file") == COMPRESSED


def test_one_domain_shares_reads_and_drops():
    o = Oracle()
    mount(o, "m1")
    mount(o, "m2")
    assert o.peers("m1", "a") == {("m1", "a"), ("m1", "copy-of-a"), ("m2", "a"), ("m2", "copy-of-a")}
    o.read("m1", "a")
    assert o.resident("m2", "copy-of-a") and not o.resident("m2", "b")
    o.dontneed("m2", "a")
    assert not o.resident("m1", "a")


def test_domains_without_sharing_and_empty_files_share_nothing():
    o = Oracle()
    mount(o, "d", domain="d")
    mount(o, "d1", domain="d1")
    mount(o, "plain", share=False, domain=None)
    mount(o, "domain-only", share=False, domain="d")
    mount(o, "nodigest", digests=False)
    o.read("d", "a")
    assert not o.resident("d1", "a")
    assert o.verdict("plain", "a").rule == "NO_SHARE"
    assert o.verdict("domain-only", "a").rule == "NO_SHARE"
    assert o.verdict("nodigest", "a").rule == "NO_SHARE"
    assert o.verdict("d", "empty").rule == "NO_DIGEST"
    o.read("plain", "b")
    assert o.resident("plain", "b") and not o.resident("d", "b")


@pytest.mark.parametrize("first,second", [
    (("bdev", FILES), ("file", FILES)),
    (("bdev", FILES), ("bdev", (AZ,))),
    (("bdev", (AZ,)), ("bdev", FILES)),
])
def test_the_first_inode_sets_the_aops(first, second):
    o = Oracle()
    mount(o, "m1", first[1], first[0])
    mount(o, "m2", second[1], second[0])
    mount(o, "m3", first[1], first[0])
    assert o.verdict("m2", "a").rule == "AOPS" and not o.verdict("m2", "a").shared
    assert ("m3", "a") in o.peers("m1", "a")


def test_other_size_is_not_shared_and_logged():
    o = Oracle()
    mount(o, "m1", (A,))
    mount(o, "m2", (A_SIZE,))
    v = o.verdict("m2", "a")
    assert (v.shared, v.rule) == (False, "SIZE")
    assert v.log == "i_size mismatch (4096 != 8192) for the same fingerprint"


def test_shared_inode_dies_with_its_last_member():
    o = Oracle()
    mount(o, "m1", backing="file")
    o.read("m1", "a")
    mount(o, "m2")
    assert o.verdict("m2", "a").rule == "AOPS"      # the file-backed shared inode is there
    o.umount("m1")
    assert o.verdict("m2", "a").rule == "AOPS"      # ONCE: m2's inode keeps its verdict
    mount(o, "m3")
    assert o.verdict("m3", "a").shared and not o.resident("m3", "a")
    o.drop_caches(2)
    assert o.verdict("m2", "a").shared              # evicted and looked up again: now it joins
    assert o.peers("m3", "a") == {("m2", "a"), ("m3", "a")}


def test_drop_caches_2_frees_shared_inodes_without_open_members():
    o = Oracle()
    mount(o, "m1")
    mount(o, "m2")
    o.read("m1", "a")
    o.drop_caches(2, open_nodes=frozenset({("m2", "a")}))
    assert o.resident("m1", "a")                    # rejoins the inode m2 keeps open
    o.read("m1", "b")
    o.drop_caches(2)
    assert not o.resident("m1", "a") and not o.resident("m1", "b")


def test_drop_caches_keeps_open_inodes():
    o = Oracle()
    mount(o, "m1")
    o.read("m1", "a")
    o.drop_caches(2, open_nodes=frozenset({("m1", "a")}))
    assert ("m1", "a") in o.inodes and ("m1", "b") not in o.inodes
    assert o.resident("m1", "a")
    o.drop_caches(1)
    assert not o.resident("m1", "a")


def test_groups_and_errors():
    o = Oracle()
    mount(o, "m1")
    with pytest.raises(ValueError):
        o.mount("m1", MountSpec(FILES, "bdev"))
    with pytest.raises(KeyError):
        o.lookup("m1", "nope")
    assert o.groups() == [{("m1", "a"), ("m1", "copy-of-a")}]


def test_drop_caches_2_keeps_an_unshared_inode_that_has_pages():
    """inode_lru_isolate() skips an inode whose own mapping has pages (mapping_shrinkable()):
    an unshared file that was read keeps its inode, pages and verdict; members of a shared file
    hold no pages of their own and go (seen on 7.2.13: the oracle had evicted both)."""
    o = Oracle()
    mount(o, "m1")
    mount(o, "plain", share=False)
    o.read("m1", "a")
    o.read("plain", "a")
    o.drop_caches(2)
    assert ("m1", "a") not in o.inodes and not o.resident("m1", "a")
    assert ("plain", "a") in o.inodes and o.resident("plain", "a")
    o.drop_caches(3)
    assert ("plain", "a") not in o.inodes and not o.resident("plain", "a")
