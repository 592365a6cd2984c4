"""OnDemandDaemon against a fake /dev/cachefiles (tests/unit/fake_device.py; no kernel
support needed)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from erofs_domains.base.proc import cmd, wait_for
from erofs_domains.programs.ondemand import holder
from erofs_domains.programs.ondemand import protocol as P
from erofs_domains.programs.ondemand.client import (
    DaemonControl,
    DaemonControlError,
    DaemonDeadError,
    DaemonStartError,
    wait_ready,
)
from erofs_domains.programs.ondemand.reqlog import read_request_log
from tests.unit.fake_device import (
    DAEMON,
    PAGE,
    REPO,
    FakeKernel,
    anon_closed,
    buffer_address,
    file_anon,
    pipe_anon,
)

# --------------------------------------------------------------------------- startup

def test_binds_then_reports_ready(harness):
    assert harness.ctl.ping() == os.getpid()
    harness.kernel.expect_nothing()


def test_injected_bound_fd_writes_restore(start):
    harness = start(dev_fd_bound=True)
    assert harness.ready.getvalue().startswith("READY ")
    assert harness.kernel.recv() == b"restore"


def test_bind_failure_reports_error(start):
    kernel = FakeKernel()
    kernel.sock.close()  # every write now fails with EPIPE
    harness = start(dev_fd=kernel.dev_fd)
    harness.thread.join(5)
    assert harness.ready.getvalue().startswith(f"ERROR {errno.EPIPE} 'dir ")
    assert not os.path.exists(harness.ctl.path)


# --------------------------------------------------------------------------- OPEN / CLOSE

def test_open_known_blob_copens_its_size_and_sets_cloexec(harness):
    reader, anon = pipe_anon()
    msg_id, obj = harness.kernel.open("blob1", anon)
    assert harness.kernel.recv() == b"copen %d,10000" % msg_id
    harness.ctl.wait_idle()
    assert not os.get_inheritable(anon)
    assert not anon_closed(reader)
    st = harness.ctl.status()
    assert st["objects"] == {str(obj): "blob1"}
    assert st["counts"]["OPEN"] == 1 and st["in_flight"] == 0
    (entry,) = harness.entries()
    assert entry["op"] == "OPEN" and entry["reply"] == f"copen {msg_id},10000"
    assert (entry["volume_key"], entry["cookie_key"], entry["errno"]) == ("erofs,dom", "blob1", None)


def test_open_unknown_blob_fails_with_enoent_and_closes_fd(harness):
    assert harness.open_failed("nosuchblob") == b"copen {id},-2"


def test_close_releases_the_anon_fd(harness):
    reader, anon = pipe_anon()
    _, obj = harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.kernel.close(obj)
    harness.ctl.wait_idle()
    assert anon_closed(reader)
    assert harness.ctl.status()["objects"] == {}
    close = harness.entries("CLOSE")[0]
    assert (close["object_id"], close["cookie_key"], close["reply"]) == (obj, "blob2", "none")
    harness.kernel.expect_nothing()  # CLOSE has no reply


def test_malformed_messages_are_logged_and_survived(harness):
    harness.kernel.send(b"\x01\x02\x03")
    harness.kernel.send(P.encode_header(5, P.OP_CLOSE, 99, 1))
    harness.kernel.send(P.encode_header(6, 42, 16, 1))
    _reader, anon = pipe_anon()
    msg_id, _ = harness.kernel.open("blob1", anon)
    assert harness.kernel.recv() == b"copen %d,10000" % msg_id
    harness.ctl.wait_idle()
    bad = harness.entries("MALFORMED")
    assert [e["msg_id"] for e in bad] == [None, 5, 6]
    assert "truncated header" in bad[0]["error"] and bad[0]["raw"] == "010203"
    assert "unknown opcode 42" in bad[2]["error"]
    assert harness.ctl.status()["counts"]["MALFORMED"] == 3


# --------------------------------------------------------------------------- READ

def test_read_fills_aligned_range_with_padded_tail(harness, blobs):
    anon = file_anon(harness.tmp / "obj1")
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    msg_id = harness.kernel.read(obj, 0, PAGE)
    assert harness.completion() == (anon, msg_id)
    harness.ctl.wait_idle()
    data = (harness.tmp / "obj1").read_bytes()
    # fill_granularity 16 KiB, clipped at round_up(10000, 4096) = 12288
    assert len(data) == 12288
    assert data[:10000] == blobs[1]["blob1"] and data[10000:] == bytes(2288)
    read = harness.entries("READ")[0]
    assert (read["off"], read["len"], read["bytes_written"]) == (0, PAGE, 12288)
    assert (read["reply"], read["errno"]) == ("read_complete", None)


def test_read_writes_page_aligned_buffers_in_few_calls(start, blobs):
    calls = []

    def pwritev(fd, bufs, off):
        calls.append((off, [len(b) for b in bufs], [buffer_address(b) for b in bufs]))
        return os.pwritev(fd, bufs, off)

    harness = start(pwritev=pwritev, fill_granularity=2**20)
    anon = file_anon(harness.tmp / "big")
    _, obj = harness.kernel.open("big", anon)
    harness.kernel.recv()
    for off, length in ((0, PAGE), (2**20 + 8192, 3 * PAGE), (3 * 2**20, PAGE)):
        harness.kernel.read(obj, off, length)
        harness.completion()
    harness.ctl.wait_idle()
    assert [c[0] for c in calls] == [0, 2**20 + 8192, 3 * 2**20]
    for off, lengths, addrs in calls:
        assert off % PAGE == 0
        assert all(n % PAGE == 0 for n in lengths) and all(a % PAGE == 0 for a in addrs)
        assert len(lengths) <= 2
    assert calls[0][1] == [2**20]                  # filled to the 1 MiB boundary
    assert calls[1][1] == [2**20 - 8192]
    assert calls[2][1] == [PAGE]                   # the padded tail page only
    data = (harness.tmp / "big").read_bytes()
    blob = blobs[1]["big"]
    assert data[:2**20] == blob[:2**20]
    assert data[2**20:2**20 + 8192] == bytes(8192)     # never requested
    assert data[2**20 + 8192:2 * 2**20] == blob[2**20 + 8192:2 * 2**20]
    assert data[3 * 2**20:] == blob[3 * 2**20:] + bytes(PAGE - 123)


def _boot(harness):
    assert harness.ready.getvalue() == f"READY {os.getpid()}\n"
    assert [harness.kernel.recv() for _ in range(3)][2] == b"bind ondemand"


def test_prefetch_fills_the_next_granules_and_reads_inside_them_write_nothing(start, blobs):
    harness = start(fill_granularity=2**20, prefetch=2)
    _boot(harness)
    anon = file_anon(harness.tmp / "big")
    _, obj = harness.kernel.open("big", anon)
    harness.kernel.recv()
    harness.kernel.read(obj, 0, PAGE)
    harness.completion()
    harness.ctl.wait_idle()
    assert [(e["off"], e["len"], e["bytes_written"]) for e in harness.entries("PREFETCH")] == [
        (2**20, 2**20, 2**20), (2 * 2**20, 2**20, 2**20)]
    harness.kernel.read(obj, 2**20 + 8192, PAGE)        # inside a prefetched granule
    harness.completion()
    harness.ctl.wait_idle()
    second = harness.entries("READ")[1]
    assert (second["bytes_written"], second.get("note")) == (0, "already in the cache file")
    # its own prefetch: [2M, 3M) is there already, the tail page is not
    assert [(e["off"], e["bytes_written"]) for e in harness.entries("PREFETCH")][2:] == [(3 * 2**20, PAGE)]
    assert (harness.tmp / "big").read_bytes() == blobs[1]["big"] + bytes(PAGE - 123)


def test_a_read_inside_a_range_being_prefetched_waits_for_it_and_writes_nothing(start, blobs):
    events = []

    def pwritev(fd, bufs, off):
        events.append(("write", off))
        if off == 2**20:
            time.sleep(0.5)                        # the prefetch of [1M, 2M) is slow
        n = os.pwritev(fd, bufs, off)
        events.append(("written", off))
        return n

    harness = start(fill_granularity=2**20, prefetch=1, pwritev=pwritev,
              read_complete=lambda fd, msg_id: events.append(("complete", msg_id)))
    _boot(harness)
    anon = file_anon(harness.tmp / "big")
    _, obj = harness.kernel.open("big", anon)
    harness.kernel.recv()
    first = harness.kernel.read(obj, 0, PAGE)
    wait_for(lambda: events, what="the prefetch to start writing [1M, 2M)", timeout=5, step=0.01,
             until=lambda ev: ("write", 2**20) in ev, show=lambda ev: repr(list(ev)))
    second = harness.kernel.read(obj, 2**20 + PAGE, PAGE)
    harness.ctl.wait_idle()
    assert events.count(("write", 2**20)) == 1, events       # written once, by the prefetch
    assert events.index(("complete", second)) > events.index(("written", 2**20)), events
    assert ("complete", first) in events
    assert harness.entries("READ")[1]["bytes_written"] == 0


def test_size_override_serves_zeros_beyond_the_blob(harness, blobs):
    harness.ctl.size_override("blob2", 5 * PAGE)
    anon = file_anon(harness.tmp / "obj2")
    msg_id, obj = harness.kernel.open("blob2", anon)
    assert harness.kernel.recv() == b"copen %d,20480" % msg_id
    harness.kernel.read(obj, 2 * PAGE, 3 * PAGE)
    harness.completion()
    data = (harness.tmp / "obj2").read_bytes()
    assert data[2 * PAGE:3 * PAGE] == blobs[1]["blob2"][2 * PAGE:]
    assert data[3 * PAGE:] == bytes(2 * PAGE)
    harness.ctl.size_override("blob2", None)
    _reader, anon = pipe_anon()
    msg_id, _ = harness.kernel.open("blob2", anon)
    assert harness.kernel.recv() == b"copen %d,12288" % msg_id


def test_read_for_unknown_object_is_logged(harness):
    harness.kernel.read(77, 0, PAGE)
    harness.ctl.wait_idle()
    (read,) = harness.entries("READ")
    assert (read["object_id"], read["errno"], read["reply"]) == (77, errno.EBADF, "none")
    assert harness.completions.empty()


def test_slow_read_does_not_block_others(harness):
    slow = file_anon(harness.tmp / "slow")
    fast = file_anon(harness.tmp / "fast")
    _, slow_obj = harness.kernel.open("big", slow)
    harness.kernel.recv()
    _, fast_obj = harness.kernel.open("blob1", fast)
    harness.kernel.recv()
    harness.ctl.delay(1.0, op="READ", cookie="big")
    slow_msg = harness.kernel.read(slow_obj, 0, PAGE)
    fast_msg = harness.kernel.read(fast_obj, 0, PAGE)
    assert harness.completion(timeout=0.8) == (fast, fast_msg)
    assert harness.completion(timeout=3) == (slow, slow_msg)


def test_close_during_read_keeps_fd_until_the_read_is_done(harness, blobs):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob2", anon)
    harness.kernel.recv()
    harness.ctl.delay(0.3, op="READ", once=True)
    msg_id = harness.kernel.read(obj, 0, PAGE)
    harness.kernel.close(obj)
    assert harness.completion() == (anon, msg_id)
    harness.ctl.wait_idle()
    assert harness.entries("READ")[0]["errno"] is None
    assert (harness.tmp / "obj").read_bytes() == blobs[1]["blob2"]
    with pytest.raises(OSError):
        os.fstat(anon)  # closed after the read finished


# --------------------------------------------------------------------------- faults

def test_fail_open_once_then_normal(harness):
    harness.ctl.fail_open(errno.EIO, cookie="blob1", once=True)
    readers = []
    for cookie, expect in (("blob2", b"12288"), ("blob1", b"-5"), ("blob1", b"10000")):
        reader, anon = pipe_anon()
        readers.append(reader)
        msg_id, _ = harness.kernel.open(cookie, anon)
        assert harness.kernel.recv() == b"copen %d,%s" % (msg_id, expect)
    harness.ctl.wait_idle()
    assert [anon_closed(r) for r in readers] == [False, True, False]
    assert harness.entries("OPEN")[1]["fault"] == "fail_open"


def test_fail_open_accepts_errno_names_and_rejects_nonsense(harness):
    assert harness.ctl.fault("fail_open", errno="EACCES")["errno"] == errno.EACCES
    with pytest.raises(DaemonControlError, match="errno in 1..4095"):
        harness.ctl.fail_open(5000)
    with pytest.raises(DaemonControlError, match="unknown fault"):
        harness.ctl.fault("explode")


def test_copen_raw_octal_opens_with_the_parsed_size(harness):
    harness.ctl.copen_raw("copen {id},010", once=True)
    _reader, anon = pipe_anon()
    msg_id, obj = harness.kernel.open("blob1", anon)
    assert harness.kernel.recv() == b"copen %d,010" % msg_id
    harness.ctl.wait_idle()
    assert harness.ctl.status()["objects"] == {str(obj): "blob1"}
    assert harness.entries("OPEN")[0]["reply"] == f"copen {msg_id},010"


def test_copen_raw_rejected_falls_back_to_a_proper_copen(harness):
    harness.ctl.copen_raw("copen x,{size}", once=True)
    _reader, anon = pipe_anon()
    msg_id, _ = harness.kernel.open("blob1", anon)
    assert harness.kernel.recv() == b"copen x,10000"
    assert harness.kernel.recv() == b"copen %d,10000" % msg_id
    harness.ctl.copen_raw("copen {id}", once=True, fallback=False)
    reader2, anon2 = pipe_anon()
    msg_id2, _ = harness.kernel.open("blob1", anon2)
    assert harness.kernel.recv() == b"copen %d" % msg_id2
    harness.kernel.expect_nothing()
    harness.ctl.wait_idle()
    assert harness.ctl.status()["orphan_fds"] == 1   # the kernel's OPEN stays pending
    assert not anon_closed(reader2)


def test_copen_raw_bad_size_fails_the_open_and_closes_fd(harness):
    harness.ctl.copen_raw("copen {id},abc", once=True)
    assert harness.open_failed("blob1") == b"copen {id},abc"


def test_fail_read_skip_data_completes_without_writing(harness):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    harness.ctl.fail_read("skip_data", once=True)
    msg_id = harness.kernel.read(obj, 0, PAGE)
    assert harness.completion() == (anon, msg_id)
    harness.ctl.wait_idle()
    assert (harness.tmp / "obj").stat().st_size == 0
    read = harness.entries("READ")[0]
    assert (read["bytes_written"], read["fault"]) == (0, "fail_read:skip_data")


def test_fail_read_ignore_never_answers_and_does_not_block_wait_idle(harness):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    harness.ctl.fail_read("ignore", cookie="blob1")
    msg_id = harness.kernel.read(obj, 0, PAGE)
    harness.ctl.wait_idle(timeout=5)
    assert harness.completions.empty()
    assert harness.ctl.status()["ignored"] == [msg_id]
    harness.ctl.clear_faults()
    assert harness.ctl.status()["faults"] == []
    msg_id = harness.kernel.read(obj, 0, PAGE)
    assert harness.completion() == (anon, msg_id)


def test_wait_idle_times_out_while_a_request_is_in_flight(harness):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    harness.ctl.delay(1.0, op="READ", once=True)
    harness.kernel.read(obj, 0, PAGE)
    time.sleep(0.1)
    with pytest.raises(DaemonControlError, match="not idle after 0.2s .*in_flight=1"):
        harness.ctl.wait_idle(timeout=0.2)
    harness.ctl.wait_idle(timeout=5)
    assert harness.completions.qsize() == 1


def test_delay_open(harness):
    harness.ctl.delay(0.4, op="OPEN", once=True)
    _reader, anon = pipe_anon()
    t0 = time.monotonic()
    harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    assert time.monotonic() - t0 >= 0.35


def test_exit_abruptly_at_next_request(harness):
    harness.ctl.exit_abruptly()
    _reader, anon = pipe_anon()
    msg_id, _ = harness.kernel.open("blob1", anon)
    harness.thread.join(5)
    assert harness.exits == [1]
    assert harness.kernel.recv() == b""   # device closed without a copen
    (entry,) = harness.entries()
    assert (entry["msg_id"], entry["reply"]) == (msg_id, "exit")


def test_exit_abruptly_now_replies_first(harness):
    harness.ctl.exit_abruptly(now=True)
    harness.thread.join(5)
    assert harness.exits == [1]


# --------------------------------------------------------------------------- control channel

def test_control_errors_are_reported(harness, sockdir):
    with pytest.raises(DaemonControlError, match="unknown command 'frobnicate'"):
        harness.ctl.call("frobnicate")
    with pytest.raises(DaemonControlError, match="missing parameter 'name'"):
        harness.ctl.call("add_blob", path="/x")
    with pytest.raises(DaemonControlError, match="not a regular file"):
        harness.ctl.add_blob("x", "/nonexistent")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(harness.ctl.path)
        s.sendall(b"{not json\n[1]\n")
        f = s.makefile("rb")
        assert not json.loads(f.readline())["ok"]
        assert "JSON object" in json.loads(f.readline())["error"]
    with pytest.raises(DaemonDeadError):
        DaemonControl(str(sockdir / "nothing-here")).ping()


def test_add_blob_at_runtime(harness, tmp_path):
    extra = tmp_path / "elsewhere.img"
    extra.write_bytes(b"x" * 5000)
    harness.ctl.add_blob("late", str(extra))
    _reader, anon = pipe_anon()
    msg_id, _ = harness.kernel.open("late", anon)
    assert harness.kernel.recv() == b"copen %d,5000" % msg_id
    assert "late" in harness.ctl.status()["blobs"]


def test_cull_inuse_restore_commands(harness):
    (harness.tmp / "cache" / "cache" / "Ierofs,dom").mkdir(parents=True)
    cwd = os.getcwd()
    assert harness.ctl.cull("Dblob1", "cache/Ierofs,dom") == 0
    assert harness.kernel.recv() == b"cull Dblob1"
    assert harness.ctl.inuse("Dblob1") == 0
    assert harness.kernel.recv() == b"inuse Dblob1"
    assert harness.ctl.restore() == 0
    assert harness.kernel.recv() == b"restore"
    assert os.getcwd() == cwd
    with pytest.raises(DaemonControlError, match="No such file"):
        harness.ctl.cull("x", "missing-dir")
    with pytest.raises(DaemonControlError, match="newline"):
        harness.ctl.cull("x\nbind")


def test_request_log_schema(harness):
    anon = file_anon(harness.tmp / "obj")
    _, obj = harness.kernel.open("blob1", anon)
    harness.kernel.recv()
    harness.kernel.read(obj, 0, PAGE)
    harness.completion()
    harness.kernel.close(obj)
    harness.kernel.send(b"bad")
    harness.ctl.wait_idle()
    entries = harness.entries()
    assert [e["op"] for e in entries] == ["OPEN", "READ", "CLOSE", "MALFORMED"]
    keys = {"op", "msg_id", "object_id", "volume_key", "cookie_key", "off", "len", "reply",
            "errno", "bytes_written", "t", "wall"}
    assert all(keys <= e.keys() for e in entries)
    assert [e["msg_id"] for e in entries[:3]] == [0, 1, 2]
    assert entries[0]["t"] <= entries[1]["t"] <= entries[2]["t"]


def test_read_request_log_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"op": "OPEN"}\n{"op": "READ"}\n{"op": "CL')
    assert read_request_log(path) == [{"op": "OPEN"}, {"op": "READ"}]
    assert read_request_log(tmp_path / "missing") == []


# --------------------------------------------------------------------------- processes: CLI, holder, failover

def _spawn(args, **kw):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kw)


def test_cli_help():
    r = cmd([DAEMON, "--help"], timeout=30)
    for opt in ("--cache", "--tag", "--blobs", "--blob", "--log", "--control", "--fill-granularity",
                "--threads", "--adopt-socket", "--hold-socket"):
        assert opt in r.stdout


def test_cli_reports_bind_errors(tmp_path):
    proc = _spawn([DAEMON, "--cache", tmp_path, "--device", tmp_path / "no-such-device"])
    with pytest.raises(DaemonStartError) as info:
        wait_ready(proc, timeout=20)
    assert info.value.errno == errno.ENOENT
    assert proc.wait(10) == 1


def test_failover_through_the_holder(tmp_path, sockdir, blobs):
    hold = str(sockdir / "hold")
    holder_proc = _spawn(["-m", "erofs_domains.programs.ondemand.holder", "--socket", hold])
    kernel = FakeKernel()
    try:
        wait_ready(holder_proc, timeout=20)
        holder.put_fd(hold, kernel.dev_fd)
        os.close(kernel.dev_fd)
        reader, anon = pipe_anon()
        ctl_path = sockdir / "ctl"
        argv = [DAEMON, "--cache", tmp_path, "--blobs", blobs[0], "--adopt-socket", hold,
                "--control", ctl_path, "--log", tmp_path / "log.jsonl"]
        first = _spawn(argv, pass_fds=(anon,))
        os.close(anon)   # the daemon owns the "anon fd" now
        assert wait_ready(first, timeout=20) == first.pid
        assert kernel.recv() == b"restore"
        msg_id, obj = kernel.open("blob1", anon)
        assert kernel.recv() == b"copen %d,10000" % msg_id
        ctl = DaemonControl(str(ctl_path))
        ctl.wait_idle()
        assert ctl.status()["objects"] == {str(obj): "blob1"}

        ctl.exit_abruptly(now=True)       # crash: the holder keeps the device fd
        assert first.wait(10) == 1
        assert anon_closed(reader)        # the dead daemon's anon fds are gone

        second = _spawn(argv)
        assert wait_ready(second, timeout=20) == second.pid
        assert kernel.recv() == b"restore"
        assert ctl.status()["pid"] == second.pid
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
        assert not ctl_path.exists()
        entries = read_request_log(tmp_path / "log.jsonl")
        assert [e["op"] for e in entries] == ["OPEN"]
    finally:
        for p in (holder_proc, locals().get("first"), locals().get("second")):
            if p and p.poll() is None:
                p.kill()
                p.wait(10)


def test_hold_socket_hands_the_device_fd_to_the_holder(start, sockdir):
    hold = str(sockdir / "hold")
    server = holder.Holder(hold)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        harness = start(hold_socket=hold)
        assert [harness.kernel.recv() for _ in range(3)][-1] == b"bind ondemand"
        copy = holder.get_fd(hold)
        os.write(copy, b"restore")        # the same device: the fake kernel sees it
        assert harness.kernel.recv() == b"restore"
        os.close(copy)
        assert holder.ping(hold) == os.getpid()
        holder.drop_fd(hold)
        with pytest.raises(holder.HolderError, match="holds no fd"):
            holder.get_fd(hold)
    finally:
        server.stop()
        thread.join(5)
