"""What must not share though the digest says so: other address-space operations (compressed
vs plain, block device vs backing file), no digest (empty files), another size, and keys
that only a wrong key construction would make equal."""

import pytest

from erofs_domains.guest.pagecache import image_set


@pytest.mark.parametrize("first,second", [
    (("base", "bdev"), ("base-z", "bdev")),
    (("base-z", "bdev"), ("base", "bdev")),
    (("base", "bdev"), ("base", "file")),
    (("base", "file"), ("base", "bdev")),
    (("base-z", "bdev"), ("base-z", "file")),
], ids=["plain-then-compressed", "compressed-then-plain", "loop-then-file", "file-then-loop",
        "compressed-loop-and-file-do-share"])
def test_other_aops_do_not_join_the_shared_inode(sharing, pc_images, domain, first, second):
    """The first inode of a key sets the shared inode's aops; a second kind is left unshared,
    and a third mount of the first kind still joins. Compressed files have z_erofs_aops on a
    loop device and on a backing file alike (erofs_get_aops()), so those two do share."""
    d = domain()
    (img1, b1), (img2, b2) = first, second
    m1 = sharing.mount(pc_images[img1], backing=b1, domain_id=d)
    m2 = sharing.mount(pc_images[img2], backing=b2, domain_id=d)
    m3 = sharing.mount(pc_images["twin" if img1 == "base" else img1], backing=b1, domain_id=d)
    sharing.read_all(m1)
    sharing.check(f"reading everything through {m1.name}")
    sharing.read_all(m2)
    sharing.dontneed(m3, "a")
    sharing.check(f"reading everything through {m2.name}, DONTNEED of a through {m3.name}")


def test_empty_files_are_not_shared(sharing, pc_images, domain):
    """mkfs writes no digest for an empty file: it keeps erofs_file_fops in every mount."""
    d = domain()
    ms = [sharing.mount(pc_images["base"], domain_id=d) for _ in range(2)]
    rows = sharing.check("mounting")
    assert {r.fops for r in rows if r.path == "empty"} == {"own"}
    assert ms


def test_same_digest_with_another_size_is_not_shared(sharing, pc_images, domain, kmsg):
    """A crafted file whose digest equals `a`'s but whose size differs: not shared, logged."""
    d = domain()
    kmsg.expect(r"i_size mismatch")
    m1, m2 = sharing.members(d, pc_images["base"], pc_images["sizeclash"])
    sharing.read(m1, "a")
    sharing.read(m2, "a-size")
    sharing.check("reading a, then a-size (same digest value, other size)")
    lines = kmsg.grep(r"i_size mismatch \(\d+ != \d+\) for the same fingerprint")
    want = f"({len(image_set.SIZECLASH['a-size'])} != {len(image_set.A)})"
    assert any(want in x.text for x in lines), (
        f"rule SIZE: expected the kernel to log 'i_size mismatch {want} for the same fingerprint' "
        f"for {m2.name}/a-size; erofs lines:\n" + "\n".join(sharing.erofs_log()))


@pytest.mark.parametrize("case", sorted(image_set.CRAFTED))
def test_keys_equal_only_under_another_construction_stay_apart(sharing, pc_images, case):
    """Two (domain, digest) pairs whose concatenations are equal under a key construction other
    than erofs' (domain, NUL, digest): reading one must not make the other resident, and each
    read returns its own file's data."""
    dom1, _, dom2, _ = image_set.CRAFTED[case]
    # The literal domain ids: a unique prefix would break the value-first pair. No shared inode
    # outlives its mounts (LIFETIME), so an earlier test with these ids leaves nothing behind.
    img = pc_images[f"crafted-{case}"]
    m1 = sharing.mount(img, domain_id=dom1)
    m2 = sharing.mount(img, domain_id=dom2)
    sharing.read(m1, "p")
    sharing.check(f"reading p through {m1.name} (domain {dom1!r})")
    sharing.read(m2, "q")
    sharing.check(f"reading q through {m2.name} (domain {dom2!r})")
