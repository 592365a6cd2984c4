"""The kernel's trace of the on-demand protocol (erofs_domains/guest/observe/ondemand_trace.py) against
the daemon's request log (erofs_domains/programs/ondemand/reqlog.py): the same OPENs, READs and CLOSEs, each
on the same object, seen from both ends of /dev/cachefiles.

The trace knows objects by debug_id (`o`), the daemon by (volume key, cookie key) and its
msg/object ids. An object gets the daemon's name through the message id of its OPEN: the
kernel's copen event carries it, the daemon logged its OPEN under it. An OPEN the daemon
failed has no copen event; it is named by its anon fd, in order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from tabulate import tabulate

from erofs_domains.guest.observe.ondemand_trace import OndemandEvent

RULES = {
    "OPEN": "every OPEN the kernel handed to the daemon (cachefiles_ondemand_open) is an OPEN the daemon "
            "logged, for the same cookie with the same anon fd, and the daemon logged no other",
    "READ": "every READ the kernel made (cachefiles_ondemand_read) is a READ the daemon logged for the same "
            "cookie and range, and the daemon logged no other",
    "CLOSE": "every CLOSE the kernel made (cachefiles_ondemand_close) is a CLOSE the daemon logged for the "
             "same cookie, and the daemon logged no other",
    "READ_COMPLETE": "every READ the daemon completed is one the kernel completed (cachefiles_ondemand_cread) "
                     "under that message id, on that cookie's object",
    "OBJECT_ID": "the object id the kernel drops with an anon fd (cachefiles_ondemand_fd_release) is the one "
                 "the daemon was given with that object's OPEN",
}
OPS = {"open": "OPEN", "read": "READ", "close": "CLOSE"}
Name = tuple  # (volume key, cookie key)
UNNAMED: Name = (None, None)


def object_names(events: Iterable[OndemandEvent], requests: Iterable[dict]) -> dict[int, dict]:
    """debug_id -> the daemon's OPEN entry of that object (see the module docstring)."""
    events, requests = list(events), list(requests)
    opens = [r for r in requests if r.get("op") == "OPEN"]
    by_msg = {r.get("msg_id"): r for r in opens}
    out = {e.obj: by_msg[e.msg_id] for e in events if e.event == "copen" and e.msg_id in by_msg}
    used = {id(r) for r in out.values()}
    spare = [r for r in opens if id(r) not in used]
    for e in events:
        if e.event == "open" and e.obj not in out:
            r = next((r for r in spare if r.get("fd") == e.fd), None)
            if r is not None:
                spare.remove(r)
                out[e.obj] = r
    return out


def name_of(entry: dict | None) -> Name:
    return UNNAMED if entry is None else (entry.get("volume_key"), entry.get("cookie_key"))


@dataclass
class Disagreement:
    rule: str
    rows: list[tuple]  # (op, volume, cookie, off, len, fd or msg, kernel traced, daemon logged)

    def render(self) -> str:
        return (f"{self.rule}: {RULES[self.rule]}\n"
                + tabulate(self.rows, headers=("op", "volume", "cookie", "off", "len", "fd/msg", "kernel traced",
                                               "daemon logged")))


def _key(op: str, name: Name, off=None, length=None, tag=None) -> tuple:
    return (op, *name, off, length, tag)


def kernel_requests(events: Iterable[OndemandEvent], names: dict[int, dict]) -> Counter:
    """The requests the kernel traced, as (op, volume, cookie, off, len, fd) keys."""
    out: Counter = Counter()
    for e in events:
        name = name_of(names.get(e.obj))
        if e.event == "open":
            out[_key("OPEN", name, tag=e.fd)] += 1
        elif e.event == "read":
            out[_key("READ", name, e.start, e.length)] += 1
        elif e.event == "close":
            out[_key("CLOSE", name)] += 1
    return out


def daemon_requests(requests: Iterable[dict]) -> Counter:
    """The requests the daemon logged, keyed as `kernel_requests` keys them."""
    out: Counter = Counter()
    for r in requests:
        op = r.get("op")
        if op == "OPEN":
            out[_key(op, name_of(r), tag=r.get("fd"))] += 1
        elif op == "READ":
            out[_key(op, name_of(r), r.get("off"), r.get("len"))] += 1
        elif op == "CLOSE":
            out[_key(op, name_of(r))] += 1
    return out


def _differ(rule: str, kernel: Counter, daemon: Counter) -> Disagreement | None:
    rows = [(*k, kernel[k], daemon[k]) for k in sorted(set(kernel) | set(daemon), key=repr) if kernel[k] != daemon[k]]
    return Disagreement(rule, rows) if rows else None


def _completions(events: list[OndemandEvent], requests: list[dict], names: dict[int, dict]) -> Disagreement | None:
    """Kernel creads against the daemon's completed READs. The daemon logs `read_complete` with an
    errno when its write or its ioctl failed, and cannot tell which: such a READ may or may not
    have a cread, one without an errno must."""
    kernel = Counter(_key("READ done", name_of(names.get(e.obj)), tag=e.msg_id) for e in events if e.event == "cread")
    done = [r for r in requests if r.get("op") == "READ" and r.get("reply") == "read_complete"]
    clean = Counter(_key("READ done", name_of(r), tag=r.get("msg_id")) for r in done if not r.get("errno"))
    any_ = Counter(_key("READ done", name_of(r), tag=r.get("msg_id")) for r in done)
    rows = [(*k, kernel[k], clean[k] if kernel[k] < clean[k] else any_[k])
            for k in sorted(set(kernel) | set(any_), key=repr) if not clean[k] <= kernel[k] <= any_[k]]
    return Disagreement("READ_COMPLETE", rows) if rows else None


def disagreements(events: Iterable[OndemandEvent], requests: Iterable[dict]) -> list[Disagreement]:
    """What the trace and the log disagree on, one entry per rule broken (empty: they agree)."""
    events, requests = list(events), list(requests)
    names = object_names(events, requests)
    kernel, daemon = kernel_requests(events, names), daemon_requests(requests)
    out = [_differ(op, Counter({k: n for k, n in kernel.items() if k[0] == op}),
                   Counter({k: n for k, n in daemon.items() if k[0] == op})) for op in OPS.values()]
    out.append(_completions(events, requests, names))
    ids = [(e, names.get(e.obj)) for e in events if e.event == "fd_release"]
    wrong = [(*_key("fd_release", name_of(r), tag=f"oid {e.object_id}"), 1, f"OPEN gave oid {r.get('object_id')}")
             for e, r in ids if r is not None and r.get("object_id") != e.object_id]
    out.append(Disagreement("OBJECT_ID", wrong) if wrong else None)
    return [d for d in out if d is not None]


def render_events(events: list[OndemandEvent], names: dict[int, dict], last: int = 60) -> str:
    """The kernel's events as a table (the last `last`), each object named as the daemon knows it."""
    rows = [(f"{e.time:.6f}", e.event, f"{e.obj:x}", *name_of(names.get(e.obj)), e.msg_id, e.object_id, e.fd,
             e.start, e.length) for e in events[-last:]]
    return (f"kernel trace, cachefiles_ondemand_* ({len(events)} events, last {min(last, len(events))}):\n"
            + tabulate(rows, headers=("time", "event", "o", "volume", "cookie", "mid", "oid", "fd", "s", "l")))


def report(found: list[Disagreement], events: list[OndemandEvent], requests: list[dict]) -> str:
    """The rules broken, then the kernel's events (the daemon's table follows in a rig's report)."""
    names = object_names(events, requests)
    return ("\n\n".join(d.render() for d in found) + "\n\n" + render_events(events, names))
