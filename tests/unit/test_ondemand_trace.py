"""The cachefiles_ondemand_* trace parser (TP_printk of include/trace/events/cachefiles.h, the
same in 6.1.192 and 6.12.117), the tracefs reader, and the trace-against-daemon-log check."""

import pytest

from erofs_domains.guest.observe import ondemand_agreement as agree
from erofs_domains.guest.observe import tracefs
from erofs_domains.guest.observe.ondemand_trace import EVENTS, OndemandEvent, TraceFormatError, parse_line, parse_trace

# One object's life as trace_pipe prints it: the open, read and close events are emitted before
# cachefiles_ondemand_daemon_read() sets msg_id/object_id, so they print mid=0 oid=0.
TRACE = """\
           <...>-512     [001] .....    41.100001: cachefiles_ondemand_open: o=0000001a mid=0 oid=0 fd=7 f=0
         python3-512     [001] .....    41.100200: cachefiles_ondemand_copen: o=0000001a mid=3 l=2a000
             cat-600     [000] .....    41.200000: cachefiles_ondemand_read: o=0000001a mid=0 oid=0 s=1000 l=3000
 ondemand-read_0-513     [000] .....    41.200100: cachefiles_ondemand_fd_write: o=0000001a iB=c s=1000 l=3000
 ondemand-read_0-513     [000] .....    41.200200: cachefiles_ondemand_cread: o=0000001a mid=4
   kworker/u4:2-40      [001] .....    42.000000: cachefiles_ondemand_close: o=0000001a mid=0 oid=0
         python3-512     [001] .....    42.000100: cachefiles_ondemand_fd_release: o=0000001a oid=1
             cat-600     [000] .....    41.3: erofs_readahead: dev = (0,40), nid = 42, start = 0 nrpage = 4 raw = 1
"""

VOL, COOKIE = "erofs,d1", "3f2a"
DAEMON = [
    {"op": "OPEN", "msg_id": 3, "object_id": 1, "volume_key": VOL, "cookie_key": COOKIE, "fd": 7, "size": 0x2a000,
     "reply": "copen 3,172032", "errno": None},
    {"op": "READ", "msg_id": 4, "object_id": 1, "volume_key": VOL, "cookie_key": COOKIE, "off": 0x1000,
     "len": 0x3000, "reply": "read_complete", "errno": None},
    {"op": "CLOSE", "msg_id": 5, "object_id": 1, "volume_key": VOL, "cookie_key": COOKIE, "reply": "none"},
]


def test_every_event_parses_with_its_fields():
    evs = parse_trace(TRACE)
    assert [e.event for e in evs] == ["open", "copen", "read", "fd_write", "cread", "close", "fd_release"]
    op, cp, rd, wr, cr, cl, rel = evs
    assert (op.obj, op.msg_id, op.object_id, op.fd, op.flags, op.time) == (0x1a, 0, 0, 7, 0, 41.100001)
    assert (cp.msg_id, cp.length) == (3, 0x2a000)
    assert (rd.start, rd.length) == (0x1000, 0x3000)
    assert (wr.backer, wr.start, wr.length) == (0xc, 0x1000, 0x3000)
    assert (cr.msg_id, cl.object_id, rel.object_id) == (4, 0, 1)
    assert str(rd) == "read o=1a mid=0 oid=0 s=4096 l=12288"


def test_fd_is_decimal_and_a_negative_copen_size_reads_negative():
    assert parse_line("x-1 [000] ..... 1.0: cachefiles_ondemand_open: o=00000001 mid=0 oid=0 fd=10 f=0").fd == 10
    line = "x-1 [000] ..... 1.0: cachefiles_ondemand_copen: o=00000001 mid=2 l=fffffffffffffffe"
    assert parse_line(line).length == -2


@pytest.mark.parametrize("line", [
    "x-1 [000] ..... 1.0: cachefiles_ondemand_read: o=00000001 mid=0 s=0 l=1000",         # a field less
    "x-1 [000] ..... 1.0: cachefiles_ondemand_cread: o=00000001 id=4",                     # renamed
    "x-1 [000] ..... 1.0: cachefiles_ondemand_fd_release: o=00000001 oid=1 extra=2",       # a field more
])
def test_a_changed_format_is_an_error_naming_the_line(line):
    with pytest.raises(TraceFormatError, match="cachefiles_ondemand_"):
        parse_line(line)


def test_other_lines_are_not_events():
    assert parse_line("x-1 [000] ..... 1.0: cachefiles_ondemand_new_event: o=1") is None
    assert parse_line("CPU:1 [LOST 3 EVENTS]") is None
    assert len(EVENTS) == 7 and all(s == "cachefiles" for s, _ in EVENTS)


# ----------------------------------------------------------------- tracefs
def fake_tracefs(tmp_path, events):
    for system, event in events:
        d = tmp_path / "events" / system / event
        d.mkdir(parents=True)
        (d / "enable").write_text("0")
    for f in ("trace", "trace_pipe", "tracing_on"):
        (tmp_path / f).write_text("")
    return tmp_path


def test_trace_events_enable_take_clear_and_disable(tmp_path):
    root = fake_tracefs(tmp_path, [("erofs", "erofs_readahead"), ("cachefiles", "cachefiles_ondemand_read")])
    t = tracefs.TraceEvents((("cachefiles", "cachefiles_ondemand_read"),), root)
    assert (root / "events/cachefiles/cachefiles_ondemand_read/enable").read_text() == "1"
    assert (root / "events/erofs/erofs_readahead/enable").read_text() == "0"
    assert (root / "tracing_on").read_text() == "1"
    (root / "trace_pipe").write_text(TRACE)
    assert t.take() == TRACE
    t.close()
    assert (root / "events/cachefiles/cachefiles_ondemand_read/enable").read_text() == "0"


def test_a_missing_tracepoint_is_named(tmp_path):
    root = fake_tracefs(tmp_path, [("erofs", "erofs_readahead")])
    with pytest.raises(OSError, match="cachefiles/cachefiles_ondemand_open"):
        tracefs.TraceEvents((("cachefiles", "cachefiles_ondemand_open"),), root)


def test_an_overrun_buffer_is_an_error_not_a_short_trace(tmp_path):
    root = fake_tracefs(tmp_path, [("cachefiles", "cachefiles_ondemand_read")])
    t = tracefs.TraceEvents((("cachefiles", "cachefiles_ondemand_read"),), root)
    (root / "trace_pipe").write_text("x-1 [000] ..... 1.0: cachefiles_ondemand_cread: o=00000001 mid=4\n"
                                     "CPU:1 [LOST 30 EVENTS]\n")
    with pytest.raises(tracefs.TraceLost, match="dropped 30 event"):
        t.take()
    assert tracefs.lost_events(TRACE) == 0


# ----------------------------------------------------------------- trace against the daemon's log
def test_a_consistent_trace_and_log_agree():
    assert agree.disagreements(parse_trace(TRACE), DAEMON) == []
    names = agree.object_names(parse_trace(TRACE), DAEMON)
    assert agree.name_of(names[0x1a]) == (VOL, COOKIE)


def rules(events, requests):
    return [d.rule for d in agree.disagreements(events, requests)]


def test_a_close_the_daemon_never_logged_breaks_close():
    found = agree.disagreements(parse_trace(TRACE), DAEMON[:2])
    assert [d.rule for d in found] == ["CLOSE"]
    assert found[0].rows == [("CLOSE", VOL, COOKIE, None, None, None, 1, 0)]
    assert "CLOSE: every CLOSE the kernel made" in found[0].render()


def test_a_read_delivered_twice_breaks_read():
    assert rules(parse_trace(TRACE), DAEMON + [dict(DAEMON[1], reply="none")]) == ["READ"]


def test_a_read_the_kernel_never_completed_breaks_read_complete():
    events = [e for e in parse_trace(TRACE) if e.event != "cread"]
    assert rules(events, DAEMON) == ["READ_COMPLETE"]
    # a completion the daemon logged with an errno may have failed in the kernel too
    assert rules(events, [DAEMON[0], dict(DAEMON[1], errno=22), DAEMON[2]]) == []


def test_an_object_id_the_daemon_was_not_given_breaks_object_id():
    events = [OndemandEvent("fd_release", 0x1a, object_id=9) if e.event == "fd_release" else e
              for e in parse_trace(TRACE)]
    found = agree.disagreements(events, DAEMON)
    assert [d.rule for d in found] == ["OBJECT_ID"]
    assert found[0].rows[0][-1] == "OPEN gave oid 1"


def test_a_failed_open_is_named_by_its_fd():
    events = [OndemandEvent("open", 0x2b, fd=8)]
    failed = {"op": "OPEN", "msg_id": 6, "object_id": 2, "volume_key": VOL, "cookie_key": "gone", "fd": 8,
              "reply": "copen 6,-2", "errno": None}
    assert agree.disagreements(events, [failed]) == []
    assert rules(events, []) == ["OPEN"]


def test_the_report_names_the_rule_and_shows_the_kernel_events():
    events = parse_trace(TRACE)
    text = agree.report(agree.disagreements(events, DAEMON[:2]), events, DAEMON[:2])
    assert "CLOSE: every CLOSE the kernel made" in text
    assert "kernel trace, cachefiles_ondemand_* (7 events" in text and COOKIE in text
