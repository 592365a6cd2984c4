"""Kernel log capture per test, and the checker that fails a test on oopses and warnings."""

import errno
import os
import re
from dataclasses import dataclass, field

from erofs_domains.base import crash_patterns

# Lines that mean the kernel went wrong, whatever the test was doing (the one list).
BAD_PATTERNS = crash_patterns.REPORTS


@dataclass
class KmsgLine:
    seq: int
    usec: int
    level: int
    text: str

    def __str__(self):
        return f"[{self.usec / 1e6:12.6f}] {self.text}"


def parse_record(raw: bytes) -> KmsgLine | None:
    """One /dev/kmsg record: "<prio>,<seq>,<usec>,<flags>[,...];message\\n[ KEY=value\\n...]"
    (None if it is not one)."""
    head, sep, rest = raw.decode(errors="replace").partition(";")
    if not sep:
        return None
    fields = head.split(",")
    try:
        prio, seq, usec = int(fields[0]), int(fields[1]), int(fields[2])
    except (ValueError, IndexError):
        return None
    return KmsgLine(seq=seq, usec=usec, level=prio & 7, text=rest.split("\n", 1)[0])


UNREAD = -1  # KmsgLine.level of what the reader could not read as a record: kept, never dropped


class KmsgReader:
    """Reads /dev/kmsg from the point where it was opened (or from the start)."""

    def __init__(self, path: str = "/dev/kmsg", from_start: bool = False):
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if not from_start:
            os.lseek(self.fd, 0, os.SEEK_END)
        self.lines: list[KmsgLine] = []

    def read(self) -> list[KmsgLine]:
        """New lines since the last call (also appended to self.lines). A record that does not
        parse, and records overwritten before they were read (EPIPE, devkmsg_read()), become
        lines of level UNREAD after the last good one, so the checker reports them."""
        new = []
        while True:
            try:
                raw = os.read(self.fd, 8192)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    break
                if e.errno == errno.EPIPE:  # the reader skips to the oldest record left
                    new.append(self._unread(new, "records overwritten before they were read (EPIPE)"))
                    continue
                raise
            if not raw:
                break
            rec = parse_record(raw)
            new.append(rec if rec else self._unread(new, f"unparsable record {raw[:200]!r}"))
        self.lines += new
        return new

    def _unread(self, new: list[KmsgLine], what: str) -> KmsgLine:
        last = new[-1] if new else self.lines[-1] if self.lines else None
        return KmsgLine(seq=last.seq if last else -1, usec=last.usec if last else 0, level=UNREAD,
                        text=f"(/dev/kmsg: {what})")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write(text: str) -> None:
    """Write a line into the kernel log (as a test marker, or to prove the checker)."""
    with open("/dev/kmsg", "w") as f:
        f.write(text + "\n")


@dataclass
class KmsgChecker:
    """Collects the kernel log of one test; `problems()` are the bad lines nobody declared."""

    reader: KmsgReader
    expected: list[re.Pattern] = field(default_factory=list)

    def expect(self, pattern: str) -> None:
        """Declare lines the test provokes on purpose (e.g. "Duplicate cookie detected")."""
        self.expected.append(re.compile(pattern))

    def lines(self) -> list[KmsgLine]:
        self.reader.read()
        return self.reader.lines

    def since(self, mark: int) -> list[KmsgLine]:
        return [line for line in self.lines() if line.seq > mark]

    def mark(self) -> int:
        lines = self.lines()
        return lines[-1].seq if lines else -1

    def grep(self, pattern: str) -> list[KmsgLine]:
        rx = re.compile(pattern)
        return [line for line in self.lines() if rx.search(line.text)]

    def problems(self) -> list[tuple[str, KmsgLine]]:
        """Bad lines nobody declared, and what could not be read (an oops may hide there)."""
        out = []
        for line in self.lines():
            if line.level == UNREAD:
                out.append(("unread", line))
                continue
            if any(rx.search(line.text) for rx in self.expected):
                continue
            for kind, rx in BAD_PATTERNS.items():
                if rx.search(line.text):
                    out.append((kind, line))
                    break
        return out

    def context(self, line: KmsgLine, before: int = 5, after: int = 25) -> list[KmsgLine]:
        lines = self.lines()
        i = next((k for k, x in enumerate(lines) if x.seq == line.seq), 0)
        return lines[max(0, i - before) : i + after]
