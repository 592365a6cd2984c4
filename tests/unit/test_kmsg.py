"""erofs_domains/guest/kmsg.py on records from a fake /dev/kmsg (a SOCK_SEQPACKET socket keeps each
record a read() of its own, as the device does): nothing it cannot read is dropped."""

from __future__ import annotations

import socket

import pytest

from erofs_domains.guest.kmsg import UNREAD, KmsgChecker, KmsgReader


@pytest.fixture
def fake_kmsg():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    reader = KmsgReader.__new__(KmsgReader)
    reader.fd, reader.lines = theirs.detach(), []
    yield ours, reader
    reader.close()
    ours.close()


def test_unparsable_records_are_kept_and_reported(fake_kmsg):
    dev, reader = fake_kmsg
    for rec in (b"6,10,1000,-;erofs: mounted\n", b"garbage without a header", b"4,12,3000,-;WARNING: at x\n"):
        dev.send(rec)
    checker = KmsgChecker(reader)
    lines = checker.lines()
    assert [line.level for line in lines] == [6, UNREAD, 4]
    assert "garbage without a header" in lines[1].text and lines[1].seq == 10
    assert [(kind, line.seq) for kind, line in checker.problems()] == [("unread", 10), ("WARNING", 12)]


def test_expected_lines_do_not_hide_unread_ones(fake_kmsg):
    dev, reader = fake_kmsg
    dev.send(b"3,1,1,-")  # no ';': not a record
    checker = KmsgChecker(reader)
    checker.expect(".*")
    assert [kind for kind, _ in checker.problems()] == ["unread"]
