"""erofs_domains/programs/blobserver/ on loopback, no namespace: the registry paths, single ranges and
416, keep-alive, the counters, the admin API (HTTP and Unix socket) and every fault mode."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_domains.base.proc import cmd
from erofs_domains.programs.blobserver.blobs import blob_path, blob_url, publish
from erofs_domains.programs.blobserver.client import BlobServerClient, BlobServerError
from erofs_domains.programs.blobserver.faults import FAULT_MODES
from erofs_domains.programs.blobserver.process import BlobServerProcess
from erofs_domains.programs.blobserver.ranges import ByteRange, Unsatisfiable, parse_range
from erofs_domains.programs.blobserver.server import BlobServer

REPO = Path(__file__).resolve().parents[2]
SIZE = 100_000


@pytest.fixture
def blob(tmp_path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def srv(tmp_path, blob, sockdir):
    server = BlobServer(tmp_path / "root", admin_socket=sockdir / "admin")
    server.digest = publish(server.root, blob[0])
    server.data = blob[1]
    with server:
        yield server


def request(srv: BlobServer, method: str = "GET", path: str | None = None, headers: dict | None = None,
            conn: http.client.HTTPConnection | None = None, timeout: float = 5.0):
    """(status, headers, body) of one request; `conn` to reuse a connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*srv.address, timeout=timeout)
    try:
        conn.request(method, path or f"/v2/erofs/test/blobs/{srv.digest}", headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        if own:
            conn.close()


# --------------------------------------------------------------------------- blobs and ranges

def test_publish_names_the_blob_by_its_digest_without_copying(tmp_path, blob):
    digest = publish(tmp_path / "root", blob[0])
    assert digest == "sha256:" + hashlib.sha256(blob[1]).hexdigest()
    path = blob_path(tmp_path / "root", digest)
    assert path == tmp_path / "root" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert os.path.samefile(path, blob[0])
    assert publish(tmp_path / "root", blob[0]) == digest
    assert blob_url("http://h:1/", digest) == f"http://h:1/v2/erofs/test/blobs/{digest}"
    with pytest.raises(ValueError, match="not a sha256 digest"):
        blob_path(tmp_path, "md5:00")


def test_head_gives_size_digest_and_range_support(srv):
    status, headers, body = request(srv, "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Docker-Content-Digest"] == srv.digest


def test_get_without_range_gives_the_whole_blob(srv):
    status, headers, body = request(srv)
    assert (status, body) == (200, srv.data)
    assert "Content-Range" not in headers


@pytest.mark.parametrize("spec, start, end", [
    ("bytes=0-99", 0, 100),
    ("bytes=5-5", 5, 6),
    ("bytes=99990-", 99990, SIZE),
    ("bytes=-10", SIZE - 10, SIZE),
    ("bytes=-200000", 0, SIZE),             # a suffix longer than the blob: all of it
    ("bytes=99990-200000", 99990, SIZE),    # clipped at the end
])
def test_single_range_gives_206(srv, spec, start, end):
    status, headers, body = request(srv, headers={"Range": spec})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert headers["Content-Length"] == str(end - start)
    assert body == srv.data[start:end]


@pytest.mark.parametrize("spec", ["bytes=100000-", "bytes=200000-300000", "bytes=-0", "bytes=5-3", "bytes=abc",
                                  "bytes=-"])
def test_unsatisfiable_or_malformed_range_gives_416(srv, spec):
    status, headers, _ = request(srv, headers={"Range": spec})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("spec", ["bytes=0-9,20-29", "items=0-9"])
def test_multiple_ranges_or_other_units_give_the_whole_blob(srv, spec):
    status, _, body = request(srv, headers={"Range": spec})
    assert (status, body) == (200, srv.data)


def test_empty_blob(srv, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    digest = publish(srv.root, tmp_path / "empty")
    path = f"/v2/erofs/test/blobs/{digest}"
    assert request(srv, path=path)[::2] == (200, b"")
    assert request(srv, path=path, headers={"Range": "bytes=0-"})[0] == 416
    assert request(srv, path=path, headers={"Range": "bytes=-1"})[0] == 416


def test_unknown_blob_path_and_method(srv):
    assert request(srv, path="/v2/erofs/test/blobs/sha256:" + "0" * 64)[0] == 404
    assert request(srv, "HEAD", path="/v2/erofs/test/blobs/sha256:" + "0" * 64)[0] == 404
    assert request(srv, path="/v2/erofs/test/manifests/latest")[0] == 404
    assert request(srv, path="/v2/")[0] == 200
    assert request(srv, "DELETE")[0] == 405


@given(size=st.integers(0, 10**6), first=st.integers(0, 2 * 10**6), last=st.integers(0, 2 * 10**6) | st.none(),
       suffix=st.booleans())
def test_parse_range_gives_a_nonempty_range_inside_the_blob_or_416(size, first, last, suffix):
    spec = f"bytes=-{first}" if suffix else f"bytes={first}-{'' if last is None else last}"
    try:
        r = parse_range(spec, size)
    except Unsatisfiable:
        assert size == 0 or (suffix and first == 0) or (
            not suffix and (first >= size or (last is not None and last < first)))
        return
    assert isinstance(r, ByteRange) and 0 <= r.start < r.end <= size
    if suffix:
        assert r.end == size and r.length == min(first, size)
    else:
        assert r.start == first and r.end == min(size, (size - 1 if last is None else last) + 1)


# --------------------------------------------------------------------------- connections and counters

def test_keep_alive_and_counters(srv):
    conn = http.client.HTTPConnection(*srv.address, timeout=5)
    try:
        assert request(srv, "HEAD", conn=conn)[0] == 200
        assert request(srv, headers={"Range": "bytes=0-4095"}, conn=conn)[0] == 206
        assert request(srv, headers={"Range": "bytes=4096-"}, conn=conn)[0] == 206
        assert request(srv, headers={"Range": "bytes=999999-"}, conn=conn)[0] == 416
    finally:
        conn.close()
    st = srv.client().stats()
    assert st["connections"] == 1
    assert (st["requests"], st["bytes"]) == (4, SIZE)
    assert st["methods"] == {"HEAD": 1, "GET": 3}
    assert st["statuses"] == {"200": 1, "206": 2, "416": 1}
    assert st["blobs"] == {srv.digest: {"requests": 4, "GET": 3, "HEAD": 1, "bytes": SIZE}}
    assert [(e["method"], e["range"], e["status"], e["bytes"]) for e in st["log"]] == [
        ("HEAD", None, 200, 0), ("GET", "bytes=0-4095", 206, 4096),
        ("GET", "bytes=4096-", 206, SIZE - 4096), ("GET", "bytes=999999-", 416, 0)]
    assert st["log"][0]["peer"] == "127.0.0.1" and st["log"][0]["repo"] == "erofs/test"
    srv.client().reset()
    st = srv.client().stats()
    assert (st["requests"], st["bytes"], st["blobs"], st["log"]) == (0, 0, {}, [])


def test_admin_api_over_http_and_unix_socket(srv):
    over_http = BlobServerClient(url=srv.url)
    over_unix = srv.client()
    assert over_unix.admin_socket
    assert over_http.ping()["pid"] == over_unix.ping()["pid"] == os.getpid()
    request(srv)
    assert over_http.stats()["requests"] == over_unix.stats()["requests"] == 1  # admin calls are not counted
    with pytest.raises(BlobServerError, match="unknown fault mode 'explode'"):
        over_unix.fault("explode")
    with pytest.raises(BlobServerError, match="takes \\['status'\\], not \\['fraction'\\]"):
        over_unix.fault("status", fraction=0.5)
    with pytest.raises(BlobServerError, match="no admin route"):
        over_http.call("GET", "/_admin/nothing")
    with pytest.raises(BlobServerError, match="unreachable"):
        BlobServerClient(url="http://127.0.0.1:1", timeout=1).stats()


# --------------------------------------------------------------------------- faults

def test_status_fault_once_then_normal_and_head_untouched(srv):
    c = srv.client()
    f = c.fault("status", status=503, count=1)
    assert (f["mode"], f["methods"], f["count"]) == ("status", ["GET"], 1)
    assert request(srv, "HEAD")[0] == 200
    assert request(srv, headers={"Range": "bytes=0-9"})[0] == 503
    assert request(srv, headers={"Range": "bytes=0-9"})[0] == 206
    assert c.faults()[0]["applied"] == 1
    st = c.stats()
    assert st["faults"] == 1 and st["statuses"]["503"] == 1
    assert [e.get("fault") for e in st["log"]] == [None, "status", None]


def test_fault_targets_digest_method_and_skip(srv, tmp_path):
    (tmp_path / "other").write_bytes(b"x" * 5000)
    other = publish(srv.root, tmp_path / "other")
    c = srv.client()
    c.fault("status", status=500, digest=other, methods=["HEAD"], skip=1)
    assert request(srv, "HEAD", path=f"/v2/r/blobs/{other}")[0] == 200   # skipped
    assert request(srv, "HEAD", path=f"/v2/r/blobs/{other}")[0] == 500
    assert request(srv, path=f"/v2/r/blobs/{other}")[0] == 200         # GET: not targeted
    assert request(srv, "HEAD")[0] == 200                                # another blob
    c.clear_faults()
    assert c.faults() == []
    assert request(srv, "HEAD", path=f"/v2/r/blobs/{other}")[0] == 200


def test_short_body(srv):
    srv.client().fault("short_body", fraction=0.25)
    conn = http.client.HTTPConnection(*srv.address, timeout=5)
    conn.request("GET", f"/v2/r/blobs/{srv.digest}", headers={"Range": "bytes=0-39999"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.getheader("Content-Length") == "40000"
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    conn.close()
    assert info.value.partial == srv.data[:10000]
    assert srv.client().stats()["bytes"] == 10000


@pytest.mark.parametrize("delta", [-512, 512])
def test_wrong_length(srv, delta):
    srv.client().fault("wrong_length", delta=delta)
    status, headers, body = request(srv, headers={"Range": f"bytes={SIZE - 4096}-"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {SIZE - 4096}-{SIZE - 1}/{SIZE}"   # the range asked for ...
    assert headers["Content-Length"] == str(4096 + delta) and len(body) == 4096 + delta  # ... not its length
    assert body[:3584] == srv.data[SIZE - 4096:SIZE - 512]


def test_wrong_range(srv):
    srv.client().fault("wrong_range", shift=4096, total_delta=1)
    status, headers, body = request(srv, headers={"Range": "bytes=0-8191"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 4096-12287/{SIZE + 1}"
    assert body == srv.data[4096:12288]


def test_stall_until_timeout_then_released_by_clear(srv):
    c = srv.client()
    c.fault("stall", seconds=30, count=1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        request(srv, headers={"Range": "bytes=0-9"}, timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    c.fault("stall", seconds=30, after_bytes=100, count=1)
    conn = http.client.HTTPConnection(*srv.address, timeout=0.5)
    conn.request("GET", f"/v2/r/blobs/{srv.digest}", headers={"Range": "bytes=0-999"})
    resp = conn.getresponse()               # the headers do come ...
    assert resp.status == 206
    assert resp.read1(100) == srv.data[:100]
    with pytest.raises(TimeoutError):       # ... the rest of the body does not
        resp.read(900)
    conn.close()
    st = c.stats()
    assert [(e["fault"], e["status"], e["bytes"]) for e in st["log"]] == [("stall", 0, 0), ("stall", 206, 100)]
    c.clear_faults()                        # releases both stalled handlers
    assert request(srv, headers={"Range": "bytes=0-9"})[0] == 206


def test_close_without_answer(srv):
    srv.client().fault("close")
    with pytest.raises(http.client.RemoteDisconnected):
        request(srv)
    assert srv.client().stats()["log"][-1]["status"] == 0


def test_every_fault_mode_is_documented():
    assert set(FAULT_MODES) == {"status", "short_body", "wrong_length", "wrong_range", "stall", "close"}


# --------------------------------------------------------------------------- as a process

def test_process_prints_ready_serves_and_stops_on_sigterm(tmp_path, blob, sockdir):
    digest = publish(tmp_path / "root", blob[0])
    server = BlobServerProcess(tmp_path / "root", admin_socket=sockdir / "admin", log_path=tmp_path / "server.log")
    with server:
        assert server.url.startswith("http://127.0.0.1:")
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", f"/v2/any/repo/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert conn.getresponse().read() == blob[1][10:20]
        conn.close()
        assert server.client.stats()["bytes"] == 10
        assert server.client.ping()["pid"] == server.proc.pid
    assert server.proc.returncode == 0
    assert not (sockdir / "admin").exists()


def test_process_reports_a_failed_start(tmp_path):
    server = BlobServerProcess(tmp_path / "root", host="192.0.2.254", log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="did not start"):
        server.start(timeout=30)


def test_cli_help():
    r = cmd([sys.executable, "-m", "erofs_domains.programs.blobserver", "--help"], cwd=REPO, timeout=60)
    for opt in ("--root", "--listen", "--admin-socket", "--publish"):
        assert opt in r.stdout


def test_sigint_stops_too(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "erofs_domains.programs.blobserver", "--root", str(tmp_path)],
                            cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().startswith(b"READY http://127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
