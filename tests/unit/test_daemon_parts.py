"""The pieces the daemon was split into, each on its own: the fault table, the request log's
window, held READs answered through the one READ path, and `end_test` (erofs_domains/guest/fscache/daemons.py)
on a daemon running against the fake device (tests/unit/fake_device.py)."""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pytest

from erofs_domains.guest.fscache.daemons import DaemonWindow, end_test
from erofs_domains.programs.ondemand import faults
from erofs_domains.programs.ondemand.protocol import copen
from erofs_domains.programs.ondemand.reqlog import RequestWindow, read_request_log
from tests.unit.fake_device import PAGE, file_anon, pipe_anon

# --------------------------------------------------------------------------- the fault table


def test_every_fault_of_the_table_validates_and_the_one_shot_ones_are_once():
    params = {"fail_open": {"errno": "EIO"}, "copen_raw": {"text": "copen {id},1"},
              "fail_read": {"mode": "ignore"}, "delay": {"seconds": 0.5, "op": "OPEN"}}
    for name, kind in faults.FAULTS.items():
        p = faults.validate(name, {"once": False, **params.get(name, {})})
        assert p["once"] is kind.one_shot, name
        assert kind.acts and kind.effect, f"{name}: the table must say where it acts and what it does"
    assert faults.validate("fail_open", {"errno": "EIO"})["errno"] == errno.EIO


@pytest.mark.parametrize("name, params, message", [
    ("nonsense", {}, "unknown fault 'nonsense'; known: close_anon_before_copen"),
    ("fail_open", {"errno": 0}, "errno in 1..4095"),
    ("fail_read", {"mode": "later"}, "skip_data"),
    ("delay", {"seconds": -1}, "seconds >= 0"),
    ("copen_raw", {}, "text template"),
    ("copen_twice", {"cookie": 7}, "cookie must be a string"),
])
def test_bad_faults_are_refused_naming_the_problem(name, params, message):
    with pytest.raises(ValueError, match=message):
        faults.validate(name, params)


def test_open_faults_decide_the_copen_writes():
    f = faults.Faults()
    assert f.for_open("c").copens(3, 100) == ([copen(3, 100)], 1, faults.CopenOutcome("open", size=100))
    f.add("copen_raw", {"text": "copen zz,{size}", "cookie": "c"})  # rejected: the proper copen follows
    f.add("copen_twice", {})
    writes, answering, outcome = f.for_open("c").copens(3, 100)
    assert writes == [b"copen zz,100", copen(3, 100), copen(3, 100)] and answering == 2
    assert outcome.kind == "open"
    f.clear()
    f.add("copen_raw", {"text": "copen {id},zz"})  # the kernel fails the OPEN: nothing follows
    writes, answering, outcome = f.for_open("c").copens(3, 100)
    assert writes == [b"copen 3,zz"] and (outcome.kind, outcome.errno) == ("failed", errno.EINVAL)
    f.clear()
    f.add("copen_raw", {"text": "copen {id},-5", "once": True})
    writes, answering, outcome = f.for_open("other").copens(3, 100)
    assert writes == [b"copen 3,-5"] and answering == 1 and (outcome.kind, outcome.errno) == ("failed", 5)


def test_a_cookie_fault_waits_for_its_cookie_and_once_is_consumed():
    f = faults.Faults()
    f.add("fail_read", {"mode": "skip_data", "cookie": "a", "once": True})
    assert f.read_mode("b") is None
    assert f.read_mode("a") == "skip_data"
    assert f.read_mode("a") is None and f.list() == []


# --------------------------------------------------------------------------- the request log window


def test_window_keeps_unparsable_lines_and_leaves_out_a_torn_tail(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"op": "OPEN"}\n')
    w = RequestWindow(log)  # from now on
    with open(log, "a") as f:
        f.write('{"op": "READ", "msg_id": 1}\nnot json\n[1, 2]\n{"op": "CLO')
    entries, bad = w.read()
    assert [e["op"] for e in entries] == ["READ"] and bad == ["not json", "[1, 2]"]
    assert RequestWindow(log, 0).requests(op="OPEN") == [{"op": "OPEN"}]
    text = w.render()
    assert "2 line(s) of the request log are not entries" in text and "'not json'" in text
    pos = w.position()
    with open(log, "a") as f:
        f.write('SE"}\n')
    assert w.requests(since=pos) == [] and w.unparsable(since=pos) == ['SE"}']
    assert [e["op"] for e in w.requests()] == ["READ", "CLOSE"]   # once ended, the line is an entry
    with pytest.raises(ValueError, match="unparsable line"):
        read_request_log(log)


# --------------------------------------------------------------------------- held READs


def test_a_held_read_is_answered_late_through_the_read_path_without_data(harness, blobs):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.ctl.fail_read("ignore", cookie="blob2")
    first, second = harness.kernel.read(obj, 0, PAGE), harness.kernel.read(obj, PAGE, PAGE)
    harness.ctl.wait_idle()
    assert sorted(harness.ctl.status()["ignored"]) == [first, second]
    assert harness.ctl.serve_ignored(msg_id=second, with_data=False) == {"served": [second], "errors": {}}
    assert harness.completion() == (anon, second)
    assert os.path.getsize(harness.tmp / "obj") == 0
    (late,) = [e for e in harness.entries("READ") if e["fault"] == "served_late:no_data"]
    assert (late["msg_id"], late["bytes_written"], late["reply"]) == (second, 0, "read_complete")
    assert harness.ctl.status()["ignored"] == [first]


def test_a_held_read_of_a_closed_object_is_reported(harness):
    reader, anon = pipe_anon()
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    harness.ctl.fail_read("ignore")
    msg_id = harness.kernel.read(obj, 0, PAGE)
    harness.ctl.wait_idle()
    harness.kernel.close(obj)
    harness.ctl.wait_idle()
    assert harness.ctl.serve_ignored() == {"served": [], "errors": {str(msg_id): "object closed"}}


# --------------------------------------------------------------------------- end_test


def _window(harness) -> DaemonWindow:
    proc = SimpleNamespace(log_path=harness.log_path, control=harness.ctl, alive=True, cache_dir=harness.tmp / "cache")
    return DaemonWindow(proc)


def test_end_test_clears_faults_answers_held_reads_and_saves_the_slice(harness, tmp_path):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.ctl.wait_idle()
    w = _window(harness)
    harness.ctl.fail_read("ignore", cookie="blob2")
    harness.ctl.delay(5, op="OPEN")
    msg_id = harness.kernel.read(obj, 0, PAGE)
    harness.ctl.wait_idle()
    assert end_test(w, tmp_path / "slice.jsonl") == []
    st = harness.ctl.status()
    assert st["faults"] == [] and st["ignored"] == [] and harness.completion() == (anon, msg_id)
    saved = [json.loads(line) for line in (tmp_path / "slice.jsonl").read_text().splitlines()]
    assert [(e["op"], e["fault"]) for e in saved] == [("READ", "fail_read:ignore"), ("READ", "served_late:no_data")]


def test_end_test_fails_on_lines_that_are_not_requests(harness):
    w = _window(harness)
    with open(harness.log_path, "a") as f:
        f.write("garbage from nowhere\n")
    errors = end_test(w)
    assert errors and "'garbage from nowhere'" in errors[-1]


def test_a_held_read_whose_completion_fails_is_an_error_not_served(start, blobs):
    """What the kernel says to the late READ_COMPLETE decides: EINVAL (the READ is gone, e.g.
    completed through another object's fd) must be reported, or a test cannot see it."""
    def refuse(fd, msg_id):
        raise OSError(errno.EINVAL, "no such READ")

    harness = start(read_complete=refuse)
    harness.kernel.recv(), harness.kernel.recv(), harness.kernel.recv()   # dir, tag, bind
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.ctl.fail_read("ignore", once=True)
    msg_id = harness.kernel.read(obj, 0, PAGE)
    harness.ctl.wait_idle()
    assert harness.ctl.serve_ignored() == {"served": [], "errors": {str(msg_id): os.strerror(errno.EINVAL)}}
    (late,) = [e for e in harness.entries("READ") if e["fault"] == "served_late"]
    assert late["errno"] == errno.EINVAL and late["bytes_written"] == 3 * PAGE   # the whole blob
