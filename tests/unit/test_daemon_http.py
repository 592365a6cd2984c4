"""The on-demand daemon's HTTP blob backend against a fake /dev/cachefiles (see
test_daemon_fake.py) and a real blob server on loopback (erofs_domains/programs/blobserver/).

What it promises: OPEN asks the server for the size (HEAD), a READ fetches the missing
range rounded up to --fetch-granularity but never past the blob, nothing is cached by the
daemon between objects, and a failed fetch completes the READ without data (the reader
gets EIO), is logged with its error, and leaves the daemon serving.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from erofs_domains.base.proc import cmd
from erofs_domains.programs.blobserver.blobs import publish
from erofs_domains.programs.blobserver.client import BlobServerClient
from erofs_domains.programs.blobserver.server import BlobServer
from erofs_domains.programs.ondemand.__main__ import build_parser
from erofs_domains.programs.ondemand.client import DaemonControlError
from tests.unit.fake_device import DAEMON, PAGE, anon_closed, file_anon, pipe_anon

BIG = 300_000          # not a page multiple: the last page is partial
GRANULE = 16 * PAGE    # --fetch-granularity in these tests


@dataclass
class Registry:
    server: BlobServer
    client: BlobServerClient
    urls: dict[str, str]      # cookie name -> blob URL
    digests: dict[str, str]
    data: dict[str, bytes]

    def get_log(self) -> list[tuple[str, str | None, int, int]]:
        return [(e["method"], e["range"], e["status"], e["bytes"]) for e in self.client.stats()["log"]]


@pytest.fixture
def registry(tmp_path):
    data = {"big": os.urandom(BIG), "small": os.urandom(5000)}
    server = BlobServer(tmp_path / "registry")
    digests = {}
    for name, content in data.items():
        (tmp_path / f"{name}.src").write_bytes(content)
        digests[name] = publish(server.root, tmp_path / f"{name}.src")
    with server:
        yield Registry(server, server.client(), {n: server.blob_url(d) for n, d in digests.items()}, digests, data)


@pytest.fixture
def hh(start, registry):
    """The daemon with the registry's blobs as --http-blob names, bound to a fake kernel."""
    harness = start(http_blobs=registry.urls, fetch_granularity=GRANULE, fetch_timeout=1.0)
    assert [harness.kernel.recv() for _ in range(3)][-1] == b"bind ondemand"
    return harness


def open_object(harness, cookie: str, name: str) -> tuple[int, int, Path]:
    """OPEN `cookie` with an O_DIRECT file as its anon fd; (anon fd, object_id, file)."""
    path = harness.tmp / name
    anon = file_anon(path)
    msg_id, obj = harness.kernel.open(cookie, anon)
    assert harness.kernel.recv() == b"copen %d,%d" % (msg_id, BIG if cookie == "big" else 5000)
    return anon, obj, path


def read(harness, anon: int, obj: int, off: int, length: int = PAGE) -> dict:
    """One READ, answered; returns its request-log entry."""
    msg_id = harness.kernel.read(obj, off, length)
    assert harness.completion() == (anon, msg_id)
    harness.ctl.wait_idle()
    return next(e for e in harness.entries("READ") if e["msg_id"] == msg_id)


# --------------------------------------------------------------------------- OPEN

def test_open_asks_the_server_for_the_size(hh, registry):
    open_object(hh, "big", "obj")
    hh.ctl.wait_idle()
    (entry,) = hh.entries("OPEN")
    assert entry["source"] == registry.urls["big"] and entry["size"] == BIG
    assert registry.get_log() == [("HEAD", None, 200, 0)]
    assert hh.ctl.status()["http_blobs"] == registry.urls


@pytest.mark.parametrize("how, expect_errno, message", [
    ("503 to HEAD", errno.EIO, "HEAD http://.*: HTTP 503"),
    ("unknown blob", errno.ENOENT, "HEAD http://.*: HTTP 404"),
    ("nobody listening", errno.EIO, "ConnectionRefusedError"),
])
def test_open_fails_with_an_errno_when_head_fails(hh, registry, how, expect_errno, message):
    url = registry.urls["big"]
    if how == "503 to HEAD":
        registry.client.fault("status", status=503, methods=["HEAD"])
    elif how == "unknown blob":
        url = url[:-64] + "0" * 64
    else:
        url = "http://127.0.0.1:1/v2/r/blobs/sha256:" + "0" * 64
    hh.ctl.call("add_http_blob", name="x", url=url)
    reader, anon = pipe_anon()
    msg_id, _ = hh.kernel.open("x", anon)
    assert hh.kernel.recv() == b"copen %d,-%d" % (msg_id, expect_errno)
    hh.ctl.wait_idle()
    assert anon_closed(reader)
    (entry,) = hh.entries("OPEN")
    assert re.search(message, entry["error"]), entry
    assert hh.ctl.ping()


# --------------------------------------------------------------------------- READ

def test_read_fetches_the_request_rounded_up_to_the_granularity(hh, registry):
    anon, obj, path = open_object(hh, "big", "obj")
    entry = read(hh, anon, obj, 0)
    assert path.read_bytes() == registry.data["big"][:GRANULE]
    assert (entry["fetch_range"], entry["fetched"], entry["http_status"]) == (f"0-{GRANULE - 1}", GRANULE, 206)
    assert (entry["bytes_written"], entry["errno"], entry["reply"]) == (GRANULE, None, "read_complete")
    assert registry.get_log()[1:] == [("GET", f"bytes=0-{GRANULE - 1}", 206, GRANULE)]


def test_read_never_fetches_beyond_the_blob(hh, registry):
    anon, obj, path = open_object(hh, "big", "obj")
    off = BIG // PAGE * PAGE   # the partial last page
    entry = read(hh, anon, obj, off)
    assert entry["fetch_range"] == f"{off}-{BIG - 1}" and entry["fetched"] == BIG - off
    assert entry["bytes_written"] == PAGE           # padded with zeros to the page
    data = path.read_bytes()
    assert data[off:] == registry.data["big"][off:] + bytes(PAGE - (BIG - off))
    assert registry.client.stats()["bytes"] == BIG - off


def test_only_what_the_cache_file_lacks_is_fetched(hh, registry):
    anon, obj, path = open_object(hh, "big", "obj")
    first = read(hh, anon, obj, 2 * PAGE)           # fills [8K, 64K)
    second = read(hh, anon, obj, 0)                 # extends to 64K, but [8K, 64K) is there
    third = read(hh, anon, obj, 4 * PAGE)           # all there already
    assert first["fetch_range"] == f"{2 * PAGE}-{GRANULE - 1}"
    assert second["fetch_range"] == f"0-{2 * PAGE - 1}" and second["bytes_written"] == 2 * PAGE
    assert "fetch_range" not in third and third["bytes_written"] == 0
    assert third["note"] == "already in the cache file" and third["errno"] is None
    assert path.read_bytes() == registry.data["big"][:GRANULE]
    assert registry.client.stats()["bytes"] == GRANULE


def test_no_data_is_kept_between_objects(hh, registry):
    """Two objects of the same blob (two cache files): both READs go to the server."""
    a, obj_a, path_a = open_object(hh, "big", "a")
    b, obj_b, path_b = open_object(hh, "big", "b")
    read(hh, a, obj_a, 0)
    read(hh, b, obj_b, 0)
    assert path_a.read_bytes() == path_b.read_bytes() == registry.data["big"][:GRANULE]
    st = registry.client.stats()
    assert st["methods"] == {"HEAD": 2, "GET": 2} and st["bytes"] == 2 * GRANULE


def test_requests_share_a_keep_alive_connection(hh, registry):
    anon, obj, _ = open_object(hh, "big", "obj")
    for off in range(0, 4 * GRANULE, GRANULE):
        read(hh, anon, obj, off)
    st = registry.client.stats()
    assert st["requests"] == 5 and st["connections"] == 1


# --------------------------------------------------------------------------- fetch errors

def test_5xx_completes_the_read_without_data_and_the_daemon_survives(hh, registry):
    anon, obj, path = open_object(hh, "big", "obj")
    registry.client.fault("status", status=503, count=1)
    entry = read(hh, anon, obj, 0)                  # completed: the kernel would now fail the reader with EIO
    assert path.stat().st_size == 0                 # nothing written
    assert (entry["errno"], entry["bytes_written"], entry["reply"]) == (errno.EIO, 0, "read_complete")
    assert "HTTP 503" in entry["error"] and entry["http_status"] == 503
    assert hh.ctl.ping() == os.getpid()
    entry = read(hh, anon, obj, 0)                  # the next READ of the same range is served
    assert entry["errno"] is None and path.read_bytes() == registry.data["big"][:GRANULE]


@pytest.mark.parametrize("mode, params, message", [
    ("short_body", {"fraction": 0.5}, "short body, 32768 of 65536 bytes"),
    ("wrong_length", {"delta": -512}, "Content-Length 65024, expected 65536"),
    ("wrong_length", {"delta": 512}, "Content-Length 66048, expected 65536"),
    ("wrong_range", {"shift": 4096}, "answered Content-Range 'bytes 4096-69631/300000'"),
    ("wrong_range", {"shift": 0, "total_delta": 1}, "answered Content-Range 'bytes 0-65535/300001'"),
    ("status", {"status": 404}, "HTTP 404"),
    ("close", {}, "RemoteDisconnected"),
])
def test_bad_answers_complete_the_read_without_data(hh, registry, mode, params, message):
    anon, obj, path = open_object(hh, "big", "obj")
    registry.client.fault(mode, **params)
    entry = read(hh, anon, obj, 0)
    assert path.stat().st_size == 0
    assert (entry["errno"], entry["bytes_written"]) == (errno.EIO, 0)
    assert message in entry["error"], entry
    registry.client.clear_faults()
    assert read(hh, anon, obj, 0)["errno"] is None
    assert path.read_bytes() == registry.data["big"][:GRANULE]


def test_a_stalled_server_times_out(hh, registry):
    anon, obj, path = open_object(hh, "big", "obj")
    registry.client.fault("stall", seconds=30, after_bytes=1000)
    t0 = time.monotonic()
    entry = read(hh, anon, obj, 0)
    assert 0.9 < time.monotonic() - t0 < 4         # --fetch-timeout 1 covers headers and body together
    assert (entry["errno"], entry["bytes_written"]) == (errno.ETIMEDOUT, 0)
    assert "no answer within 1 s (1000 of 65536 bytes received)" in entry["error"]
    assert path.stat().st_size == 0
    registry.client.clear_faults()
    assert read(hh, anon, obj, 0)["errno"] is None


def test_stop_does_not_wait_for_a_stalled_fetch(start, registry):
    harness = start(http_blobs=registry.urls, fetch_granularity=GRANULE, fetch_timeout=60.0)
    [harness.kernel.recv() for _ in range(3)]
    anon, obj, _ = open_object(harness, "big", "obj")
    registry.client.fault("stall", seconds=60)
    harness.kernel.read(obj, 0, PAGE)
    time.sleep(0.3)
    t0 = time.monotonic()
    harness.daemon.stop()
    harness.thread.join(10)
    assert not harness.thread.is_alive() and time.monotonic() - t0 < 3


# --------------------------------------------------------------------------- configuration

def test_add_http_blob_at_runtime_and_validation(hh, registry):
    hh.ctl.call("add_http_blob", name="late", url=registry.urls["small"])
    _reader, anon = pipe_anon()
    msg_id, _ = hh.kernel.open("late", anon)
    assert hh.kernel.recv() == b"copen %d,5000" % msg_id
    assert "late" in hh.ctl.status()["blobs"]
    for bad in ("ftp://host/x", "http:///nohost", "http://harness:99999/x"):
        with pytest.raises(DaemonControlError, match="add_http_blob: .*(http://|port)"):
            hh.ctl.call("add_http_blob", name="bad", url=bad)
    (hh.tmp / "late.file").write_bytes(b"y" * 100)
    hh.ctl.add_blob("late", str(hh.tmp / "late.file"))
    assert "late" not in hh.ctl.status()["http_blobs"]   # a file entry replaces the URL
    msg_id, _ = hh.kernel.open("late", pipe_anon()[1])
    assert hh.kernel.recv() == b"copen %d,100" % msg_id


def test_constructor_checks_fetch_options(tmp_path):
    from erofs_domains.programs.ondemand.daemon import OnDemandDaemon

    with pytest.raises(ValueError, match="fetch_granularity"):
        OnDemandDaemon(str(tmp_path), fetch_granularity=1000)
    with pytest.raises(ValueError, match="fetch_timeout"):
        OnDemandDaemon(str(tmp_path), fetch_timeout=0)


def test_cli_options():
    args = build_parser().parse_args(["--cache", "/c", "--http-blob", "a=http://harness:8/v2/r/blobs/sha256:x",
                                      "--fetch-granularity", "128K", "--fetch-timeout", "2.5"])
    assert args.http_blob == [("a", "http://harness:8/v2/r/blobs/sha256:x")]
    assert (args.fetch_granularity, args.fetch_timeout) == (128 << 10, 2.5)
    defaults = build_parser().parse_args(["--cache", "/c"])
    assert (defaults.fetch_granularity, defaults.fetch_timeout) == (64 << 10, 10.0)
    r = cmd([DAEMON, "--help"], timeout=30)
    for opt in ("--http-blob", "--fetch-granularity", "--fetch-timeout"):
        assert opt in r.stdout


def test_concurrent_reads_of_one_object(hh, registry):
    """Four READ threads against one object: every range ends up right."""
    anon, obj, path = open_object(hh, "big", "obj")
    msg_ids = [hh.kernel.read(obj, off, PAGE) for off in range(0, BIG, GRANULE)]
    done = {hh.completion()[1] for _ in msg_ids}
    assert done == set(msg_ids)
    hh.ctl.wait_idle()
    assert path.read_bytes()[:BIG] == registry.data["big"]
    assert all(e["errno"] is None for e in hh.entries("READ"))


# --------------------------------------------------------------------------- across a namespace

def test_fetches_across_a_veth_and_a_link_cut_times_out(start, tmp_path):
    """What tests/fscache/test_lazy_pull.py builds, minus the kernel: the server inside a
    network namespace, the daemon fetching over the veth; with the far end down a READ is
    completed without data after --fetch-timeout, and the daemon serves again once it is up."""
    from erofs_domains.programs import netns
    from erofs_domains.programs.blobserver.process import BlobServerProcess

    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth)")
    reason = netns.why_unavailable()
    if reason:
        pytest.skip(reason)
    data = os.urandom(BIG)
    (tmp_path / "big.src").write_bytes(data)
    with netns.VethNamespace.create() as net:
        server = BlobServerProcess(tmp_path / "registry", host=net.ns_addr, netns=net,
                                   admin_socket=tmp_path.parent / f"adm-{os.getpid()}.sock")
        with server:
            url = server.blob_url(server.publish(tmp_path / "big.src"))
            harness = start(http_blobs={"big": url}, fetch_granularity=GRANULE, fetch_timeout=1.0)
            [harness.kernel.recv() for _ in range(3)]
            anon, obj, path = open_object(harness, "big", "obj")
            assert read(harness, anon, obj, 0)["errno"] is None
            with net.link_cut():
                t0 = time.monotonic()
                entry = read(harness, anon, obj, GRANULE)
                assert 0.9 < time.monotonic() - t0 < 4
                assert (entry["errno"], entry["bytes_written"]) == (errno.ETIMEDOUT, 0), entry
            assert read(harness, anon, obj, GRANULE)["errno"] is None
            assert path.read_bytes() == data[:2 * GRANULE]
            st = server.client.stats()
            assert {e["peer"] for e in st["log"]} == {net.host_addr}
