"""Mounts in one domain share the page cache of files with the same digest; other domains,
mounts without a domain or without inode_share share nothing."""

import pytest

BACKINGS = ("bdev", "file")


@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_reading_through_one_member_fills_the_domain_and_dropping_empties_it(sharing, pc_images, domain, n,
                                                                              backing):
    """N mounts (half of them of another image with the same files) in one domain: a read
    through the first makes each file resident in every mount; DONTNEED through the last empties
    it everywhere."""
    d = domain()
    ms = [sharing.mount(pc_images["base" if i % 2 == 0 else "twin"], backing=backing, domain_id=d)
          for i in range(n)]
    sharing.check("mounting, nothing read yet")
    sharing.read_all(ms[0])
    sharing.check(f"reading every file through {ms[0].name}")
    for p in ("a", "b", "sub/d"):
        sharing.dontneed(ms[-1], p)
    sharing.check(f"DONTNEED of a, b, sub/d through {ms[-1].name}")


def test_each_member_reads_and_drops_in_turn(sharing, pc_images, domain):
    d = domain()
    ms = [sharing.mount(pc_images[img], domain_id=d) for img in ("base", "twin", "base")]
    for m in ms:
        sharing.read(m, "b")
        sharing.check(f"reading b through {m.name}")
        sharing.dontneed(m, "b")
        sharing.check(f"DONTNEED of b through {m.name}")


@pytest.mark.parametrize("mounts", [1, 2])
def test_identical_files_inside_one_mount_share(sharing, pc_images, domain, mounts):
    """`a` and `copy-of-a` have one digest: reading `a` makes `copy-of-a` resident too."""
    d = domain()
    ms = [sharing.mount(pc_images["base"], domain_id=d) for _ in range(mounts)]
    sharing.read(ms[0], "a")
    sharing.check("reading a")
    sharing.dontneed(ms[-1], "copy-of-a")
    sharing.check("DONTNEED of copy-of-a")


def test_images_with_some_common_files_share_only_those(sharing, pc_images, domain):
    d = domain()
    sharing.mount(pc_images["base"], domain_id=d)
    m2 = sharing.mount(pc_images["other"], domain_id=d)
    sharing.read_all(m2)
    sharing.check(f"reading every file of {m2.name}")


def test_prefix_named_domains_share_nothing(sharing, pc_images, domain):
    """Domains d, d1, d10 (each a prefix of the next) and a mount per domain: every read stays
    in its own domain."""
    ms = [sharing.mount(pc_images["base"], domain_id=domain(x)) for x in ("d", "d1", "d10")]
    for m in ms:
        sharing.read(m, "a")
        sharing.check(f"reading a through {m.name}")
        sharing.dontneed(m, "a")


def test_two_mounts_per_domain_share_within_and_not_across(sharing, pc_images, domain):
    ms = [sharing.mount(pc_images[img], domain_id=domain(x))
          for x, img in (("d1", "base"), ("d10", "base"), ("d1", "twin"), ("d10", "twin"))]
    sharing.read_all(ms[0])
    sharing.check(f"reading everything through {ms[0].name} (domain d1)")
    sharing.read(ms[3], "b")
    sharing.check(f"reading b through {ms[3].name} (domain d10)")


@pytest.mark.parametrize("plain", ["no-options", "domain-only"])
def test_mounts_without_sharing_share_nothing(sharing, pc_images, domain, plain):
    """A mount without options, or with domain_id but no inode_share, keeps its own page cache,
    next to two sharing mounts of the same image."""
    d = domain()
    s1 = sharing.mount(pc_images["base"], domain_id=d)
    if plain == "no-options":
        p = sharing.mount(pc_images["base"], inode_share=False)
    else:
        p = sharing.mount(pc_images["base"], inode_share=False, domain_id=d)
    s2 = sharing.mount(pc_images["twin"], domain_id=d)
    sharing.read_all(p)
    sharing.check(f"reading everything through the unshared {p.name}")
    sharing.read(s1, "b")
    sharing.dontneed(p, "b")
    sharing.check(f"reading b through {s1.name}, DONTNEED through {p.name}")
    assert s2


def test_reads_return_each_files_own_data(sharing, pc_images, domain):
    """Every file through every member (and in reverse order) equals the image's data."""
    d = domain()
    ms = [sharing.mount(pc_images[img], domain_id=d) for img in ("base", "other", "twin")]
    for m in ms + ms[::-1]:
        sharing.read_all(m)
    sharing.check("reading everything through every mount")
