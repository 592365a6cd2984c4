"""Kernel tracepoints through tracefs: mount it if needed, enable a set of events, take what
they logged, disable them again. The page-cache probe (erofs_read_folio /
erofs_readahead, erofs_domains/guest/pagecache/probe.py) and the on-demand trace (cachefiles_ondemand_*,
erofs_domains/guest/observe/ondemand_trace.py) both read the kernel through this one class.

A take consumes the events through `trace_pipe`: reading `trace` and then clearing it would lose
whatever the kernel logged in between (fscache workers send requests while a test polls). The
ring buffer is global to the kernel: one `TraceEvents` at a time per guest (tests in one VM run
one after another). A take that finds events dropped says so (`TraceLost`) instead of handing
back a trace with holes."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from erofs_domains.base.proc import cmd

TRACEFS = Path("/sys/kernel/tracing")
# What trace_pipe prints where the ring buffer overwrote events (print_trace_line():
# "CPU:%d [LOST %lu EVENTS]").
_LOST = re.compile(r"\[LOST (\d+) EVENTS\]")


class TraceLost(OSError):
    """The ring buffer overwrote events before they were read."""


def mount_tracefs(root: Path = TRACEFS) -> None:
    """tracefs at `root` (mounted there if it is not); OSError naming what is missing."""
    if (root / "events").is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    r = cmd(["mount", "-t", "tracefs", "nodev", root], check=False)  # judged below
    if r.returncode or not (root / "events").is_dir():
        raise OSError(errno.ENOENT, f"no tracefs at {root} (CONFIG_FTRACE/EVENT_TRACING?): "
                                    f"mount exited {r.returncode}: {r.stderr.strip()}")


def lost_events(text: str) -> int:
    """Events the buffer dropped, as a `trace_pipe` read reports them."""
    return sum(int(n) for n in _LOST.findall(text))


class TraceEvents:
    """Enable `events` ((system, event) pairs, e.g. ("erofs", "erofs_readahead")) with an empty
    buffer; `take()` returns (and consumes) the lines logged since the last take; `close()`
    disables them. OSError (ENOENT) names an event this kernel does not have."""

    def __init__(self, events: tuple[tuple[str, str], ...], root: Path = TRACEFS):
        self.root = root
        self.events = tuple(events)
        mount_tracefs(root)
        missing = [f"{s}/{e}" for s, e in self.events if not self._enable_file(s, e).exists()]
        if missing:
            raise OSError(errno.ENOENT, f"this kernel has no tracepoint {', '.join(missing)} "
                                        f"under {root}/events")
        (root / "trace").write_text("")
        self._set(1)
        (root / "tracing_on").write_text("1")

    def _enable_file(self, system: str, event: str) -> Path:
        return self.root / "events" / system / event / "enable"

    def _set(self, value: int) -> None:
        for s, e in self.events:
            self._enable_file(s, e).write_text(f"{value}")

    def take(self) -> str:
        """The trace since the last take, consumed; TraceLost if events were dropped."""
        fd = os.open(self.root / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        chunks = []
        try:
            while True:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:  # empty: tracing_wait_pipe() returns -EAGAIN
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(fd)
        text = b"".join(chunks).decode("utf-8", "replace")
        lost = lost_events(text)
        if lost:
            raise TraceLost(errno.ENOBUFS, f"the trace buffer dropped {lost} event(s) of "
                                           f"{', '.join(e for _, e in self.events)}: {self.root}/buffer_size_kb "
                                           f"is too small for this test")
        return text

    def close(self) -> None:
        """Disable the events and empty the buffer; the first error is raised after trying all."""
        errors = []
        for step in (lambda: self._set(0), lambda: (self.root / "trace").write_text("")):
            try:
                step()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]
