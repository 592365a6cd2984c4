"""A test's view of the kernel's own trace of the on-demand protocol (cachefiles_ondemand_*
tracepoints, erofs_domains/guest/observe/ondemand_trace.py) beside its `Rig`: the requests the kernel
made, named as the daemon knows their objects, and the checks that read them."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from erofs_domains.guest.fscache.rig import Rig
from erofs_domains.guest.observe import ondemand_agreement as agree
from erofs_domains.guest.observe.ondemand_trace import OndemandEvent, OndemandTrace


@dataclass
class KernelTrace:
    trace: OndemandTrace
    rig: Rig

    def mark(self) -> int:
        """A position in the kernel's events (`since`)."""
        return self.trace.mark()

    def names(self) -> dict[int, dict]:
        """debug_id -> the daemon's OPEN entry of that object (erofs_domains/guest/observe/ondemand_agreement.py)."""
        return agree.object_names(self.trace.poll(), self.rig.daemon.requests())

    def since(self, mark: int, event: str) -> list[tuple[agree.Name, OndemandEvent]]:
        """The kernel's `event`s after `mark`, each with its object's (volume, cookie)."""
        events = self.trace.since(mark, event)
        names = self.names()
        return [(agree.name_of(names.get(e.obj)), e) for e in events]

    def opened(self, mark: int) -> Counter:
        """OPENs the kernel handed out since `mark`, per (volume, cookie)."""
        return Counter(name for name, _ in self.since(mark, "open"))

    def settle(self, until, timeout: float = 8.0):
        """Wait for the daemon to go idle, then poll the trace until `until()` returns a true
        value (returned) or `timeout` passes (then its last value). Device OPENs and CLOSEs come
        from fscache workers after mount/umount returned."""
        self.rig.daemon.wait_idle()
        deadline = time.monotonic() + timeout
        while True:
            got = until()
            if got or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def fail(self, rule: str, detail: str, mark: int = 0) -> None:
        """The rig's report (mounts, oracle, fscache tables, daemon log, kernel log) with the rule,
        `detail` and the kernel's events since `mark`."""
        events = self.trace.since(mark)
        self.rig.fail(rule, detail + "\n\n" + agree.render_events(events, self.names()))

    def expect_agreement(self, what: str, caused: tuple[str, ...], timeout: float = 8.0) -> None:
        """Over the whole test: the trace and the daemon's log hold the same requests
        (erofs_domains/guest/observe/ondemand_agreement.py RULES), and the trace holds each of the events
        `caused` (the test did what emits them)."""
        self.settle(lambda: not agree.disagreements(self.trace.poll(), self.rig.daemon.requests()), timeout)
        events, requests = self.trace.poll(), self.rig.daemon.requests()
        broken = agree.disagreements(events, requests)
        if broken:
            self.rig.fail(f"kernel trace vs daemon log: {', '.join(d.rule for d in broken)} ({what})",
                          agree.report(broken, events, requests))
        seen = {e.event for e in events}
        silent = [e for e in caused if e not in seen]
        if silent:
            self.fail(f"kernel trace: every event the test caused is traced ({what})",
                      "no cachefiles_ondemand_" + ", _".join(silent) + " event in the trace")
