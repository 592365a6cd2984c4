"""Network namespaces for the lazy-pulling tests: a namespace joined to this one by a veth
pair, netem on either end, and link down/up on demand.

    with VethNamespace.create() as net:          # namespace + veth + 10.213.x.y/30, links up
        server = net.popen([...])                # a process inside the namespace
        net.netem("both", Netem.parse("delay=20ms,jitter=5ms,rate=100mbit"))
        with net.link_cut():                     # far end down: packets vanish, requests time out
            ...
    # processes ended, veth and namespace deleted, even if the block raised

Everything goes through pyroute2 (rtnetlink): no `ip`/`tc` binaries. The subnet
10.213.0.0/16 is private to the machine (or guest) that runs the tests; each namespace gets
its own /30 of it, chosen under a lock so that concurrent test processes never collide.
The host end is `.1`, the namespace end `.2`.

`python -m erofs_domains.programs.netns exec NAME -- CMD...` runs CMD inside namespace NAME (what
`ip netns exec` does for the network; no pyroute2 import, so it starts fast under TCG);
`python -m erofs_domains.programs.netns cleanup` removes namespaces left by dead test processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.layout import REPO
from erofs_domains.base.proc import terminate, wait_for
from erofs_domains.base.scratch import work_root

DISCARD_PORT = 9  # nothing listens there: a refusal proves the path works
NETNS_RUN_DIR = Path("/var/run/netns")          # where iproute2 and pyroute2 keep named namespaces
SUBNET = ipaddress.ip_network("10.213.0.0/16")  # exists only inside the machine running the tests
PREFIXLEN = 30
NAME_PREFIX = "erofs-"                          # netns names: erofs-lp<pid>x<n>
_NAME_RE = re.compile(rf"^{NAME_PREFIX}lp(\d+)x(\d+)$")
CLONE_NEWNET = 0x40000000
TC_H_ROOT = 0xFFFFFFFF
NETEM_HANDLE = 0x10000  # 1:0
SIDES = ("host", "ns")

_counter = iter(range(1, 1 << 30))


class NetnsError(RuntimeError):
    """Creating, changing or deleting a namespace, link or qdisc failed."""


class NetemUnsupported(NetnsError):
    """The kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)."""


# --------------------------------------------------------------------------- netem parameters

_TIME_UNITS = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 1_000_000, "sec": 1_000_000}
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}  # tc(8): "bps" means bytes/s


def parse_time_us(value: str | float | int) -> int:
    """`20ms`, `500us`, `1.5s` -> microseconds; a bare number is milliseconds (as in tc)."""
    if isinstance(value, (int, float)):
        return round(value * 1000)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", value.lower())
    if not m or (m[2] and m[2] not in _TIME_UNITS):
        raise ValueError(f"not a time: {value!r} (use e.g. 20ms, 500us, 1s)")
    return round(float(m[1]) * _TIME_UNITS[m[2] or "ms"])


def parse_rate(value: str | int) -> int:
    """`100mbit`, `1gbit`, `500kbit`, `10mbps` (bytes) -> bytes per second; a bare number is bit/s."""
    if isinstance(value, int):
        return value // 8
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", value.lower())
    if not m or (m[2] and m[2] not in _RATE_UNITS):
        raise ValueError(f"not a rate: {value!r} (use e.g. 100mbit, 1gbit, 500kbit)")
    return round(float(m[1]) * _RATE_UNITS[m[2] or "bit"])


def parse_percent(value: str | float | int) -> float:
    pct = float(value) if isinstance(value, (int, float)) else float(value.strip().removesuffix("%"))
    if not 0 <= pct <= 100:
        raise ValueError(f"not a percentage: {value!r}")
    return pct


@dataclass(frozen=True)
class Netem:
    """One netem configuration (each end of a veth applies it to what it sends)."""

    delay_us: int = 0
    jitter_us: int = 0
    loss_pct: float = 0.0
    rate_bytes: int | None = None   # bytes per second; None = unlimited
    limit: int = 10000              # queue length in packets (netem's default 1000 drops at high BDP)

    def __post_init__(self):
        if self.delay_us < 0 or self.jitter_us < 0 or self.limit <= 0:
            raise ValueError(f"bad netem parameters: {self}")
        if self.jitter_us and not self.delay_us:
            raise ValueError("netem jitter needs a delay")
        if self.rate_bytes is not None and not 0 < self.rate_bytes < 2**32:
            raise ValueError(f"netem rate must be 1 B/s .. 4 GB/s, got {self.rate_bytes}")

    @classmethod
    def of(cls, delay=None, jitter=None, loss=None, rate=None, limit: int | None = None) -> Netem:
        """Netem.of(delay="20ms", jitter="5ms", loss="0.5%", rate="100mbit")."""
        return cls(delay_us=parse_time_us(delay) if delay is not None else 0,
                   jitter_us=parse_time_us(jitter) if jitter is not None else 0,
                   loss_pct=parse_percent(loss) if loss is not None else 0.0,
                   rate_bytes=parse_rate(rate) if rate is not None else None,
                   limit=limit or cls.limit)

    @classmethod
    def parse(cls, spec: str) -> Netem:
        """`delay=20ms,jitter=5ms,loss=1%,rate=100mbit,limit=5000` (any subset; "" = nothing)."""
        kw = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("delay", "jitter", "loss", "rate", "limit"):
                raise ValueError(f"bad netem item {part!r} (keys: delay, jitter, loss, rate, limit)")
            kw[key] = int(value) if key == "limit" else value
        return cls.of(**kw)

    def options(self) -> dict:
        """TCA_OPTIONS for pyroute2's netem encoder (sched_netem.get_parameters)."""
        kw = {"delay": self.delay_us, "jitter": self.jitter_us, "loss": self.loss_pct, "limit": self.limit}
        if self.rate_bytes is not None:
            kw["rate"] = self.rate_bytes
        from pyroute2.netlink.rtnl.tcmsg import sched_netem

        return sched_netem.get_parameters(kw)

    def __str__(self) -> str:
        parts = []
        if self.delay_us:
            parts.append(f"delay {self.delay_us / 1000:g}ms")
        if self.jitter_us:
            parts.append(f"jitter {self.jitter_us / 1000:g}ms")
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}%")
        if self.rate_bytes is not None:
            parts.append(f"rate {self.rate_bytes * 8 / 1e6:g}mbit")
        return " ".join(parts) or "no impairment"


#: Named link profiles (applied on both ends, so the round trip is twice the delay).
NETEM_PROFILES = {
    "lan": Netem.of(delay="0.1ms"),
    "metro": Netem.of(delay="2ms", jitter="0.5ms", rate="1gbit"),
    "wan": Netem.of(delay="20ms", jitter="2ms", rate="100mbit"),
    "far": Netem.of(delay="75ms", jitter="5ms", rate="50mbit"),
    "lossy": Netem.of(delay="20ms", jitter="2ms", loss="1%", rate="100mbit"),
}


# --------------------------------------------------------------------------- availability

def _probe(netem: bool) -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists("/proc/self/ns/net"):
        return "the kernel has no network namespaces (CONFIG_NET_NS)"
    try:
        with VethNamespace.create() as net:
            if netem:
                net.netem("host", Netem.of(delay="1ms"))
                net.clear_netem("host")
    except NetemUnsupported as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - the reason is the point
        return f"cannot set up a network namespace with a veth pair: {type(e).__name__}: {e}"
    return None


@functools.cache
def why_unavailable() -> str | None:
    """None if this process can create a namespace joined by a veth pair, else why not.
    Probes once (creates and deletes a namespace)."""
    return _probe(netem=False)


@functools.cache
def why_no_netem() -> str | None:
    """None if netem qdiscs work on a veth end too, else why not."""
    return why_unavailable() or _probe(netem=True)


# --------------------------------------------------------------------------- naming, subnets

@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    with open(work_root() / "netns.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def remove_namespace(name: str) -> None:
    """Delete a named namespace (its veth ends go with it once no process is inside)."""
    from pyroute2 import netns

    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def remove_stale() -> list[str]:
    """Remove namespaces of this suite whose creating process is dead (a crashed run)."""
    removed = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m[1])):
            with contextlib.suppress(OSError):
                remove_namespace(name)
                removed.append(name)
    return removed


def _pick_subnet(ipr) -> ipaddress.IPv4Network:
    """A /30 of SUBNET with no address of this namespace in it (call with the lock held)."""
    used = {ipaddress.ip_address(a.get("address")) for a in ipr.addr("dump") if a.get("family") == socket.AF_INET}
    size = 1 << (32 - PREFIXLEN)
    count = SUBNET.num_addresses // size
    start = os.getpid() * 7919 + next(_counter) * 31
    for i in range(count):
        net = ipaddress.ip_network((int(SUBNET.network_address) + (start + i) % count * size, PREFIXLEN))
        if not any(a in net for a in used):
            return net
    raise NetnsError(f"no free /{PREFIXLEN} left in {SUBNET}")


# --------------------------------------------------------------------------- the namespace

@dataclass
class VethNamespace:
    """A named network namespace joined to this one by a veth pair.

    `host_if`/`host_addr` is the end in this (the creating) namespace, `ns_if`/`ns_addr` the
    end inside `name`. Sides are named "host" and "ns"; "both" where it makes sense."""

    name: str
    host_if: str
    ns_if: str
    subnet: ipaddress.IPv4Network
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def host_addr(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ns_addr(self) -> str:
        return str(self.subnet.network_address + 2)

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls) -> VethNamespace:
        """Create namespace, veth pair, addresses; bring both ends (and the namespace's lo) up.
        On any failure everything created so far is deleted again."""
        from pyroute2 import IPRoute, netns

        remove_stale()
        n = next(_counter)
        base = f"lp{os.getpid()}x{n}"
        net = cls(name=f"{NAME_PREFIX}{base}", host_if=f"{base}h", ns_if=f"{base}n",
                  subnet=ipaddress.ip_network("0.0.0.0/30"))
        try:
            netns.create(net.name)
            with _allocation_lock(), IPRoute() as ipr:
                net.subnet = _pick_subnet(ipr)
                ipr.link("add", ifname=net.host_if, kind="veth",
                         peer={"ifname": net.ns_if, "net_ns_fd": net.name})
                idx = net._index(ipr, net.host_if)
                ipr.addr("add", index=idx, address=net.host_addr, prefixlen=PREFIXLEN)
                ipr.link("set", index=idx, state="up")
            with net._ipr("ns") as ipr:
                idx = net._index(ipr, net.ns_if)
                ipr.addr("add", index=idx, address=net.ns_addr, prefixlen=PREFIXLEN)
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=net._index(ipr, "lo"), state="up")
        except BaseException as e:
            errors = net.close(raise_errors=False)
            if isinstance(e, Exception):
                raise NetnsError(f"creating namespace {net.name} failed: {type(e).__name__}: {e}"
                                 + (f" (cleanup: {'; '.join(errors)})" if errors else "")) from e
            raise
        return net

    def __enter__(self) -> VethNamespace:
        return self

    def __exit__(self, *exc) -> None:
        self.close(raise_errors=exc[0] is None)

    def close(self, raise_errors: bool = True) -> list[str]:
        """End the processes started in the namespace, delete the veth pair and the namespace.
        Every step is attempted; errors are collected (and raised unless `raise_errors` is False)."""
        errors = []
        for proc in self.procs:
            try:
                terminate(proc)
            except Exception as e:  # noqa: BLE001
                errors.append(f"ending pid {proc.pid}: {e}")
        self.procs.clear()
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for idx in ipr.link_lookup(ifname=self.host_if):
                    ipr.link("del", index=idx)
        except Exception as e:  # noqa: BLE001
            errors.append(f"deleting {self.host_if}: {e}")
        try:
            remove_namespace(self.name)
        except Exception as e:  # noqa: BLE001
            errors.append(f"removing namespace {self.name}: {e}")
        if errors and raise_errors:
            raise NetnsError("teardown of " + self.name + " incomplete: " + "; ".join(errors))
        return errors

    def exists(self) -> dict[str, bool]:
        """What of this namespace is still there (for teardown checks)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            host_link = bool(ipr.link_lookup(ifname=self.host_if))
        return {"namespace": self.name in list_namespaces(), "host veth": host_link}

    # ----------------------------------------------------------------- rtnetlink helpers

    def _ipr(self, side: str):
        from pyroute2 import IPRoute

        if side == "host":
            return IPRoute()
        if side == "ns":
            return IPRoute(netns=self.name, flags=0)
        raise ValueError(f"side must be 'host' or 'ns', got {side!r}")

    @staticmethod
    def _index(ipr, ifname: str) -> int:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetnsError(f"no interface {ifname}")
        return found[0]

    def _ifname(self, side: str) -> str:
        return {"host": self.host_if, "ns": self.ns_if}[side]

    @staticmethod
    def _sides(side: str) -> tuple[str, ...]:
        if side == "both":
            return SIDES
        if side not in SIDES:
            raise ValueError(f"side must be 'host', 'ns' or 'both', got {side!r}")
        return (side,)

    # ----------------------------------------------------------------- links

    def set_link(self, side: str, up: bool) -> None:
        """Administratively up/down one end ("both": both); either way the pair loses its
        carrier and nothing passes until it is up again. Seen from this namespace, "ns" (the
        far end) is an outage: the route stays, packets vanish, requests time out; "host"
        removes the local route as well, so new connections fail at once (ENETUNREACH where there
        is no default route; a host with one hands them to its gateway).
        Returns once both ends show the new operational state: the kernel applies carrier
        changes asynchronously (linkwatch), and until then packets are still dropped after
        an "up" (a lost SYN costs a 1 s retransmit)."""
        for s in self._sides(side):
            with self._ipr(s) as ipr:
                ipr.link("set", index=self._index(ipr, self._ifname(s)), state="up" if up else "down")
        self._wait_operstate(up)
        if up:
            self.wait_carries_traffic()

    def wait_carries_traffic(self, timeout: float = 30.0) -> None:
        """Until a TCP SYN from this namespace to the far end is answered (accepted, or refused
        by a closed port): operstate UP is not enough, the neighbour entry the outage left
        FAILED must be resolved again first, and on a loaded machine that takes a while."""
        def answered() -> str:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                try:
                    s.connect((self.ns_addr, DISCARD_PORT))
                except ConnectionRefusedError:
                    return "refused"
                except OSError as e:
                    return f"no answer ({e.__class__.__name__}: {e})"
                return "accepted"

        wait_for(answered, what=f"a connection to {self.ns_addr} across the link to be answered",
                 timeout=timeout, step=0.05, until=lambda v: v in ("accepted", "refused"))

    def _wait_operstate(self, up: bool, timeout: float = 10.0) -> None:
        wait_for(self.link_state, what=f"both veth ends {'up' if up else 'down'} (operstate)",
                 timeout=timeout, step=0.02, until=lambda states: all(st.startswith("UP ") == up
                                                                      for st in states.values()))

    def link_down(self, side: str = "ns") -> None:
        self.set_link(side, False)

    def link_up(self, side: str = "ns") -> None:
        self.set_link(side, True)

    @contextlib.contextmanager
    def link_cut(self, side: str = "ns") -> Iterator[None]:
        """The link is down inside the block and up again afterwards (also on errors)."""
        self.link_down(side)
        try:
            yield
        finally:
            self.link_up(side)

    def link_state(self) -> dict[str, str]:
        out = {}
        for s in SIDES:
            with self._ipr(s) as ipr:
                link = ipr.link("get", index=self._index(ipr, self._ifname(s)))[0]
                out[s] = f"{link.get('operstate')} (carrier {link.get('carrier')})"
        return out

    # ----------------------------------------------------------------- netem

    def netem(self, side: str = "both", spec: Netem | None = None, **kw) -> Netem:
        """Set (or replace) netem as the root qdisc of one end ("both": each end), so that what
        that end sends is delayed/lost/rate-limited. `spec` or keywords for `Netem.of`."""
        spec = spec if spec is not None else Netem.of(**kw)
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.rtnl import RTM_NEWQDISC
        from pyroute2.netlink.rtnl.tcmsg import tcmsg

        for s in self._sides(side):
            with self._ipr(s) as ipr:
                # Built by hand: IPRoute.tc("replace", "netem", rate=...) also encodes the
                # leftover `rate` keyword as TCA_RATE (pyroute2 0.9). The options bytes equal
                # those of `tc qdisc replace ... netem delay D J loss L rate R limit N`.
                msg = tcmsg()
                msg["index"] = self._index(ipr, self._ifname(s))
                msg["handle"] = NETEM_HANDLE
                msg["parent"] = TC_H_ROOT
                msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", spec.options()]]
                try:
                    _nl_request(ipr, msg, RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
                except NetlinkError as e:
                    if e.code in (errno.ENOENT, errno.EOPNOTSUPP):
                        raise NetemUnsupported(
                            f"the kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): adding it to "
                            f"{self._ifname(s)} failed with {errno.errorcode.get(e.code, e.code)}") from e
                    raise NetnsError(f"netem {spec} on {self._ifname(s)}: {e}") from e
        return spec

    def clear_netem(self, side: str = "both") -> None:
        """Remove a netem root qdisc (the default qdisc comes back); nothing if there is none."""
        for s in self._sides(side):
            with self._ipr(s) as ipr:
                idx = self._index(ipr, self._ifname(s))
                for q in ipr.tc("dump", index=idx):
                    if q.get("parent") == TC_H_ROOT and q.get_attr("TCA_KIND") == "netem":
                        ipr.tc("del", index=idx, handle=q["handle"], parent=TC_H_ROOT)

    @contextlib.contextmanager
    def netem_applied(self, side: str = "both", spec: Netem | None = None, **kw) -> Iterator[Netem]:
        applied = self.netem(side, spec, **kw)
        try:
            yield applied
        finally:
            self.clear_netem(side)

    def qdiscs(self, side: str = "both") -> list[dict]:
        """Root qdiscs of the ends, as facts for reports: side, ifname, kind, handle, options."""
        rows = []
        for s in self._sides(side):
            with self._ipr(s) as ipr:
                idx = self._index(ipr, self._ifname(s))
                for q in ipr.tc("dump", index=idx):
                    if q.get("parent") != TC_H_ROOT:
                        continue
                    kind = q.get_attr("TCA_KIND")
                    opts = q.get_attr("TCA_OPTIONS")
                    row = {"side": s, "ifname": self._ifname(s), "kind": kind, "handle": f"{q['handle'] >> 16:x}:"}
                    if kind == "netem" and opts is not None:
                        row.update({k: opts.get(k) for k in ("delay", "jitter", "loss", "limit")})
                        rate = opts.get_attr("TCA_NETEM_RATE")
                        row["rate"] = rate.get("rate") if rate else None
                    rows.append(row)
        return rows

    # ----------------------------------------------------------------- processes

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start `argv` inside the namespace; it is ended (SIGTERM, then SIGKILL) at close()."""
        env = dict(kw.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(exec_argv(self.name, argv), env=env, **kw)
        self.procs.append(proc)
        return proc

    def describe(self) -> list[tuple[str, str]]:
        rows = [("namespace", self.name), ("subnet", str(self.subnet)),
                ("host end", f"{self.host_if} {self.host_addr}"), ("ns end", f"{self.ns_if} {self.ns_addr}")]
        with contextlib.suppress(Exception):
            rows += [(f"link ({s})", st) for s, st in self.link_state().items()]
            rows += [(f"qdisc ({q['side']})", " ".join(f"{k}={v}" for k, v in q.items() if k != "side"))
                     for q in self.qdiscs()]
        return rows


def _nl_request(ipr, msg, msg_type: int, flags: int) -> list:
    """One rtnetlink request with an ACK (pyroute2 0.9's sync nlm_request trips over its own
    status dict, so go through the async core it wraps; 0.8 has no core and works directly)."""
    core = getattr(ipr, "asyncore", None)
    if core is None:
        return list(ipr.nlm_request(msg, msg_type=msg_type, msg_flags=flags))

    async def run():
        return [m async for m in await core.nlm_request(msg, msg_type, flags)]

    return core.event_loop.run_until_complete(run())


def exec_argv(name: str, argv: list[str]) -> list[str]:
    """The command line that runs `argv` inside namespace `name` (see `main`)."""
    return [sys.executable, "-m", "erofs_domains.programs.netns", "exec", name, "--", *argv]


def enter(name: str) -> None:
    """setns() this process into namespace `name` (ctypes: Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 3 and args[0] == "exec" and "--" in args:
        sep = args.index("--")
        name, cmd = args[1], args[sep + 1:]
        if sep != 2 or not cmd:
            print("usage: python -m erofs_domains.programs.netns exec NAME -- CMD [ARGS...]", file=sys.stderr)
            return 2
        enter(name)
        os.execvp(cmd[0], cmd)
    if args == ["cleanup"]:
        for name in remove_stale():
            print(f"removed {name}")
        return 0
    print("usage: python -m erofs_domains.programs.netns exec NAME -- CMD [ARGS...]\n"
          "       python -m erofs_domains.programs.netns cleanup", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
