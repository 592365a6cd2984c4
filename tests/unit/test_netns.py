"""erofs_domains/programs/netns.py: a namespace joined by a veth pair, the blob server across it, link
down/up, netem, and a teardown that leaves nothing behind.

The namespace tests need root and network namespaces (they skip saying which is missing);
netem needs CONFIG_NET_SCH_NETEM as well (the suite's VM kernel has it). The parsers at
the top run anywhere.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import subprocess
import sys
import time

import pytest

from erofs_domains.base.proc import cmd
from erofs_domains.programs import netns
from erofs_domains.programs.blobserver.blobs import publish
from erofs_domains.programs.blobserver.process import BlobServerProcess
from erofs_domains.programs.netns import (
    NETEM_PROFILES,
    Netem,
    NetemUnsupported,
    VethNamespace,
    parse_rate,
    parse_time_us,
)

# --------------------------------------------------------------------------- parameters (any host)


@pytest.mark.parametrize("text, us", [("20ms", 20000), ("500us", 500), ("1.5s", 1500000), ("2", 2000),
                                      (0.25, 250), ("3 msec", 3000)])
def test_parse_time(text, us):
    assert parse_time_us(text) == us


@pytest.mark.parametrize("text, bytes_per_s", [("100mbit", 12_500_000), ("1gbit", 125_000_000),
                                               ("500kbit", 62_500), ("10mbps", 10_000_000), (8000, 1000)])
def test_parse_rate(text, bytes_per_s):
    assert parse_rate(text) == bytes_per_s


def test_netem_spec_round_trip_and_errors():
    n = Netem.parse("delay=20ms,jitter=5ms,loss=1%,rate=100mbit,limit=5000")
    assert n == Netem(delay_us=20000, jitter_us=5000, loss_pct=1.0, rate_bytes=12_500_000, limit=5000)
    assert str(n) == "delay 20ms jitter 5ms loss 1% rate 100mbit"
    assert Netem.parse("") == Netem() and str(Netem()) == "no impairment"
    for bad, match in [("delay=20parsecs", "not a time"), ("speed=1", "bad netem item"),
                       ("jitter=5ms", "jitter needs a delay"), ("loss=120%", "not a percentage"),
                       ("rate=1tbit", "not a rate")]:
        with pytest.raises(ValueError, match=match):
            Netem.parse(bad)
    assert set(NETEM_PROFILES) >= {"lan", "wan", "lossy"}


def test_netem_options_encode_like_tc():
    """The values `tc qdisc add ... netem delay 20ms 5ms loss 1% rate 100mbit limit 10000`
    sends (captured from iproute2 with strace): latency/jitter in psched ticks (64 ns), loss
    as a fraction of 2^32-1, rate in bytes per second."""
    opts = Netem.parse("delay=20ms,jitter=5ms,loss=1%,rate=100mbit").options()
    assert (opts["delay"], opts["jitter"], opts["limit"]) == (312500, 78125, 10000)
    assert abs(opts["loss"] - 42949673) <= 1
    assert opts["attrs"] == [["TCA_NETEM_RATE", {"rate": 12_500_000, "packet_overhead": 0, "cell_size": 0,
                                                  "cell_overhead": 0}]]


# --------------------------------------------------------------------------- namespaces (root)

@pytest.fixture(scope="module")
def usable():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth)")
    reason = netns.why_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def net(usable):
    with VethNamespace.create() as n:
        yield n
    assert not any(n.exists().values()), n.exists()


def addresses(ipr, ifname: str) -> list[str]:
    idx = ipr.link_lookup(ifname=ifname)[0]
    return [f"{a.get('address')}/{a['prefixlen']}" for a in ipr.addr("dump", index=idx)
            if a["family"] == socket.AF_INET]


def test_create_sets_up_both_ends_and_close_deletes_everything(usable):
    from pyroute2 import IPRoute

    net = VethNamespace.create()
    try:
        assert net.name in netns.list_namespaces()
        assert net.subnet.subnet_of(netns.SUBNET) and net.subnet.prefixlen == 30
        with IPRoute() as ipr:
            assert addresses(ipr, net.host_if) == [f"{net.host_addr}/30"]
            assert not ipr.link_lookup(ifname=net.ns_if)          # the peer lives in the namespace ...
        with IPRoute(netns=net.name, flags=0) as ipr:
            assert addresses(ipr, net.ns_if) == [f"{net.ns_addr}/30"]
            lo = ipr.link("get", index=ipr.link_lookup(ifname="lo")[0])[0]
            assert lo.get("flags") & 1                             # ... with its lo up
        assert net.link_state() == {"host": "UP (carrier 1)", "ns": "UP (carrier 1)"}
        assert net.exists() == {"namespace": True, "host veth": True}
        sleeper = net.popen(["sleep", "600"])
    finally:
        net.close()
    assert net.exists() == {"namespace": False, "host veth": False}
    assert sleeper.poll() is not None                              # processes inside were ended
    assert net.name not in netns.list_namespaces()


def test_teardown_runs_when_the_block_fails(usable):
    with pytest.raises(ZeroDivisionError), VethNamespace.create() as net:
        proc = net.popen(["sleep", "600"])
        1 / 0  # noqa: B018
    assert net.exists() == {"namespace": False, "host veth": False}
    assert proc.poll() is not None


def test_concurrent_namespaces_get_distinct_names_and_subnets(usable):
    with VethNamespace.create() as a, VethNamespace.create() as b:
        assert a.name != b.name and a.host_if != b.host_if
        assert not a.subnet.overlaps(b.subnet)
        # each namespace reaches its own peer only
        for n in (a, b):
            r = cmd(netns.exec_argv(n.name, [sys.executable, "-c", _CONNECT, n.host_addr, "1"]),
                    cwd=netns.REPO, timeout=60)
            assert r.stdout.strip() == "refused", r.stderr   # RST from the host end: the route works
    assert not any(a.exists().values()) and not any(b.exists().values())


_CONNECT = """
import socket, sys
from erofs_domains.base.proc import cmd
s = socket.socket(); s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(type(e).__name__)
"""


def test_exec_runs_the_command_inside_the_namespace(net):
    proc = net.popen([sys.executable, "-c", "import os; print(os.stat('/proc/self/ns/net').st_ino)"],
                     stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert int(out) == os.stat(netns.NETNS_RUN_DIR / net.name).st_ino != os.stat("/proc/self/ns/net").st_ino
    r = cmd([sys.executable, "-m", "erofs_domains.programs.netns", "exec", net.name], check=False, cwd=netns.REPO,
            timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr


def test_remove_stale_removes_namespaces_of_dead_processes(usable):
    from pyroute2 import netns as pnetns

    dead = 4_000_000  # above any pid this machine hands out by default (pid_max 4194304 is rare)
    while netns._pid_alive(dead):
        dead += 1
    name = f"{netns.NAME_PREFIX}lp{dead}x1"
    pnetns.create(name)
    try:
        assert name in netns.list_namespaces()
        assert name in netns.remove_stale()
        assert name not in netns.list_namespaces()
    finally:
        if name in netns.list_namespaces():
            netns.remove_namespace(name)


def get(url_base: str, path: str, timeout: float, headers: dict | None = None):
    host, port = url_base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_blob_server_across_the_veth_and_a_link_cut(net, tmp_path, sockdir):
    data = os.urandom(50_000)
    (tmp_path / "blob").write_bytes(data)
    digest = publish(tmp_path / "root", tmp_path / "blob")
    server = BlobServerProcess(tmp_path / "root", host=net.ns_addr, admin_socket=sockdir / "admin",
                               netns=net, log_path=tmp_path / "server.log")
    with server:
        assert server.url.startswith(f"http://{net.ns_addr}:")
        path = f"/v2/erofs/test/blobs/{digest}"
        assert get(server.url, path, 5, {"Range": "bytes=0-999"}) == (206, data[:1000])
        st = server.client.stats()
        assert st["log"][-1]["peer"] == net.host_addr          # it came over the veth
        with net.link_cut():
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                get(server.url, path, 1.0)
            assert time.monotonic() - t0 < 5
            assert server.client.stats()["requests"] == 1      # the admin socket does not use the link
            assert net.link_state()["ns"].startswith("DOWN")
        assert get(server.url, path, 10) == (200, data)
        with net.link_cut("host"):                              # the connected route goes too
            route = cmd(["ip", "-j", "route", "get", net.ns_addr], check=False)
            assert net.host_if not in route.stdout, route.stdout
            with pytest.raises(OSError) as info:
                get(server.url, path, 1.0)
            # No default route (the guest): ENETUNREACH. A host with one sends the connection to
            # its gateway, which refuses it, drops it (timeout) or says the host is unreachable.
            assert isinstance(info.value, TimeoutError) or info.value.errno in (
                errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED), info.value
        assert get(server.url, path, 10) == (200, data)
    assert not server.alive and server.proc not in net.procs


def test_netem_delay_on_one_end(net, tmp_path, sockdir):
    reason = netns.why_no_netem()
    if reason:
        pytest.skip(reason)
    (tmp_path / "blob").write_bytes(b"x" * 1000)
    digest = publish(tmp_path / "root", tmp_path / "blob")
    with BlobServerProcess(tmp_path / "root", host=net.ns_addr, netns=net) as server:
        path = f"/v2/erofs/test/blobs/{digest}"
        get(server.url, path, 5)
        t0 = time.monotonic()
        get(server.url, path, 5)
        base = time.monotonic() - t0
        with net.netem_applied("ns", delay="150ms") as spec:
            (q,) = [q for q in net.qdiscs("ns")]
            assert (q["kind"], q["handle"], q["delay"]) == ("netem", "1:", 150000 * 15.625)
            t0 = time.monotonic()
            get(server.url, path, 5)   # connect + request: two round trips, each delayed once
            assert time.monotonic() - t0 >= 0.3, (base, spec)
        assert [q["kind"] for q in net.qdiscs("ns")] != ["netem"]
        net.netem("both", NETEM_PROFILES["wan"])
        assert [q["kind"] for q in net.qdiscs()] == ["netem", "netem"]
        assert net.qdiscs("host")[0]["rate"] == 12_500_000
        net.clear_netem()
        net.clear_netem()   # nothing to remove: no error
        assert "netem" not in [q["kind"] for q in net.qdiscs()]


def test_missing_netem_is_reported_as_such(net):
    if netns.why_no_netem() is None:
        pytest.skip("this kernel has netem (the missing-netem error cannot be provoked)")
    with pytest.raises(NetemUnsupported, match="CONFIG_NET_SCH_NETEM"):
        net.netem("host", delay="10ms")
