"""What ends a guest, seen from the host: no VM outlives the run that started it, and a
guest kernel that oopses ends its VM with the console lines that show it.

`GuestRun.run` (vm.py) ends a guest (kills its process group: vng and the qemu it forks) when
- its console shows an oops or a BUG, once the trace is printed. After oops_end() the
  kernel is tainted and the killed task may have held locks: a BUG in erofs_put_super()
  left s_umount and erofs_domain_cookies_lock held, every later mount waited in D state,
  and neither pytest-timeout nor the test watchdog could end a task in D state;
- the test running in it outlived its bound (the guest writes the test and its bound to a
  state file, `TestClock`), which covers a wedge that prints nothing;
- the process that started it (the pytest controller) is gone;
- it ran longer than its lifetime (`EROFS_TEST_VM_LIFETIME`, seconds, 0: none);
- the wrapper itself dies, even by SIGKILL: a guard process reading a pipe from the wrapper
  kills the VM's process group when the pipe closes without a goodbye (`Guard`).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base import crash_patterns

# The guest is dying (a real lockup outlives the test's bound instead: `TestClock`).
CRASH_RE = crash_patterns.CRASH
END_RE = crash_patterns.REPORT_END


@dataclass
class ConsoleScan:
    """Reads the guest console line by line; says when a crash report is complete.

    `due(now)` is true `settle` seconds after the report's end line (time for the test to
    report, if its task survived), or `max_wait` seconds after its first line."""

    settle: float = 3.0
    max_wait: float = 20.0
    before: int = 20
    after: int = 100
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    lines: list[str] = field(default_factory=list)
    first_at: float | None = None
    end_at: float | None = None

    def feed(self, line: str, now: float) -> None:
        if self.first_at is None and CRASH_RE.search(line):
            self.first_at = now
            self.lines = [*list(self.tail)[-self.before:], line]
        elif self.first_at is not None and len(self.lines) < self.before + self.after:
            self.lines.append(line)
        if self.first_at is not None and self.end_at is None and END_RE.search(line):
            self.end_at = now
        self.tail.append(line)

    @property
    def crashed(self) -> bool:
        return self.first_at is not None

    def headline(self) -> str:
        return next((x.strip() for x in self.lines if CRASH_RE.search(x)), "")

    def due(self, now: float) -> bool:
        if self.first_at is None:
            return False
        if self.end_at is not None:
            return now - self.end_at >= self.settle
        return now - self.first_at >= self.max_wait


@dataclass
class TestClock:
    """The guest writes {"test": nodeid, "bound": seconds} to `path` when a test starts and
    {} when it ends (fixtures/plugin.py); a test still there after its bound is overdue.
    Times are the host's: when the content was first seen, never the file's mtime."""

    path: Path
    seen: str | None = None
    since: float = 0.0

    def overdue(self, now: float) -> str | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        if text != self.seen:
            self.seen, self.since = text, now
        try:
            state = json.loads(text) if text.strip() else {}
        except ValueError:
            return None  # caught between truncate and write; read again next time
        test, bound = state.get("test"), state.get("bound")
        if not test or not bound or now - self.since <= bound:
            return None
        return f"{test} was still running after {bound:.0f} s and the guest did not end it"


def write_state(path: str | Path | None, test: str | None = None, bound: float | None = None) -> None:
    """The guest side of `TestClock` (no-op without a path)."""
    if not path:
        return
    text = json.dumps({"test": test, "bound": bound}) if test else "{}"
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class Lifetime:
    """The other reasons to end a guest: its starter is gone, or it lived too long."""

    started: float
    limit: float
    parent: int = field(default_factory=os.getppid)

    def over(self, now: float) -> str | None:
        if os.getppid() != self.parent:
            return f"the process that started this VM (pid {self.parent}) is gone"
        if self.limit > 0 and now - self.started > self.limit:
            return f"the VM ran for more than {self.limit:.0f} s (EROFS_TEST_VM_LIFETIME)"
        return None


# Runs as `python -c`: blocks on its stdin (a pipe from the wrapper); at EOF without the word
# "done" the wrapper died without ending its VM, so end the VM's process group.
GUARD_CODE = """\
import os, signal, sys
pgid = int(sys.argv[1])
data = sys.stdin.buffer.read()
if b"done" not in data:
    try:
        os.killpg(pgid, signal.SIGKILL)
        sys.stderr.write(f"vm guard: the VM wrapper died; killed the VM (process group {pgid})\\n")
    except ProcessLookupError:
        pass
"""


class Guard:
    """A process that outlives this one by a moment: if this process dies without calling
    `done()` (SIGKILL included), the guard kills process group `pgid`. It sits in its own
    session, so a signal to the controller's process group does not end it first."""

    def __init__(self, pgid: int):
        self.proc = subprocess.Popen([sys.executable, "-c", GUARD_CODE, str(pgid)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=release_signals)

    def done(self) -> None:
        """The VM is over (or was killed here): let the guard go without killing."""
        try:
            self.proc.stdin.write(b"done")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Ended(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP: end the guest, then exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_ended(signum, _frame):
    raise Ended(signum)


HELD = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


@contextlib.contextmanager
def signals_held():
    """Block SIGTERM, SIGHUP and SIGINT in this thread; those that came meanwhile are
    delivered on exit."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def release_signals() -> None:
    """preexec_fn of children started under `signals_held` (the mask is inherited)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def crash_report_path(console_log: Path) -> Path:
    """Where a guest's end is explained for the controller (`worker ... crashed` reports)."""
    return console_log.with_suffix(".crash")
