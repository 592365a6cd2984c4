"""The suite's one way to run a command and one way to wait for a condition.

`cmd()` runs a program to completion and, when it fails, raises `CmdError` whose message
holds the command line, the exit status, stdout and stderr (the shape of `cmd()` in the
kernel's tools/testing/selftests/net/lib/py). `wait_for()` polls a probe until a predicate
holds and, on timeout, raises `WaitTimeout` naming what was awaited and the value last
observed. Both are pure Python with no dependency on the rest of the suite, so tools on the
host and fixtures in the guest share them.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_SHOW = 4000  # characters of stdout/stderr/observed value kept in a message


def _clip(text: str, limit: int = _SHOW) -> str:
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    return f"...({len(text) - limit} characters cut)...\n" + text[-limit:]


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


class CmdError(subprocess.CalledProcessError):
    """A command that could not start, timed out or exited non-zero.

    A `subprocess.CalledProcessError` (so `returncode`, `cmd`, `stdout`, `stderr` are there),
    whose str() is the whole story: the command line, what went wrong, stdout and stderr.
    `returncode` is None when the command could not start or timed out; `reason` says which."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str | bytes | None,
                 stderr: str | bytes | None, reason: str = ""):
        super().__init__(returncode if returncode is not None else -1, list(argv), stdout, stderr)
        self.returncode = returncode  # type: ignore[assignment]
        self.reason = reason or f"exit status {returncode}"

    @property
    def command_line(self) -> str:
        return shlex.join(str(a) for a in self.cmd)

    def __str__(self) -> str:
        out, err = _clip(_text(self.stdout)), _clip(_text(self.stderr))
        return (f"command failed ({self.reason}): {self.command_line}\n"
                f"STDOUT: {out if out else '(empty)'}\n"
                f"STDERR: {err if err else '(empty)'}")


def cmd(argv: Sequence[str | Any], *, check: bool = True, timeout: float | None = None,
        cwd: str | Any | None = None, env: Mapping[str, str] | None = None,
        input: str | bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """Run `argv` (no shell) to completion with stdout and stderr captured.

    Returns the CompletedProcess. Raises CmdError if the program cannot be started, runs
    longer than `timeout` seconds (it is killed), or, with `check` (the default), exits
    non-zero. With check=False a non-zero exit is returned, for callers that judge it."""
    argv = [str(a) for a in argv]
    try:
        r = subprocess.run(argv, capture_output=True, text=text, timeout=timeout, cwd=cwd,
                           env=None if env is None else dict(env), input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise CmdError(argv, None, e.stdout, e.stderr, f"timed out after {timeout:g} s") from None
    except OSError as e:
        raise CmdError(argv, None, None, None, f"could not start: {e}") from e
    if check and r.returncode != 0:
        raise CmdError(argv, r.returncode, r.stdout, r.stderr)
    return r


class WaitTimeout(TimeoutError):
    """wait_for() gave up: `what` was awaited, `last` is the value observed last."""

    def __init__(self, what: str, timeout: float, last: Any, shown: str):
        super().__init__(f"timed out after {timeout:g} s waiting for {what}; last observed: {shown}")
        self.what, self.timeout, self.last = what, timeout, last


def wait_for(probe: Callable[[], T], *, what: str, timeout: float, until: Callable[[T], object] = bool,
             step: float = 0.05, ignore: tuple[type[BaseException], ...] = (),
             show: Callable[[T], str] = repr) -> T:
    """Call `probe()` every `step` seconds until `until(value)` is true; return that value.

    The probe always runs at least once, and once more after the deadline passed, so a
    condition that became true while the caller was descheduled is not reported as a
    timeout. Exceptions of the types in `ignore` count as "not yet" (the exception is the
    value shown if it is the last one). On timeout raises WaitTimeout with `what` and
    `show(last value)`."""
    deadline = time.monotonic() + timeout
    while True:
        last_try = time.monotonic() >= deadline
        try:
            value = probe()
        except ignore as e:
            value, shown, done = None, f"{type(e).__name__}: {e}", False
        else:
            done = bool(until(value))
            shown = "" if done else show(value)
        if done:
            return value
        if last_try:
            raise WaitTimeout(what, timeout, value, _clip(shown))
        time.sleep(max(0.0, min(step, deadline - time.monotonic())))


def terminate(proc, timeout: float = 5.0, *, close_pipes: bool = False) -> int | None:
    """SIGTERM, and SIGKILL if `proc` (a Popen, or anything with its poll/send_signal/wait) has
    not exited `timeout` s later; its exit status. `close_pipes`: close the pipes it holds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr) if close_pipes else ():
        if stream:
            stream.close()
    return proc.returncode
