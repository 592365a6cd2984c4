"""Test-side helpers: the daemon's control channel and readiness.

Typical fixture::

    proc = subprocess.Popen([".../tools/ondemand-daemon", "--cache", cache,
                             "--blobs", blobs, "--control", sock, "--log", log],
                            stdout=subprocess.PIPE, stderr=errfile)
    pid = wait_ready(proc, timeout=10)      # READY <pid>, or DaemonStartError
    ctl = DaemonControl(sock)
    ...
    ctl.wait_idle()
    entries = read_request_log(log)         # erofs_domains/programs/ondemand/reqlog.py
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from typing import Any

from .device import DaemonStartError

__all__ = ["DaemonControl", "DaemonControlError", "DaemonDeadError", "DaemonStartError", "wait_ready"]


class DaemonControlError(RuntimeError):
    """The daemon answered ``{"ok": false, ...}`` (or gave no usable answer)."""


class DaemonDeadError(DaemonControlError):
    """The control socket is gone, refused the connection or hung up."""


class DaemonControl:
    """One method per control command; one connection per call, so the same
    object keeps working across daemon restarts on the same socket path."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = str(path)
        self.timeout = timeout

    def call(self, cmd: str, *, reply_timeout: float | None = None,
             **params: Any) -> dict[str, Any]:
        """Send ``{"cmd": cmd, **params}``; return the reply or raise."""
        request = json.dumps({"cmd": cmd, **params}).encode() + b"\n"
        limit = self.timeout if reply_timeout is None else reply_timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(limit)
                sock.connect(self.path)
                sock.sendall(request)
                with sock.makefile("rb") as f:
                    line = f.readline()
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                BrokenPipeError) as exc:
            raise DaemonDeadError(
                f"daemon control socket {self.path} unreachable ({cmd}): {exc}") from exc
        except TimeoutError as exc:
            raise DaemonControlError(f"no reply to {cmd!r} within {limit}s") from exc
        if not line:
            raise DaemonDeadError(f"daemon closed the control connection during {cmd!r} (died?)")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise DaemonControlError(f"unparsable reply to {cmd!r}: {line!r}") from exc
        if not reply.get("ok"):
            raise DaemonControlError(f"daemon refused {cmd!r}: {reply.get('error', reply)}")
        return reply

    def is_alive(self) -> bool:
        try:
            self.ping()
        except DaemonControlError:
            return False
        return True

    def ping(self) -> int:
        """The daemon's pid."""
        return self.call("ping")["pid"]

    def status(self) -> dict[str, Any]:
        """pid, objects {object_id: cookie}, counts per op, in_flight, ignored msg_ids, faults..."""
        return self.call("status")

    def wait_idle(self, timeout: float = 10.0, quiet: float = 0.2) -> None:
        """Return once no request was pending or in flight for ``quiet`` seconds."""
        self.call("wait_idle", reply_timeout=max(self.timeout, timeout + 5),
                  timeout=timeout, quiet=quiet)

    def fault(self, name: str, **params: Any) -> dict[str, Any]:
        """Install a fault by name (see the specific helpers below)."""
        return self.call("fault", name=name, **params)["fault"]

    def clear_faults(self) -> None:
        self.call("clear_faults")

    def fail_open(self, errno: int | str, cookie: str | None = None, once: bool = False) -> None:
        """Answer OPENs with ``copen id,-errno`` (and close their anon fd)."""
        self.fault("fail_open", errno=errno, cookie=cookie, once=once)

    def copen_raw(self, text: str, cookie: str | None = None, once: bool = False,
                  fallback: bool = True) -> None:
        """Reply with ``text`` (``{id}``/``{size}`` placeholders); if the kernel
        would reject it and leave the OPEN pending, send the proper copen too
        unless ``fallback`` is False."""
        self.fault("copen_raw", text=text, cookie=cookie, once=once, fallback=fallback)

    def fail_read(self, mode: str, cookie: str | None = None, once: bool = False) -> None:
        """``skip_data``: complete READs without writing; ``ignore``: never answer."""
        self.fault("fail_read", mode=mode, cookie=cookie, once=once)

    def delay(self, seconds: float, op: str = "READ", cookie: str | None = None,
              once: bool = False) -> None:
        self.fault("delay", seconds=seconds, op=op, cookie=cookie, once=once)

    def close_anon_early(self, cookie: str | None = None) -> None:
        """Close the next opened object's anon fd right after copen (always one-shot)."""
        self.fault("close_anon_early", cookie=cookie)

    def exit_abruptly(self, now: bool = False) -> None:
        """os._exit(1) at the next request, or right after replying if ``now``."""
        try:
            self.call("fault", name="exit_abruptly", now=now)
        except DaemonDeadError:
            if not now:
                raise

    def cull(self, name: str, directory: str | None = None) -> int:
        """``cull <name>`` with the daemon's cwd set to ``directory`` (relative
        to the cache dir); returns the write()'s errno (0 = success)."""
        return self.call("cull", name=name, dir=directory)["errno"]

    def inuse(self, name: str, directory: str | None = None) -> int:
        return self.call("inuse", name=name, dir=directory)["errno"]

    def restore(self) -> int:
        return self.call("restore")["errno"]

    def add_blob(self, name: str, path: str) -> None:
        self.call("add_blob", name=name, path=str(path))

    def size_override(self, name: str, size: int | None) -> None:
        """copen ``size`` for ``name`` from now on (None removes the override)."""
        self.call("size_override", name=name, size=size)

    # -- hooks of the fault tests (tests/fscache/test_daemon_replies.py) --------------

    def close_anon_before_copen(self, cookie: str | None = None) -> None:
        """Close the next OPEN's anon fd *before* answering it (one-shot): the copen write
        succeeds and the kernel fails the OPEN with EBADFD."""
        self.fault("close_anon_before_copen", cookie=cookie)

    def emfile(self) -> None:
        """Run the next read() of the device with no free fd number (one-shot): an OPEN
        delivered by it fails with EMFILE (logged as a DEVICE_READ entry)."""
        self.fault("emfile")

    def copen_twice(self, cookie: str | None = None, once: bool = True) -> None:
        """Send the copen of the next OPEN a second time (the log's ``write_errnos``)."""
        self.fault("copen_twice", cookie=cookie, once=once)

    def probe_pwrite(self, cookie: str, offset: int, length: int) -> dict[str, Any]:
        """pwrite the blob's bytes at ``offset`` through the open object's anon fd from a
        page-aligned buffer: ``{"errno": 0|N, "written": n, "object_id": id}``."""
        return self.call("probe_pwrite", cookie=cookie, offset=offset, length=length)

    def probe_read_complete(self, cookie: str, msg_id: int, ioctl_cmd: int | None = None) -> int:
        """ioctl(anon fd of ``cookie``, ioctl_cmd or READ_COMPLETE, msg_id); the errno (0 = ok)."""
        return self.call("probe_read_complete", cookie=cookie, msg_id=msg_id, ioctl_cmd=ioctl_cmd)["errno"]

    def serve_ignored(self, msg_id: int | None = None, with_data: bool = True) -> dict[str, Any]:
        """Answer READs held by ``fail_read('ignore')``: ``{"served": [...], "errors": {...}}``."""
        r = self.call("serve_ignored", msg_id=msg_id, with_data=with_data)
        return {"served": r["served"], "errors": r["errors"]}


def wait_ready(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Wait for ``READY <pid>`` on ``proc.stdout`` (a pipe); return the pid.

    Raises DaemonStartError on ``ERROR <errno> <message>``, early exit or timeout.
    """
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DaemonStartError(None, f"no READY line within {timeout}s (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            code = proc.wait(timeout=5)
            raise DaemonStartError(None, f"exited with status {code} before READY "
                                         f"(output {buf!r})")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    word, _, rest = line.partition(" ")
    if word == "READY":
        return int(rest)
    if word == "ERROR":
        err, _, message = rest.partition(" ")
        raise DaemonStartError(int(err) if err.isdigit() else None, message)
    raise DaemonStartError(None, f"unexpected first line {line!r}")
