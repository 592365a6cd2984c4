"""The erofs_read_folio/erofs_readahead tracepoints name the inode (device, nid) that really does
the I/O: for a shared file that is one member of its group (erofs_real_inode()), once for all."""

import os

import pytest
from tabulate import tabulate

from fixtures.pagecache.oracle import RULES


def io_pages(events, members):
    """Pages of I/O done by each (mount, file) in `members` ({(dev, nid): (mount, file)})."""
    out = {}
    strangers = []
    for ev in events:
        who = members.get((ev.dev, ev.nid))
        if who is None:
            strangers.append(ev)
        else:
            out[who] = out.get(who, 0) + ev.pages
    return out, strangers


def members_of(sharing, path):
    return {(m.dev, os.stat(m.path / path).st_ino): (m.name, path) for m in sharing.by_name.values()}


def fail(rule, what, events, sharing):
    pytest.fail(f"rule {rule} broken: {RULES[rule]}\n{what}\n\nI/O events:\n"
                + ("\n".join(f"  {e}" for e in events) or "  (none)") + "\n\nmounts:\n"
                + tabulate(sharing.mounts.table(), headers=["mount", "source", "backing", "options", "dev"]),
                pytrace=False)


@pytest.mark.parametrize("backing", ["bdev", "file"])
def test_a_shared_file_is_read_once_for_all_members(sharing, pc_images, domain, io_trace, backing):
    d = domain()
    ms = [sharing.mount(pc_images["base" if i % 2 == 0 else "twin"], backing=backing, domain_id=d)
          for i in range(4)]
    io_trace.take()
    sharing.read(ms[0], "b")
    first = io_trace.take()
    who, strangers = io_pages(first, members_of(sharing, "b"))
    if not who or strangers:
        fail("RESIDENT", "the first read of b did no I/O through a member of its group", first, sharing)
    for m in ms[1:]:
        sharing.read(m, "b")
    again = [e for e in io_trace.take() if (e.dev, e.nid) in members_of(sharing, "b")]
    if again:
        fail("RESIDENT", "reading b through the other members did I/O again", again, sharing)
    sharing.check("reading b through every member")


def test_unshared_mounts_each_do_their_own_io(sharing, pc_images, domain, io_trace):
    ms = [sharing.mount(pc_images["base"], domain_id=domain(x)) for x in ("d", "d1")]
    ms.append(sharing.mount(pc_images["base"], inode_share=False))
    io_trace.take()
    rows = []
    for m in ms:
        sharing.read(m, "a")
        who, strangers = io_pages(io_trace.take(), members_of(sharing, "a"))
        rows.append((m.name, m.options, who.get((m.name, "a"), 0), sorted(who), strangers))
    bad = [r for r in rows if r[2] == 0 or set(r[3]) != {(r[0], "a")}]
    if bad:
        pytest.fail("rule KEY broken: " + RULES["KEY"] + "\n" + tabulate(
            rows, headers=["reader", "options", "its own I/O pages", "inodes that did I/O", "unknown"]),
            pytrace=False)
    sharing.check("reading a through each mount")
