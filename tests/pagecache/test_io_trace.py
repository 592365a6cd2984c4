"""The erofs_read_folio/erofs_readahead tracepoints name the inode (device, nid) that really does
the I/O: for a shared file that is one member of its group (erofs_real_inode()), once for all;
for an unshared file its own inode."""

import os

import pytest
from tabulate import tabulate

from erofs_domains.guest.pagecache.oracle import RULES


def inode_names(sharing):
    """{(dev, nid): (mount, file)} of every file of every mount (erofs' i_ino is the nid)."""
    out = {}
    for m in sharing.by_name.values():
        for p in sharing.images[m.name].files:
            out[(m.dev, os.stat(m.path / p).st_ino)] = (m.name, p)
    return out


def file_io(io_trace, names):
    """The data I/O since the last call, as [(who, event)]; who is None for an unknown inode."""
    return [(names.get((e.dev, e.nid)), e) for e in io_trace.take() if not e.directory]


def fail(rule, what, rows, sharing):
    pytest.fail(f"rule {rule} broken: {RULES[rule]}\n{what}\n\n"
                + tabulate(rows, headers=["reader", "file", "I/O done by", "event", "allowed"])
                + "\n\nmounts:\n"
                + tabulate(sharing.mounts.table(), headers=["mount", "source", "backing", "options", "dev"]),
                pytrace=False)


@pytest.mark.parametrize("backing", ["bdev", "file"])
def test_a_shared_file_is_read_once_for_all_members(sharing, pc_images, domain, io_trace, backing):
    d = domain()
    ms = [sharing.mount(pc_images["base" if i % 2 == 0 else "twin"], backing=backing, domain_id=d)
          for i in range(4)]
    names = inode_names(sharing)
    io_trace.take()
    sharing.read(ms[0], "b")
    group = sharing.oracle.peers(ms[0].name, "b")
    io = file_io(io_trace, names)
    rows = [(ms[0].name, "b", who, str(e), who in group) for who, e in io]
    if not io or any(who not in group for who, _ in io):
        fail("KEY", "the first read of b must do I/O, through inodes of its group only", rows, sharing)
    for m in ms[1:]:
        sharing.read(m, "b")
        again = file_io(io_trace, names)
        if again:
            fail("RESIDENT", f"reading b again through {m.name} did I/O",
                 [(m.name, "b", who, str(e), False) for who, e in again], sharing)
    sharing.check("reading b through every member")


def test_separate_domains_and_plain_mounts_each_do_their_own_io(sharing, pc_images, domain, io_trace):
    ms = [sharing.mount(pc_images["base"], domain_id=domain(x)) for x in ("d", "d1")]
    ms.append(sharing.mount(pc_images["base"], inode_share=False))
    names = inode_names(sharing)
    io_trace.take()
    rows, bad = [], False
    for m in ms:
        sharing.read(m, "a")
        group = sharing.oracle.peers(m.name, "a")
        io = file_io(io_trace, names)
        rows += [(m.name, "a", who, str(e), who in group) for who, e in io] or [(m.name, "a", "-", "(none)", False)]
        bad |= not io or any(who not in group for who, _ in io)
    if bad:
        fail("KEY", "each reader's I/O must be done by its own mount's inodes", rows, sharing)
    sharing.check("reading a through each mount")
