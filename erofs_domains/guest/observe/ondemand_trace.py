"""The kernel's own account of the on-demand protocol: the cachefiles_ondemand_* tracepoints
(include/trace/events/cachefiles.h), a channel independent of the daemon's request log.

Where fs/cachefiles/ondemand.c emits each event, and what its fields hold there:

  open        cachefiles_ondemand_get_fd(), when the daemon read()s an OPEN and gets its anon fd
  copen       cachefiles_ondemand_copen(), once the daemon's `copen <msg>,<size>` is accepted
              (not for a copen that fails the OPEN)
  read        cachefiles_ondemand_init_read_req(), when the kernel makes a READ (before it is
              queued)
  cread       cachefiles_ondemand_fd_ioctl(), when the daemon completes READ <msg>
  close       cachefiles_ondemand_init_close_req(), when the kernel makes a CLOSE
  fd_write    cachefiles_ondemand_fd_write_iter(), a daemon write into the object's cache file
  fd_release  cachefiles_ondemand_fd_release(), the daemon closed the object's anon fd

`o` is the object's debug_id (cachefiles_object), the key that ties the events of one object
together. The open, read and close events are emitted before cachefiles_ondemand_daemon_read()
assigns msg->msg_id and msg->object_id, so their `mid` and `oid` read 0 on a first delivery:
only copen and cread carry the message id, only fd_release the object id.

The TP_printk formats are the same in 6.1.192 and 6.12.117."""

from __future__ import annotations

import re
from dataclasses import dataclass

from erofs_domains.guest.observe.tracefs import TraceEvents

# event -> its TP_printk fields, in order: (name in the line, attribute, base)
FORMATS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "open": (("o", "obj", 16), ("mid", "msg_id", 16), ("oid", "object_id", 16), ("fd", "fd", 10),
             ("f", "flags", 16)),
    "copen": (("o", "obj", 16), ("mid", "msg_id", 16), ("l", "length", 16)),
    "read": (("o", "obj", 16), ("mid", "msg_id", 16), ("oid", "object_id", 16), ("s", "start", 16),
             ("l", "length", 16)),
    "cread": (("o", "obj", 16), ("mid", "msg_id", 16)),
    "close": (("o", "obj", 16), ("mid", "msg_id", 16), ("oid", "object_id", 16)),
    "fd_write": (("o", "obj", 16), ("iB", "backer", 16), ("s", "start", 16), ("l", "length", 16)),
    "fd_release": (("o", "obj", 16), ("oid", "object_id", 16)),
}
EVENTS = tuple(("cachefiles", f"cachefiles_ondemand_{e}") for e in FORMATS)
_LINE = re.compile(r"\s(\d+\.\d+): cachefiles_ondemand_(\w+): (.*)$")
_FIELD = re.compile(r"(\w+)=(-?[0-9a-f]+)$")


class TraceFormatError(ValueError):
    """A cachefiles_ondemand_* line whose fields are not the TP_printk this parser knows."""


@dataclass(frozen=True)
class OndemandEvent:
    """One cachefiles_ondemand_* event (fields it does not print are None)."""

    event: str  # "open", "copen", "read", "cread", "close", "fd_write", "fd_release"
    obj: int
    time: float = 0.0
    msg_id: int | None = None
    object_id: int | None = None
    fd: int | None = None
    flags: int | None = None
    start: int | None = None
    length: int | None = None
    backer: int | None = None

    def __str__(self):
        shown = [f"{name}={getattr(self, attr)}" for name, attr, _ in FORMATS[self.event][1:]]
        return f"{self.event} o={self.obj:x} " + " ".join(shown)


def _signed_long(v: int) -> int:
    """copen's `l=%lx` prints a negative long as its 64-bit two's complement."""
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_line(line: str) -> OndemandEvent | None:
    """One line of tracefs `trace` -> its event (None: not a cachefiles_ondemand_* line)."""
    m = _LINE.search(line)
    if not m or m.group(2) not in FORMATS:
        return None
    event, fields = m.group(2), m.group(3).split()
    spec = FORMATS[event]
    if len(fields) != len(spec):
        raise TraceFormatError(f"cachefiles_ondemand_{event}: expected fields "
                               f"{' '.join(n + '=' for n, _, _ in spec)}, got {line.strip()!r}")
    values = {}
    for text, (name, attr, base) in zip(fields, spec):
        f = _FIELD.match(text)
        if not f or f.group(1) != name:
            raise TraceFormatError(f"cachefiles_ondemand_{event}: field {name}= expected at {text!r} "
                                   f"in {line.strip()!r}")
        values[attr] = int(f.group(2), base)
    if event == "copen":
        values["length"] = _signed_long(values["length"])
    return OndemandEvent(event, time=float(m.group(1)), **values)


def parse_trace(text: str) -> list[OndemandEvent]:
    """Lines of tracefs `trace` -> the cachefiles_ondemand_* events, oldest first."""
    return [e for e in map(parse_line, text.splitlines()) if e is not None]


class OndemandTrace:
    """The seven cachefiles_ondemand_* tracepoints, enabled from construction to `close()`.
    `poll()` moves what the kernel logged into `events`; `mark()` is a position in them for
    `since()`."""

    def __init__(self):
        self.trace = TraceEvents(EVENTS)
        self.events: list[OndemandEvent] = []

    def poll(self) -> list[OndemandEvent]:
        self.events += parse_trace(self.trace.take())
        return self.events

    def mark(self) -> int:
        return len(self.poll())

    def since(self, mark: int = 0, event: str | None = None) -> list[OndemandEvent]:
        return [e for e in self.poll()[mark:] if event is None or e.event == event]

    def close(self) -> None:
        self.trace.close()
