"""Members come and go: any unmount order, remount, drop_caches, shared inodes that outlive
their members, concurrent readers; reads stay correct throughout."""

import itertools
import threading

import pytest


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))),
                         ids=lambda o: "-".join(f"m{i + 1}" for i in o))
def test_any_unmount_order_keeps_the_rest_sharing(sharing, pc_images, domain, order):
    """All six orders of three members (base, twin, base): whichever leaves, the shared inode
    stays with the others, and so do its pages."""
    d = domain()
    ms = [sharing.mount(pc_images[img], domain_id=d) for img in ("base", "twin", "base")]
    sharing.read_all(ms[order[0]])
    for i in order[:-1]:
        sharing.umount(ms[i])
        rest = [m for m in ms if m.name in sharing.by_name]
        sharing.check(f"unmounting {ms[i].name}")
        sharing.dontneed(rest[0], "b")
        sharing.check(f"DONTNEED of b through {rest[0].name}")
        sharing.read(rest[-1], "b")
        sharing.check(f"reading b through {rest[-1].name}")


@pytest.mark.parametrize("what", [1, 2, 3])
def test_drop_caches_empties_every_member(sharing, pc_images, domain, what):
    d = domain()
    ms = [sharing.mount(pc_images[img], domain_id=d) for img in ("base", "twin")]
    plain = sharing.mount(pc_images["base"], inode_share=False)
    sharing.read_all(ms[0])
    sharing.read_all(plain)
    sharing.drop_caches(what)
    sharing.check(f"echo {what} > drop_caches")
    sharing.read(ms[1], "a")
    sharing.check(f"reading a through {ms[1].name} again")


def test_shared_pages_die_with_the_last_member(sharing, pc_images, domain):
    """LIFETIME: the pages stay while one member is mounted and go with the last one: a new
    member of the domain starts with nothing resident."""
    d = domain()
    m1, m2 = sharing.members(d, pc_images["base"], pc_images["twin"])
    sharing.read_all(m1)
    sharing.umount(m1)
    sharing.check(f"unmounting the reader {m1.name}")
    sharing.umount(m2)
    m3 = sharing.mount(pc_images["base"], domain_id=d)
    sharing.check("unmounting the last member, mounting a new one in the domain")
    assert m3


def test_an_open_member_keeps_the_pages_through_inode_reclaim(sharing, pc_images, domain):
    """drop_caches 2 evicts every cached member inode but the open one: the shared inode lives on
    with its pages, and the evicted members join it again when looked up."""
    d = domain()
    ms = [sharing.mount(pc_images[img], domain_id=d) for img in ("base", "twin", "base")]
    sharing.read(ms[0], "b")
    sharing.hold(ms[1], "b")
    sharing.drop_caches(2)
    sharing.check("keeping b open in one member, echo 2 > drop_caches")
    sharing.release(ms[1], "b")
    sharing.drop_caches(2)
    sharing.check("closing it, echo 2 > drop_caches again")


def test_a_verdict_is_kept_while_the_inode_is_cached(sharing, pc_images, domain):
    """ONCE: loop-device files are left unshared while a file-backed member owns the shared
    inodes (AOPS), and stay so after it is gone, until they are evicted and looked up again."""
    d = domain()
    m1 = sharing.mount(pc_images["base"], backing="file", domain_id=d)
    m2 = sharing.mount(pc_images["base"], backing="bdev", domain_id=d)
    sharing.read(m1, "a")
    sharing.check("a file-backed and a loop-device member")
    sharing.umount(m1)
    m3 = sharing.mount(pc_images["twin"], backing="bdev", domain_id=d)
    sharing.read(m2, "b")
    sharing.check("unmounting the file-backed member, mounting another loop-device member")
    sharing.drop_caches(2)
    sharing.lookup(m2)
    sharing.lookup(m3)
    sharing.read(m3, "a")
    sharing.check("evicting every inode (echo 2 > drop_caches), looking the files up again")


def test_remount_with_the_same_options_keeps_sharing(sharing, pc_images, domain, kmsg):
    d = domain()
    kmsg.expect(r"ignoring reconfiguration for domain_id")
    m1, m2 = sharing.members(d, pc_images["base"], pc_images["twin"])
    sharing.read(m1, "a")
    sharing.remount(m1, f"inode_share,domain_id={d}")
    sharing.check(f"remounting {m1.name}")
    sharing.read(m2, "b")
    sharing.dontneed(m1, "a")
    sharing.check(f"reading b through {m2.name}, DONTNEED of a through {m1.name}")


def test_concurrent_readers_in_eight_mounts(sharing, pc_images, domain):
    """Eight members read every file at once (two vCPUs): every read returns the image's data and
    every file ends up resident in every member."""
    d = domain()
    ms = [sharing.mount(pc_images["base" if i % 2 else "twin"], domain_id=d) for i in range(8)]
    errors = []

    def reader(m):
        try:
            sharing.read_all(m)
        except Exception as e:  # noqa: BLE001 - reported below with the mount
            errors.append((m.name, repr(e)))

    threads = [threading.Thread(target=reader, args=(m,)) for m in ms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"readers failed: {errors}"
    sharing.check("eight concurrent readers")


def test_members_mount_and_unmount_between_reads(sharing, pc_images, domain):
    d = domain()
    keep = sharing.mount(pc_images["base"], domain_id=d)
    for i in range(4):
        m = sharing.mount(pc_images["twin" if i % 2 else "other"], domain_id=d)
        sharing.read(m, "a")
        sharing.check(f"round {i}: reading a through the new member {m.name}")
        sharing.umount(m)
        sharing.dontneed(keep, "a")
        sharing.check(f"round {i}: unmounting it, DONTNEED of a through {keep.name}")
