"""Lazy pulling over a network: the on-demand daemon fetches blobs from an HTTP blob server
that lives in another network namespace, joined to the test's by a veth pair.

    blob server (erofs_domains/programs/blobserver/)  <-- veth 10.213.x.0/30 -->  daemon --http-blob  <->  kernel

The server's counters (what crossed the network) and the daemon's request log (what the
kernel asked for, what was fetched, what failed) are the two witnesses; every assertion
message shows both, plus the link and its qdiscs.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tabulate import tabulate

from erofs_domains.base.names import unique
from erofs_domains.base.scratch import work_root
from erofs_domains.guest.mounts import MountError
from erofs_domains.programs import netns
from erofs_domains.programs.blobserver.process import BlobServerProcess

FETCH_TIMEOUT = 3.0       # the daemon's --fetch-timeout (seconds per HTTP request)
GRANULE = 64 << 10        # the daemon's --fetch-granularity
# A reader blocked on an unreachable server must get EIO within this: a page can wait for a
# failed readahead READ and then for its own READ, each up to FETCH_TIMEOUT; the rest is slack
# for a slow (TCG) guest.
EIO_BOUND = 5 * FETCH_TIMEOUT + 10


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def _network_rig(tmp_path_factory):
    """One namespace and one blob server per worker for this module, made on first use and
    deleted at its end: each costs seconds in a TCG guest (a namespace; a Python server
    started in it), about 8 s per test when they were per test. Tests get them reset."""
    rig: dict = {"dir": tmp_path_factory.mktemp("registry")}
    yield rig
    if "server" in rig:
        rig["server"].stop()
    if "net" in rig:
        rig["net"].close()


@pytest.fixture
def net(require, _network_rig):
    """A namespace for the server, joined to this one by a veth pair; both ends up and no
    netem when the test starts, and again when it ends."""
    require.ondemand()
    require(netns.why_unavailable())
    n = _network_rig.get("net")
    if n is None:
        n = _network_rig["net"] = netns.VethNamespace.create()
    yield n
    n.link_up("both")
    n.clear_netem()


@pytest.fixture
def registry(net, _network_rig, artifacts):
    """The blob server inside `net`, admin API on a Unix socket (reachable with the link
    down); no faults and zero counters when the test starts."""
    server = _network_rig.get("server")
    if server is None or not server.alive:
        server = _network_rig["server"] = BlobServerProcess(
            _network_rig["dir"] / "root", host=net.ns_addr, netns=net,
            admin_socket=work_root() / f"{unique('bs')}.sock",
            log_path=_network_rig["dir"] / "blobserver-stderr.log").start()
    server.client.clear_faults()
    server.client.reset()
    yield server
    errors = []
    try:
        (artifacts / "blobserver-stats.json").write_text(json.dumps(server.client.stats(), indent=1))
    except Exception as e:  # noqa: BLE001 - reported below, after the faults are cleared
        errors.append(f"blob server stats at teardown: {type(e).__name__}: {e}")
    try:
        server.client.clear_faults()  # releases stalled handlers before the next test
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(f"blob server clear_faults at teardown: {type(e).__name__}: {e}")
    if errors:
        pytest.fail("\n".join(errors) + f"\nserver alive: {server.alive}", pytrace=False)


@pytest.fixture
def daemon_args(registry):
    """Requesting `registry` here starts the server before the daemon and stops it after."""
    return ["--fetch-timeout", str(FETCH_TIMEOUT), "--fetch-granularity", str(GRANULE)]


# --------------------------------------------------------------------------- helpers

@dataclass
class Served:
    """An image whose blobs the daemon fetches from the registry."""

    image: object
    digests: dict[str, str]   # cookie name -> digest

    @property
    def primary(self) -> str:
        return self.digests[self.image.fsid]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def serve_over_http(daemon, registry, image) -> Served:
    """Publish every blob of `image` on the registry and point the daemon's cookie names at
    their URLs (`add_http_blob`)."""
    digests = {}
    for cookie, blob in image.blobs.items():
        st = blob.path.stat()
        key = (str(blob.path), st.st_size, st.st_mtime_ns)
        # hashing tens of MB is slow under TCG: once per blob and worker
        digests[cookie] = _DIGESTS[key] = registry.publish(blob.path, _DIGESTS.get(key))
        daemon.control.call("add_http_blob", name=cookie, url=registry.blob_url(digests[cookie]))
    return Served(image, digests)


def explain(registry, daemon, net=None, served: list[Served] | tuple = (), last: int = 40) -> str:
    """What a maintainer wants to see when a lazy-pull check fails: the server's counters per
    blob and its recent requests, the daemon's recent requests with their fetches and errors,
    and the link."""
    out = []
    names = {d: c for s in served for c, d in s.digests.items()}
    try:
        st = registry.client.stats()
        rows = [(names.get(d, "?"), d[:19], b["requests"], b["HEAD"], b["GET"], b["bytes"])
                for d, b in sorted(st["blobs"].items())]
        out.append(f"blob server: {st['requests']} requests, {st['bytes']} bytes, statuses {st['statuses']}, "
                   f"{st['connections']} connections\n"
                   + tabulate(rows, headers=["cookie", "digest", "requests", "HEAD", "GET", "bytes"]))
        rows = [(e["method"], names.get(e["digest"], e["digest"][:19]), e["range"], e["status"], e["bytes"],
                 e["fault"], (e.get("error") or "")[:60]) for e in st["log"][-last:]]
        out.append(f"blob server requests (last {len(rows)}):\n"
                   + tabulate(rows, headers=["method", "blob", "range", "status", "bytes", "fault", "error"]))
    except Exception as e:  # noqa: BLE001
        out.append(f"blob server counters unavailable: {e}")
    reqs, unparsable = daemon.window().read()
    rows = [(r.get("op"), r.get("msg_id"), r.get("cookie_key"), r.get("off"), r.get("len"), r.get("bytes_written"),
             r.get("fetch_range"), r.get("fetched"), r.get("fetch_s"), r.get("errno"),
             (r.get("error") or r.get("note") or "")[:90]) for r in reqs[-last:]]
    out.append(f"daemon requests ({len(reqs)} in all, last {len(rows)}; alive: {daemon.alive}):\n"
               + tabulate(rows, headers=["op", "msg", "cookie", "off", "len", "written", "fetch", "fetched",
                                         "fetch s", "errno", "error / note"]))
    if unparsable:
        out.append(f"{len(unparsable)} line(s) of the daemon's request log are not entries:\n"
                   + "\n".join(f"  {line[:300]!r}" for line in unparsable[:20]))
    if net is not None:
        out.append("link:\n" + tabulate(net.describe()))
    return "\n\n".join(out)


def largest_file(image) -> str:
    return max(image.manifest.files(), key=lambda p: (image.manifest[p].size or 0, p))


@dataclass
class LargestOverHttp:
    """An image whose blobs the daemon fetches from the registry, mounted, and its largest
    file: the one a test cuts mid-read."""

    image: object
    served: Served
    mount: object
    big: str                  # the file's path in the image
    path: Path                # ... and under the mount
    why: functools.partial    # explain() for this image: call it in an assertion message

    @classmethod
    def serve_and_mount(cls, name: str, tiny_images, daemon, mounts, registry, net) -> LargestOverHttp:
        img = tiny_images.single(name)
        served = serve_over_http(daemon, registry, img)
        m = mounts.mount_erofs(img.fsid, devices=img.devices)
        big = largest_file(img)
        return cls(img, served, m, big, m.path / big.lstrip("/"),
                   functools.partial(explain, registry, daemon, net, [served]))

    def assert_reads_back(self, before_error: bytes, when: str) -> None:
        """Once the fault is gone: the file reads back right, its first bytes are the ones
        returned before the error, and every file of the image reads back right."""
        data = self.path.read_bytes()
        assert sha256(data) == self.image.manifest[self.big].sha256, (
            f"{self.big}: wrong content {when}\n{self.why()}")
        assert data[:len(before_error)] == before_error, (
            f"{self.big}: wrong bytes were returned before the error\n{self.why()}")
        mismatches = self.image.verify(self.mount.path)
        assert not mismatches, "\n".join(map(str, mismatches[:20])) + "\n" + self.why()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ReadOutcome:
    data: bytes               # what read() returned before the error (or all of it)
    error: OSError | None
    seconds: float
    finished: bool            # False: still blocked when we stopped waiting


def read_with_deadline(path: Path, offset: int, bound: float) -> ReadOutcome:
    """Read `path` from `offset` to the end in a thread; give up waiting after `bound` s (the
    thread is left to finish on its own once the network is back)."""
    result: dict = {}

    def reader():
        got = bytearray()
        t0 = time.monotonic()
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                while chunk := f.read(1 << 16):
                    got += chunk
        except OSError as e:
            result["error"] = e
        result["seconds"] = time.monotonic() - t0
        result["data"] = bytes(got)

    t = threading.Thread(target=reader, daemon=True, name="lazy-reader")
    t.start()
    t.join(bound)
    if t.is_alive():
        return ReadOutcome(b"", None, bound, False)
    return ReadOutcome(result["data"], result.get("error"), result["seconds"], True)


def fetch_errors(daemon) -> list[dict]:
    return [r for r in daemon.requests() if r["op"] == "READ" and r.get("error")]


# --------------------------------------------------------------------------- lazy loading

def test_reading_one_small_file_fetches_a_small_fraction(images, daemon, mounts, registry, net):
    """Mount a large image and read one small file: only the blocks needed (superblock,
    metadata, the file) cross the network, a few fetch granules of a many-MB blob; the
    daemon's account of what it fetched equals the server's."""
    img = images.single("lazypull")
    served = serve_over_http(daemon, registry, img)
    size = img.blobs[img.fsid].size
    m = mounts.mount_erofs(img.fsid, devices=img.devices)
    small = min(p for p in img.manifest.files()
                if p.startswith("/small/s") and 1000 <= (img.manifest[p].size or 0) <= 16384)
    data = (m.path / small.lstrip("/")).read_bytes()
    daemon.control.wait_idle(timeout=30)
    why = functools.partial(explain, registry, daemon, net, [served])
    assert sha256(data) == img.manifest[small].sha256, f"{small}: wrong content\n{why()}"

    st = registry.client.stats()
    fetched = st["blobs"][served.primary]["bytes"]
    assert fetched <= size * 0.10, (
        f"reading {small} ({len(data)} bytes) after the mount fetched {fetched} of the {size}-byte image "
        f"({fetched / size:.1%}); lazy loading should fetch a few {GRANULE}-byte granules\n{why()}")
    assert set(st["statuses"]) <= {"200", "206"}, f"the daemon asked for bytes the blob lacks\n{why()}"
    reads = [r for r in daemon.requests() if r["op"] == "READ"]
    assert sum(r.get("fetched", 0) for r in reads) == fetched and not fetch_errors(daemon), why()
    assert st["blobs"][served.primary]["HEAD"] == 1, why()


# --------------------------------------------------------------------------- sharing saves traffic

@pytest.mark.parametrize("n", [2, 4])
def test_a_shared_domain_fetches_the_common_base_once(n, require, tiny_images, daemon, mounts, registry, net):
    """N layered images with a common base layer: mounted in one domain, the base blob is
    one cookie, so its bytes cross the network once (mounts 2..N fetch none of it); mounted
    in N separate domains, each has its own cookie and cache file and fetches it again, so
    the base traffic is about N times as high."""
    require.domain()
    imgs = [tiny_images.layered("lpbase", f"lpapp{i}") for i in range(1, n + 1)]
    base_cookie = imgs[0].device_cookies[0]
    assert all(img.device_cookies[0] == base_cookie for img in imgs), [img.device_cookies for img in imgs]
    served = [serve_over_http(daemon, registry, img) for img in imgs]
    base = served[0].digests[base_cookie]
    why = functools.partial(explain, registry, daemon, net, served)

    def base_counts():
        daemon.control.wait_idle(timeout=30)
        return dict(registry.client.stats()["blobs"].get(base, {"GET": 0, "HEAD": 0, "bytes": 0}))

    # one domain
    domain = unique("lpd")
    first = mounts.mount_erofs(imgs[0].fsid, domain_id=domain, devices=imgs[0].devices)
    assert not imgs[0].verify(first.path), why()
    after_first = base_counts()
    assert after_first["bytes"] > 0 and after_first["HEAD"] == 1, why()
    for img in imgs[1:]:
        m = mounts.mount_erofs(img.fsid, domain_id=domain, devices=img.devices)
        mismatches = img.verify(m.path)
        assert not mismatches, "\n".join(map(str, mismatches[:20])) + "\n" + why()
    shared = base_counts()
    assert (shared["HEAD"], shared["GET"], shared["bytes"]) == (1, after_first["GET"], after_first["bytes"]), (
        f"in domain {domain} the base layer {base_cookie} is one cookie: after the first mount read it all, "
        f"mounts 2..{n} must fetch none of it (after the first: {after_first}, after all: {shared})\n{why()}")

    # N domains
    for img in imgs:
        m = mounts.mount_erofs(img.fsid, domain_id=unique("lps"), devices=img.devices)
        mismatches = img.verify(m.path)
        assert not mismatches, "\n".join(map(str, mismatches[:20])) + "\n" + why()
    separate = base_counts()
    separate_bytes = separate["bytes"] - shared["bytes"]
    ratio = separate_bytes / shared["bytes"]
    assert separate["HEAD"] - shared["HEAD"] == n, why()
    assert ratio >= 0.8 * n, (
        f"base layer traffic: {shared['bytes']} bytes for {n} mounts in one domain, {separate_bytes} bytes for "
        f"{n} mounts in separate domains: ratio {ratio:.2f}, expected about {n}\n{why()}")


# --------------------------------------------------------------------------- outage

def test_link_down_mid_read_gives_eio_in_bounded_time_then_recovers(tiny_images, daemon, mounts, registry, net):
    """The far end of the link goes down while a large file is being read: the read fails
    with EIO within EIO_BOUND (each fetch gives up after --fetch-timeout; no hang), the
    daemon keeps serving, and once the link is back the same file and everything else read
    correctly."""
    t = LargestOverHttp.serve_and_mount("lpnet", tiny_images, daemon, mounts, registry, net)
    path, why = t.path, t.why
    assert t.image.manifest[t.big].size > 4 * GRANULE, f"{t.big} is too small to be cut mid-read"

    with open(path, "rb", buffering=0) as f:
        head = f.read(GRANULE)
    assert len(head) == GRANULE, why()
    net.link_down()
    try:
        out = read_with_deadline(path, GRANULE, EIO_BOUND)
        assert out.finished, f"a reader was still blocked {EIO_BOUND:.0f} s after the link went down\n{why()}"
        assert out.error is not None and out.error.errno == errno.EIO, (
            f"expected EIO with the link down, got {out.error!r} after {len(out.data)} bytes in "
            f"{out.seconds:.1f} s\n{why()}")
        assert daemon.alive and daemon.control.ping(), why()
        errors = fetch_errors(daemon)
        assert errors and all(r["errno"] in (errno.ETIMEDOUT, errno.EIO) for r in errors), why()
    finally:
        net.link_up()

    t.assert_reads_back(head + out.data, "after the link came back")


@pytest.mark.parametrize("how", ["503 to HEAD", "link down"])
def test_a_server_failing_at_open_fails_the_mount_not_the_daemon(how, tiny_images, daemon, mounts, registry, net):
    """The daemon learns a blob's size from a HEAD at OPEN; if that fails, the OPEN fails
    (copen -errno) and so does the mount (ENOBUFS or EIO, racy in 6.12), within the fetch
    timeout. The daemon survives and the next mount works."""
    img = tiny_images.single("lpopen")
    served = serve_over_http(daemon, registry, img)
    why = functools.partial(explain, registry, daemon, net, [served])
    if how == "503 to HEAD":
        registry.client.fault("status", status=503, methods=["HEAD"], count=1)
    else:
        net.link_down()
    t0 = time.monotonic()
    try:
        with pytest.raises(MountError) as info:
            mounts.mount_erofs(img.fsid, devices=img.devices)
    finally:
        net.link_up()
    assert info.value.errno in (errno.ENOBUFS, errno.EIO), f"{info.value}\n{why()}"
    assert time.monotonic() - t0 < EIO_BOUND, why()
    (opened,) = [r for r in daemon.requests() if r["op"] == "OPEN"]
    expect = "HTTP 503" if how == "503 to HEAD" else "no answer within"
    assert opened["size"] < 0 and expect in (opened.get("error") or ""), why()
    assert daemon.alive, why()
    m = mounts.mount_erofs(img.fsid, devices=img.devices)
    assert not img.verify(m.path), why()


# --------------------------------------------------------------------------- bad server

BAD_ANSWERS = {
    "503": ("status", {"status": 503}),
    "500": ("status", {"status": 500}),
    "short body": ("short_body", {"fraction": 0.5}),
    "Content-Length too small": ("wrong_length", {"delta": -512}),
    "Content-Length too large": ("wrong_length", {"delta": 512}),
    "shifted Content-Range": ("wrong_range", {"shift": 4096}),
    "wrong size in Content-Range": ("wrong_range", {"shift": 0, "total_delta": 4096}),
    "stall": ("stall", {"seconds": 600, "after_bytes": 1000}),
    "connection closed": ("close", {}),
}


@pytest.mark.parametrize("answer", list(BAD_ANSWERS))
def test_a_bad_server_gives_eio_never_wrong_data(answer, tiny_images, daemon, mounts, registry, net):
    """Every GET of the image's blob is answered badly: reading a file not yet fetched fails
    with EIO (the daemon completes the READ without data), nothing read before the error is
    wrong, the daemon logs the error and keeps serving; once the server behaves, every file
    reads back right, so nothing wrong reached the cache file either."""
    mode, params = BAD_ANSWERS[answer]
    t = LargestOverHttp.serve_and_mount("lpbad", tiny_images, daemon, mounts, registry, net)
    path, why = t.path, t.why

    registry.client.fault(mode, digest=t.served.primary, **params)
    out = read_with_deadline(path, 0, EIO_BOUND)
    assert out.finished, f"reader still blocked after {EIO_BOUND:.0f} s ({answer})\n{why()}"
    assert out.error is not None and out.error.errno == errno.EIO, (
        f"{answer}: expected EIO, got {out.error!r} after {len(out.data)} bytes\n{why()}")
    assert daemon.alive and daemon.control.ping(), why()
    errors = fetch_errors(daemon)
    assert errors and all(r["bytes_written"] == 0 for r in errors), (
        f"{answer}: the failed fetches must be logged and write nothing\n{why()}")

    registry.client.clear_faults()
    t.assert_reads_back(out.data, f"after {answer}")
