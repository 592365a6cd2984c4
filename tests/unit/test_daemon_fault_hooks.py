"""The daemon hooks the fault tests (tests/fscache/test_daemon_replies.py) rely on, against the
fake /dev/cachefiles of fake_device.py: close-before-copen, copen twice, EMFILE starvation,
pwrite/ioctl probes and answering held-back READs late."""

from __future__ import annotations

import errno
import os
import resource

import pytest

from erofs_domains.programs.ondemand import faults
from tests.unit.fake_device import PAGE, anon_closed, file_anon, pipe_anon


@pytest.mark.parametrize("fault", ["close_anon_before_copen", "close_anon_early"])
def test_a_fault_closing_the_anon_fd_acts_once_around_the_copen(harness, fault):
    """Before the copen the kernel fails the OPEN with EBADFD; right after it, the kernel
    re-opens the object. Either way the fault acts once: the next OPEN keeps its fd."""
    getattr(harness.ctl, fault)(cookie="blob1")
    assert harness.ctl.status()["faults"][0]["once"] is True
    reader, anon = pipe_anon()
    msg_id, _ = harness.kernel.open("blob1", anon)
    assert harness.kernel.recv() == b"copen %d,10000" % msg_id
    harness.ctl.wait_idle()
    assert anon_closed(reader)
    assert harness.ctl.status()["objects"] == {} and harness.ctl.status()["faults"] == []
    (entry,) = harness.entries("OPEN")
    assert entry["fault"] == fault and entry["write_errnos"] == [0]
    reader, anon = pipe_anon()
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    harness.ctl.wait_idle()
    assert not anon_closed(reader)
    assert harness.ctl.status()["objects"] == {str(obj): "blob1"}


def test_copen_twice_writes_the_reply_again(harness):
    harness.ctl.copen_twice(cookie="blob1")
    _reader, anon = pipe_anon()
    msg_id, obj = harness.kernel.open("blob1", anon)
    assert [harness.kernel.recv(), harness.kernel.recv()] == [b"copen %d,10000" % msg_id] * 2
    harness.ctl.wait_idle()
    assert harness.ctl.status()["objects"] == {str(obj): "blob1"}
    (entry,) = harness.entries("OPEN")
    assert entry["write_errnos"] == [0, 0] and entry["fault"] == "copen_twice"


def test_starve_fds_makes_the_next_fd_allocation_fail():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    saved = faults.starve_fds()
    try:
        try:
            fd = os.dup(0)
        except OSError as e:
            err = e.errno
        else:
            os.close(fd)
            err = 0
    finally:
        faults.restore_fds(saved)
    assert err == errno.EMFILE
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_emfile_fault_is_one_shot(harness):
    harness.ctl.emfile()
    assert harness.ctl.status()["faults"] == [{"name": "emfile", "cookie": None, "once": True}]
    _reader, anon = pipe_anon()
    harness.kernel.open("blob1", anon)   # the fake device needs no fd: the read just works
    harness.kernel.recv()
    harness.ctl.wait_idle()
    assert harness.ctl.status()["faults"] == []


def test_probe_pwrite_writes_the_blob_bytes(harness, blobs):
    anon = file_anon(harness.tmp / "obj")
    harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.ctl.wait_idle()
    r = harness.ctl.probe_pwrite("blob2", PAGE, PAGE)
    assert (r["errno"], r["written"]) == (0, PAGE)
    assert (harness.tmp / "obj").read_bytes()[PAGE:2 * PAGE] == blobs[1]["blob2"][PAGE:2 * PAGE]
    (probe,) = harness.entries("PROBE")
    assert (probe["off"], probe["len"], probe["bytes_written"]) == (PAGE, PAGE, PAGE)


def test_probe_read_complete_and_serve_ignored(harness, blobs):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.ctl.fail_read("ignore", cookie="blob2", once=True)
    msg_id = harness.kernel.read(obj, 0, PAGE)
    harness.ctl.wait_idle()
    assert harness.ctl.status()["ignored"] == [msg_id]
    assert harness.ctl.probe_read_complete("blob2", 12345) == 0   # the fake kernel accepts anything
    assert harness.completion() == (anon, 12345)
    assert harness.ctl.serve_ignored() == {"served": [msg_id], "errors": {}}
    assert harness.completion() == (anon, msg_id)
    assert harness.ctl.status()["ignored"] == []
    assert (harness.tmp / "obj").read_bytes()[:PAGE] == blobs[1]["blob2"][:PAGE]
    late = [e for e in harness.entries("READ") if e["fault"] == "served_late"]
    assert [e["msg_id"] for e in late] == [msg_id]
